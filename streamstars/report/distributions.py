"""Distributions: observations per star per band, magnitudes, member positions around stars."""

from __future__ import annotations

import numpy as np

from streamstars.report.catalog import ReportCatalog
from streamstars.report.plotting import Plot, band_colour, new_figure, no_data

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


def _nobs_plot(catalog: ReportCatalog) -> Plot:
    figure = new_figure(7.5, 4.2, left=0.11, right=0.97, bottom=0.13, top=0.96)
    ax = figure.subplots()
    top = int(catalog.counts.max()) if catalog.counts.size else 0
    medians = []
    for band_index, band in enumerate(catalog.bands):  # loop over bands
        counts = catalog.counts[:, band_index]
        counts = counts[counts > 0]
        if len(counts) == 0:
            continue
        ax.hist(counts, bins=np.arange(0.5, top + 1.5).tolist(), histtype="step", linewidth=1.5,
                color=band_colour(band, band_index), label=f"{band} ({len(counts):,} stars)")
        medians.append(f"{band} {np.median(counts):.0f}")
    if not medians:
        no_data(ax, "no stars")
    else:
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set_xlabel("observations of the star in the band")
    ax.set_ylabel("stars")
    ax.grid(alpha=0.3)
    return Plot(
        "dist_nobs", "Observations per star per band",
        "How many observations each star has in each band (stars without any in a band are "
        "left out of that band). The distribution should peak near the number of visits "
        "covering a point of the field; a pile-up at 1-2 means stars seen once (edges, "
        "isolated visits) that constrain the calibration little. Median per band: "
        + (", ".join(medians) if medians else "none") + ".",
        figure)


def _magnitude_plot(catalog: ReportCatalog) -> Plot:
    figure = new_figure(7.5, 4.2, left=0.11, right=0.97, bottom=0.13, top=0.96)
    ax = figure.subplots()
    finite = np.isfinite(catalog.obs_mag)
    if finite.any():
        low, high = np.percentile(catalog.obs_mag[finite], [0.1, 99.9])
        bins = np.linspace(low, high, 61).tolist()
        for band_index, band in enumerate(catalog.bands):  # loop over bands
            mags = catalog.obs_mag[finite & (catalog.obs_band == band_index)]
            if len(mags):
                ax.hist(mags, bins=bins, histtype="step", linewidth=1.5,
                        color=band_colour(band, band_index), label=f"{band} ({len(mags):,})")
        ax.legend(fontsize=8)
    else:
        no_data(ax, "no observations")
    ax.set_xlabel("instrumental magnitude [-2.5 log10(counts/s)]")
    ax.set_ylabel("observations")
    ax.grid(alpha=0.3)
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
