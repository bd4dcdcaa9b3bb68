"""Distributions: observations per star per band, magnitudes, member positions around stars."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from streamstars.report.catalog import ReportCatalog
from streamstars.report.plotting import Plot, band_colour, new_figure, no_data

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["distribution_plots", "member_offsets_arcsec"]


def member_offsets_arcsec(catalog: ReportCatalog) -> tuple[np.ndarray, np.ndarray]:
    """Offset of every observation from its star: (dRA cos Dec, dDec) in arcseconds.

    Small-angle (tangent-plane) offsets; RA differences are wrapped into [-180, 180).
    """
    star_ra = catalog.star_ra[catalog.obs_star]
    star_dec = catalog.star_dec[catalog.obs_star]
    d_ra = (catalog.obs_ra - star_ra + 180.0) % 360.0 - 180.0
    return (d_ra * np.cos(np.deg2rad(star_dec)) * 3600.0,
            (catalog.obs_dec - star_dec) * 3600.0)


def _band_histograms(catalog: ReportCatalog, per_band: list[np.ndarray], bins: list[float],
                     counted: str, xlabel: str, ylabel: str) -> tuple[Figure, Any]:
    """A figure with one axes: a step histogram of ``per_band[i]``, the values of the
    catalog's ``i``-th band, for every band that has any (labelled ``"<band> (<count><counted>)"``,
    e.g. ``counted=" stars"``), the axes labelled and gridded.

    Returns:
        The figure and its axes (the caller adds the legend, or marks an empty plot).
    """
    figure = new_figure(7.5, 4.2, left=0.11, right=0.97, bottom=0.13, top=0.96)
    ax = figure.subplots()
    for band_index, band in enumerate(catalog.bands):  # loop over bands
        values = per_band[band_index]
        if len(values):
            ax.hist(values, bins=bins, histtype="step", linewidth=1.5,
                    color=band_colour(band, band_index), label=f"{band} ({len(values):,}{counted})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return figure, ax


def _nobs_plot(catalog: ReportCatalog) -> Plot:
    top = int(catalog.counts.max()) if catalog.counts.size else 0
    per_band = [counts[counts > 0] for counts in catalog.counts.T]  # (n_bands, n_stars)
    figure, ax = _band_histograms(catalog, per_band, np.arange(0.5, top + 1.5).tolist(),
                                  " stars", "observations of the star in the band", "stars")
    medians = [f"{band} {np.median(counts):.0f}"
               for band, counts in zip(catalog.bands, per_band, strict=True) if len(counts)]
    if not medians:
        no_data(ax, "no stars")
    else:
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    return Plot(
        "dist_nobs", "Observations per star per band",
        "How many observations each star has in each band (stars without any in a band are "
        "left out of that band). The distribution should peak near the number of visits "
        "covering a point of the field; a pile-up at 1-2 means stars seen once (edges, "
        "isolated visits) that constrain the calibration little. Median per band: "
        + (", ".join(medians) if medians else "none") + ".",
        figure)


def _magnitude_plot(catalog: ReportCatalog) -> Plot:
    finite = np.isfinite(catalog.obs_mag)
    bins: list[float] = []
    if finite.any():
        low, high = np.percentile(catalog.obs_mag[finite], [0.1, 99.9])
        bins = np.linspace(low, high, 61).tolist()
    per_band = [catalog.obs_mag[finite & (catalog.obs_band == band_index)]
                for band_index in range(len(catalog.bands))]
    figure, ax = _band_histograms(catalog, per_band, bins, "",
                                  "instrumental magnitude [-2.5 log10(counts/s)]", "observations")
    if finite.any():
        ax.legend(fontsize=8)
    else:
        no_data(ax, "no observations")
    return Plot(
        "dist_mag", "Magnitude histograms",
        "Instrumental magnitudes (per second of exposure) of the observations of the stars, "
        "per band. The bright end is set by the S/N <= 1000 cut and saturation, the faint "
        "end by the S/N >= 10 cut; the turnover shows the depth. A second peak or a "
        "truncated edge points to a band whose visits differ (exposure time, zero point).",
        figure)


def _position_plot(catalog: ReportCatalog) -> Plot:
    figure = new_figure(10.0, 4.4, left=0.07, right=0.98, bottom=0.13, top=0.92, wspace=0.25)
    left, right = figure.subplots(1, 2)
    radius = catalog.match_radius_arcsec
    d_ra, d_dec = member_offsets_arcsec(catalog)
    separation = np.hypot(d_ra, d_dec)
    summary = []
    if len(separation):
        from matplotlib.colors import LogNorm

        edges = np.linspace(-radius, radius, 81)
        left.hist2d(d_ra, d_dec, bins=(edges, edges), norm=LogNorm(), cmap="viridis")
        left.set_aspect("equal")
        bins = np.linspace(0.0, radius, 41).tolist()
        for band_index, band in enumerate(catalog.bands):  # loop over bands
            in_band = separation[catalog.obs_band == band_index]
            if len(in_band):
                right.hist(in_band, bins=bins, histtype="step", density=True, linewidth=1.5,
                           color=band_colour(band, band_index), label=band)
                summary.append(f"{band} {np.median(in_band) * 1000:.0f} mas")
        right.axvline(radius, color="black", linestyle="--", linewidth=1,
                      label=f"match radius {radius:g}\"")
        right.set_yscale("log")
        right.legend(fontsize=8)
    else:
        no_data(left, "no observations")
        no_data(right, "no observations")
    left.set_xlabel("dRA cos(Dec) [arcsec]")
    left.set_ylabel("dDec [arcsec]")
    left.set_title("member offsets from their star", fontsize=10)
    right.set_xlabel("separation from the star [arcsec]")
    right.set_ylabel("density")
    right.set_title("separation per band", fontsize=10)
    right.grid(alpha=0.3)
    return Plot(
        "dist_positions", "Position scatter of members around their star",
        "Left: offsets of every member observation from its star's mean position (log "
        "colour scale). It should be a round blob centred on 0: an elongated or shifted "
        "blob means an astrometric problem in some visits. Right: distance from the star "
        "per band (log scale), up to the association's match radius; mass piling up near the "
        "radius means the radius cuts into real members (or blends). Median separation per band: "
        + (", ".join(summary) if summary else "none") + ".",
        figure)


def distribution_plots(catalog: ReportCatalog) -> list[Plot]:
    """The three distribution plots of the report."""
    return [_nobs_plot(catalog), _magnitude_plot(catalog), _position_plot(catalog)]
