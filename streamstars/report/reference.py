"""Reference stars: reference minus mean instrumental magnitude, per band.

For every star matched to the reference catalog and observed in a band, the offset
``refMag - mean(instMag)`` is the zero point a calibration run will solve for (instrumental
magnitudes are per second of exposure, so one offset per band is expected), plus everything
that varies: a trend with magnitude (non-linearity, background errors, colour terms) or
structure on the sky (flat field, illumination, clouds in some visits).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from streamstars.report.catalog import ReportCatalog
from streamstars.report.plotting import Plot, band_colour, new_figure, no_data
from streamstars.report.skymaps import SkyMap, SkyView, choose_view, draw_band_maps
from streamstars.report.stats import group_median

__all__ = ["mean_instrumental_magnitudes", "reference_offsets", "reference_plots"]

_MAG_BIN_WIDTH = 0.5  # running median of the offset in magnitude bins of this width [mag]
_MIN_PER_BIN = 5
#: At most about this many points are drawn per band (every k-th star); the running median and
#: the band median use every star.
_MAX_POINTS_SHOWN = 20_000


def mean_instrumental_magnitudes(catalog: ReportCatalog) -> np.ndarray:
    """(n_stars, n_bands) mean instrumental magnitude of each star in each band (NaN: none)."""
    n_bands = len(catalog.bands)
    finite = np.isfinite(catalog.obs_mag)
    key = catalog.obs_star[finite] * n_bands + catalog.obs_band[finite]
    size = catalog.n_stars * n_bands
    sums = np.bincount(key, weights=catalog.obs_mag[finite], minlength=size)
    counts = np.bincount(key, minlength=size)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(counts > 0, sums / counts, np.nan)
    return mean.reshape(catalog.n_stars, n_bands)


def reference_offsets(catalog: ReportCatalog) -> np.ndarray | None:
    """(n_stars, n_bands) ``refMag - mean instMag`` (NaN where not both known); None without
    reference stars."""
    if catalog.reference_mag is None:
        return None
    return catalog.reference_mag.astype(np.float64) - mean_instrumental_magnitudes(catalog)


def _versus_magnitude(catalog: ReportCatalog, offsets: np.ndarray) -> Plot:
    n = len(catalog.bands)
    ncols = 1 if n == 1 else 2
    nrows = (n + ncols - 1) // ncols
    figure = new_figure(5.0 * ncols, 3.4 * nrows, left=0.09, right=0.98, bottom=0.1, top=0.94,
                        wspace=0.28, hspace=0.45)
    axes = figure.subplots(nrows, ncols, squeeze=False).ravel()
    summary = []
    assert catalog.reference_mag is not None
    for band_index, ax in enumerate(axes):  # loop over bands
        if band_index >= n:
            ax.set_visible(False)
            continue
        band = catalog.bands[band_index]
        ref = catalog.reference_mag[:, band_index].astype(np.float64)
        offset = offsets[:, band_index]
        ok = np.isfinite(ref) & np.isfinite(offset)
        ax.set_title(band, fontsize=10)
        if not ok.any():
            no_data(ax, f"no matched reference star observed in {band}")
            continue
        ref, offset = ref[ok], offset[ok]
        zero_point = float(np.median(offset))
        low, high = np.percentile(offset, [1, 99])
        pad = max(0.1, 0.5 * (high - low))
        shown = slice(None, None, max(1, len(ref) // _MAX_POINTS_SHOWN))
        ax.scatter(ref[shown], offset[shown], s=2, alpha=0.4,
                   color=band_colour(band, band_index), rasterized=True)
        bins = np.floor(ref / _MAG_BIN_WIDTH).astype(np.int64)
        centres, running, _ = group_median(bins, offset, min_count=_MIN_PER_BIN)
        ax.plot((centres + 0.5) * _MAG_BIN_WIDTH, running, color="black", linewidth=1.5,
                label="running median")
        ax.axhline(zero_point, color="grey", linestyle="--", linewidth=1,
                   label=f"median {zero_point:.3f}")
        ax.set_ylim(low - pad, high + pad)
        ax.set_xlabel(f"reference {band} [mag]")
        ax.set_ylabel("ref - mean inst [mag]")
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
        summary.append(f"{band} {zero_point:.3f} mag ({len(ref):,} stars)")
    return Plot(
        "ref_vs_mag", "Reference minus instrumental magnitude against reference magnitude",
        "For every star matched to the reference catalog, its reference magnitude minus its "
        "mean instrumental magnitude in the band (one point per star, at most "
        f"~{_MAX_POINTS_SHOWN:,} drawn per band), with the running median of all of them. "
        "The level is the zero point a calibration run will solve for; it should be "
        "flat with magnitude, widening at the faint end only. A slope means non-linearity, "
        "a background error or a missing colour term; a bright-end turn-off means "
        "saturation. Median offset per band: " + (", ".join(summary) or "none") + ".",
        figure)


def _versus_position(catalog: ReportCatalog, offsets: np.ndarray, view: SkyView) -> Plot:
    matched = np.isfinite(offsets).any(axis=1)
    coarse = choose_view(catalog.star_ra[matched], catalog.star_dec[matched])
    # the field's own projection, at the resolution the matched stars can fill
    ref_view = dataclasses.replace(view, nside=min(view.nside, coarse.nside))
    import healpy as hp

    pixel = hp.ang2pix(ref_view.nside, catalog.star_ra, catalog.star_dec, nest=True,
                       lonlat=True)
    maps, titles = [], []
    for band_index, band in enumerate(catalog.bands):  # loop over bands
        offset = offsets[:, band_index]
        ok = np.isfinite(offset)
        if not ok.any():
            maps.append(SkyMap(np.zeros(0, np.int64), np.zeros(0)))
            titles.append(band)
            continue
        zero_point = float(np.median(offset[ok]))
        pixels, median, _ = group_median(pixel[ok], offset[ok] - zero_point)
        maps.append(SkyMap(pixels, median))
        titles.append(f"{band}: around {zero_point:.3f} mag")
    figure = draw_band_maps(ref_view, maps, catalog.bands, "ref - inst - median [mag]",
                            cmap="RdBu_r", symmetric=True, panel_titles=titles)
    return Plot(
        "ref_vs_position", "Reference minus instrumental magnitude on the sky",
        "Median over the stars of each pixel (HEALPix nside "
        f"{ref_view.nside}) of the reference minus mean instrumental magnitude, relative to "
        "the band's median (the zero point). The spatial structure is what a calibration "
        "run will solve for beyond one zero point: look for a radial pattern or a detector "
        "grid (flat field, illumination correction), gradients (clouds, airmass) and "
        "patches that differ between bands.",
        figure)


def reference_plots(catalog: ReportCatalog, view: SkyView) -> list[Plot]:
    """The reference section's plots; empty when the snapshot has no reference stars."""
    offsets = reference_offsets(catalog)
    if offsets is None:
        return []
    return [_versus_magnitude(catalog, offsets), _versus_position(catalog, offsets, view)]
