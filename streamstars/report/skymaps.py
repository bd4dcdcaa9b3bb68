"""HEALPix sky maps per band: stars, observations per star, depth, visits per pixel.

The resolution and the projection follow the footprint (:func:`choose_view`): the nside is
the finest at which the median occupied pixel still holds :data:`MIN_STARS_PER_PIXEL` stars,
and a footprint within :data:`ZOOM_MAX_RADIUS_DEG` of its centre is drawn zoomed on a
McBryde–Thomas equal-area projection centred on it, a wider one on the full-sky Mollweide
projection.  Maps are drawn with skyproj (nest pixels rasterised onto the projection).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import healpy as hp
import numpy as np

from streamstars.report.catalog import ReportCatalog
from streamstars.report.plotting import Plot, new_figure, no_data
from streamstars.report.stats import group_median
from streamstars.sky import unit_vectors

__all__ = [
    "DEPTH_MIN_MAG_ERR",
    "DEPTH_MIN_OBSERVATIONS",
    "DEPTH_SNR",
    "MIN_STARS_PER_PIXEL",
    "ZOOM_MAX_RADIUS_DEG",
    "SkyMap",
    "SkyView",
    "choose_view",
    "depth_magnitudes",
    "draw_band_maps",
    "sky_map_plots",
]

#: The depth is the magnitude at this signal-to-noise ratio.
DEPTH_SNR = 10.0
#: Only observations with at least this magnitude error (S/N <= ~36) estimate the depth: there
#: the background dominates the noise, so the error scales as 10**(0.4 m) (see
#: :func:`depth_magnitudes`); brighter sources are photon-noise limited.
DEPTH_MIN_MAG_ERR = 0.03
#: A pixel needs this many such observations for a depth.
DEPTH_MIN_OBSERVATIONS = 3
#: The finest nside whose median occupied pixel holds at least this many stars is used.
MIN_STARS_PER_PIXEL = 10
#: A footprint whose stars all lie within this radius of its centre is drawn zoomed.
ZOOM_MAX_RADIUS_DEG = 30.0
_FINEST_ORDER = 13  # nside 8192 (~26")
_COARSEST_ORDER = 3  # nside 8
_MAG_ERR_PER_INVERSE_SNR = 2.5 / math.log(10.0)


@dataclass(frozen=True)
class SkyView:
    """How the maps of one report are drawn.

    Attributes:
        nside: HEALPix nside of every map (nest ordering).
        lon_0: central RA of the projection [deg].
        full_sky: True for the full-sky Mollweide view, False for a zoomed field.
        radius_deg: angular radius of the footprint around its centre [deg].
    """

    nside: int
    lon_0: float
    full_sky: bool
    radius_deg: float


@dataclass(frozen=True)
class SkyMap:
    """Values of the occupied pixels (nest, ``SkyView.nside``) of one band."""

    pixels: np.ndarray
    values: np.ndarray


def choose_view(ra_deg: np.ndarray, dec_deg: np.ndarray) -> SkyView:
    """Resolution and projection suited to the footprint of the given star positions."""
    if len(ra_deg) == 0:
        return SkyView(nside=1 << _COARSEST_ORDER, lon_0=0.0, full_sky=True, radius_deg=180.0)
    vectors = unit_vectors(ra_deg, dec_deg)
    centre = vectors.sum(axis=0)
    norm = float(np.linalg.norm(centre))
    if norm < 1e-9 * len(ra_deg):  # stars all around the sphere: no meaningful centre
        lon_0, radius = 0.0, 180.0
    else:
        centre /= norm
        lon_0 = math.degrees(math.atan2(centre[1], centre[0])) % 360.0
        radius = math.degrees(math.acos(float(np.clip((vectors @ centre).min(), -1.0, 1.0))))
    finest = hp.ang2pix(1 << _FINEST_ORDER, ra_deg, dec_deg, nest=True, lonlat=True)
    order = _COARSEST_ORDER
    for candidate in range(_FINEST_ORDER, _COARSEST_ORDER - 1, -1):  # loop over resolutions
        _, per_pixel = np.unique(finest >> (2 * (_FINEST_ORDER - candidate)),
                                 return_counts=True)
        if np.median(per_pixel) >= MIN_STARS_PER_PIXEL:
            order = candidate
            break
    return SkyView(nside=1 << order, lon_0=lon_0, full_sky=radius > ZOOM_MAX_RADIUS_DEG,
                   radius_deg=radius)


def depth_magnitudes(mag: np.ndarray, mag_err: np.ndarray) -> np.ndarray:
    """The magnitude at S/N :data:`DEPTH_SNR` implied by each observation (NaN where unusable).

    Where the background dominates the noise, the flux error is the same for every source of
    an exposure, so the magnitude error grows as ``10**(0.4 (m - m10))`` from its value
    ``2.5/ln10 / 10`` at the depth ``m10``:  ``m10 = m - 2.5 log10(err / err10)``.  Only
    observations with ``err >= DEPTH_MIN_MAG_ERR`` are used.
    """
    err_at_depth = _MAG_ERR_PER_INVERSE_SNR / DEPTH_SNR
    err = np.asarray(mag_err, dtype=np.float64)
    usable = np.isfinite(mag) & np.isfinite(err) & (err >= DEPTH_MIN_MAG_ERR)
    out = np.full(len(err), np.nan)
    out[usable] = mag[usable] - 2.5 * np.log10(err[usable] / err_at_depth)
    return out


def _band_maps(catalog: ReportCatalog, view: SkyView) -> dict[str, list[SkyMap]]:
    """quantity -> one map per band (in ``catalog.bands`` order)."""
    star_pixel = hp.ang2pix(view.nside, catalog.star_ra, catalog.star_dec, nest=True,
                            lonlat=True)
    obs_pixel = hp.ang2pix(view.nside, catalog.obs_ra, catalog.obs_dec, nest=True, lonlat=True)
    depth = depth_magnitudes(catalog.obs_mag, catalog.obs_mag_err)
    n_visits = len(catalog.visit)
    maps: dict[str, list[SkyMap]] = {"stars": [], "nobs": [], "depth": [], "visits": []}
    for band in range(len(catalog.bands)):  # loop over bands; everything inside is vectorised
        has = catalog.counts[:, band] > 0
        pixels, n_stars = np.unique(star_pixel[has], return_counts=True)
        maps["stars"].append(SkyMap(pixels, n_stars.astype(np.float64)))
        pixels, median_nobs, _ = group_median(star_pixel[has], catalog.counts[has, band])
        maps["nobs"].append(SkyMap(pixels, median_nobs))
        in_band = catalog.obs_band == band
        usable = in_band & np.isfinite(depth)
        pixels, median_depth, _ = group_median(obs_pixel[usable], depth[usable],
                                               min_count=DEPTH_MIN_OBSERVATIONS)
        maps["depth"].append(SkyMap(pixels, median_depth))
        pixel_visit = np.unique(obs_pixel[in_band] * n_visits + catalog.obs_visit[in_band])
        pixels, n_pixel_visits = np.unique(pixel_visit // n_visits, return_counts=True)
        maps["visits"].append(SkyMap(pixels, n_pixel_visits.astype(np.float64)))
    return maps


def _raster_width(view: SkyView) -> int:
    """Raster columns for skyproj: ~8 per HEALPix pixel across the field (at most 400, at
    least 100); skyproj transforms every raster vertex, so more only costs time."""
    across = 2.0 * view.radius_deg / math.degrees(hp.nside2resol(view.nside))
    return int(np.clip(8.0 * across, 100, 400))


def draw_band_maps(view: SkyView, maps: Sequence[SkyMap], bands: Sequence[str],
                   label: str, *, cmap: str = "viridis", symmetric: bool = False,
                   panel_titles: Sequence[str] | None = None) -> Any:
    """One figure with a sky map per band.

    ``symmetric``: a diverging colour scale centred on 0 (for offsets).  Returns the figure.
    """
    import skyproj

    n = len(bands)
    ncols = 1 if n == 1 else (2 if n in (2, 4) else 3)
    nrows = math.ceil(n / ncols)
    figure = new_figure(4.6 * ncols, 3.9 * nrows, left=0.08, right=0.9, bottom=0.08,
                        top=0.92, wspace=0.45, hspace=0.4)
    axes = figure.subplots(nrows, ncols, squeeze=False).ravel()
    projection = skyproj.MollweideSkyproj if view.full_sky else skyproj.McBrydeSkyproj
    for index, ax in enumerate(axes):  # loop over panels
        if index >= n:
            ax.set_visible(False)
            continue
        sky_map = maps[index]
        title = panel_titles[index] if panel_titles else bands[index]
        finite = np.isfinite(sky_map.values)
        if not finite.any():
            ax.set_title(title, fontsize=10)
            no_data(ax, f"no {label} in band {bands[index]}")
            continue
        values = sky_map.values[finite]
        kwargs: dict[str, Any] = {"cmap": cmap}
        if symmetric:
            limit = float(np.nanpercentile(np.abs(values), 98)) or 1e-3
            kwargs.update(vmin=-limit, vmax=limit)
        sky = projection(ax=ax, lon_0=view.lon_0, n_grid_lon=4, n_grid_lat=4)
        sky.draw_hpxpix(view.nside, sky_map.pixels[finite], values, nest=True,
                        zoom=not view.full_sky, xsize=_raster_width(view), **kwargs)
        sky.draw_colorbar(label=label, fontsize=8)
        sky.ax.set_xlabel("RA", fontsize=9)
        sky.ax.set_ylabel("Dec", fontsize=9)
        sky.ax.tick_params(labelsize=7)
        sky.ax.set_title(title, fontsize=10, pad=16)
    return figure


def sky_map_plots(catalog: ReportCatalog, view: SkyView) -> list[Plot]:
    """The four per-band sky maps of the report."""
    maps = _band_maps(catalog, view)
    bands = catalog.bands
    pixel_arcmin = math.degrees(hp.nside2resol(view.nside)) * 60.0
    where = (f"HEALPix nside {view.nside} (pixels of ~{pixel_arcmin:.1f}'), "
             + ("full-sky Mollweide view" if view.full_sky else
                f"McBryde-Thomas view zoomed on the {2 * view.radius_deg:.1f} deg field"))

    def titles(kind: str) -> list[str]:
        out = []
        for band, sky_map in zip(bands, maps[kind], strict=True):
            finite = sky_map.values[np.isfinite(sky_map.values)]
            summary = {"stars": f"{int(finite.sum()):,} stars",
                       "nobs": f"median {np.median(finite):.0f}" if len(finite) else "",
                       "depth": f"median {np.median(finite):.2f} mag" if len(finite) else "",
                       "visits": f"max {int(finite.max())}" if len(finite) else ""}[kind]
            out.append(f"{band}: {summary}" if summary else band)
        return out

    return [
        Plot("sky_stars", "Stars per pixel",
             f"Number of stars with at least one observation in the band, per pixel ({where}). "
             "Look for holes or stripes (missing visits or detectors, a density cut) and for "
             "a footprint that differs between bands.",
             draw_band_maps(view, maps["stars"], bands, "stars", panel_titles=titles("stars"))),
        Plot("sky_nobs", "Observations per star (median)",
             "Median number of observations in the band of the stars in each pixel: the "
             "coverage a calibration run has to tie the exposures together. Look for pixels "
             "well below their neighbours (chip gaps, missing visits) and a pattern that "
             "follows the dithers.",
             draw_band_maps(view, maps["nobs"], bands, "observations / star",
                            cmap="magma", panel_titles=titles("nobs"))),
        Plot("sky_depth", "Depth (magnitude at S/N 10)",
             "Median single-visit 10-sigma depth of the observations in each pixel, in "
             "instrumental magnitudes per second (-2.5 log10 counts/s), from each "
             f"observation's magnitude and error (errors >= {DEPTH_MIN_MAG_ERR} mag only, "
             "scaled as a background-limited source: m10 = m - 2.5 log10(err / 0.1086)). "
             "Look for shallow regions (bad seeing, bright sky, clouds in some visits); "
             "instrumental magnitudes are not calibrated, so compare within a band.",
             draw_band_maps(view, maps["depth"], bands, "mag at S/N 10", cmap="cividis",
                            panel_titles=titles("depth"))),
        Plot("sky_visits", "Visits per pixel",
             "Number of distinct visits with a selected observation in each pixel. Look for "
             "pixels covered by far fewer visits than the rest of the field (edges, gaps "
             "between pointings).",
             draw_band_maps(view, maps["visits"], bands, "visits", cmap="plasma",
                            panel_titles=titles("visits"))),
    ]
