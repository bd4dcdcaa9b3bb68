"""Per-visit trends against MJD, and the visits that stand out.

A visit stands out when one of its quantities (:data:`METRICS`) is far from the other visits
of its band: its robust z-score (:func:`streamstars.report.stats.robust_z`, median and MAD of
the band's visits) exceeds the threshold (default :data:`DEFAULT_OUTLIER_Z`) in absolute
value.  The comparison is per band because sky background, PSF size and the number of
selected stars all depend on the filter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamstars.report.catalog import ReportCatalog
from streamstars.report.plotting import Plot, band_colour, new_figure
from streamstars.report.stats import MIN_GROUP_FOR_Z, robust_z

__all__ = ["DEFAULT_OUTLIER_Z", "METRICS", "Metric", "Outlier", "find_outliers", "trend_plot"]

#: Visits whose robust z-score exceeds this (in absolute value) are listed as outliers.
DEFAULT_OUTLIER_Z = 5.0


@dataclass(frozen=True)
class Metric:
    """A per-visit quantity: catalog attribute, label and unit."""

    attribute: str
    label: str
    unit: str


#: The per-visit quantities shown and tested for outliers, in panel order.
METRICS = (
    Metric("visit_n_selected", "selected observations", ""),
    Metric("visit_delta_aper", "deltaAper", "mag"),
    Metric("visit_psf_fwhm", "PSF FWHM", "arcsec"),
    Metric("visit_sky_background", "sky background", "counts/pixel"),
)


@dataclass(frozen=True)
class Outlier:
    """One quantity of one visit that stands out from its band."""

    visit: int
    band: str
    mjd: float
    metric: str
    value: float
    band_median: float
    z: float

    @property
    def reason(self) -> str:
        """Plain-text explanation: the quantity, its value, the band median and the z-score."""
        direction = "above" if self.z > 0 else "below"
        ratio = ""
        if np.isfinite(self.band_median) and self.value * self.band_median > 0:
            ratio = f" ({self.value / self.band_median:.2g}x the median)"
        return (f"{self.metric} {self.value:.4g} is far {direction} the {self.band}-band "
                f"median {self.band_median:.4g}{ratio}: robust z = {self.z:+.1f}")


def find_outliers(catalog: ReportCatalog, threshold: float = DEFAULT_OUTLIER_Z) -> list[Outlier]:
    """Every (visit, quantity) whose robust z-score within its band exceeds ``threshold``.

    Sorted by decreasing |z|.  Bands with fewer than ``MIN_GROUP_FOR_Z`` visits that have the
    quantity are not tested.
    """
    found: list[Outlier] = []
    for metric in METRICS:  # loop over the four quantities; each is vectorised over visits
        values = getattr(catalog, metric.attribute)
        z, median = robust_z(values, catalog.visit_band)
        for i in np.flatnonzero(np.abs(np.nan_to_num(z)) > threshold):  # the few outliers
            found.append(Outlier(visit=int(catalog.visit[i]),
                                 band=catalog.bands[int(catalog.visit_band[i])],
                                 mjd=float(catalog.visit_mjd[i]), metric=metric.label,
                                 value=float(values[i]), band_median=float(median[i]),
                                 z=float(z[i])))
    found.sort(key=lambda o: -abs(o.z))
    return found


def trend_plot(catalog: ReportCatalog, outliers: list[Outlier],
               threshold: float = DEFAULT_OUTLIER_Z) -> Plot:
    """Selected observations, deltaAper, PSF FWHM and sky background against MJD."""
    figure = new_figure(10.0, 10.0, left=0.09, right=0.98, bottom=0.06, top=0.93, hspace=0.08)
    axes = figure.subplots(len(METRICS), 1, sharex=True)
    flagged = {(o.visit, o.metric) for o in outliers}
    for ax, metric in zip(axes, METRICS, strict=True):  # loop over panels and bands
        values = getattr(catalog, metric.attribute)
        for band_index, band in enumerate(catalog.bands):
            rows = catalog.band_visits(band_index)
            ax.scatter(catalog.visit_mjd[rows], values[rows], s=12,
                       color=band_colour(band, band_index), label=band)
        odd = np.array([(int(v), metric.label) in flagged for v in catalog.visit], dtype=bool)
        if odd.any():
            ax.scatter(catalog.visit_mjd[odd], values[odd], s=110, facecolors="none",
                       edgecolors="black", linewidths=1.5, label="outlier")
            for i in np.flatnonzero(odd):
                ax.annotate(str(int(catalog.visit[i])), (catalog.visit_mjd[i], values[i]),
                            textcoords="offset points", xytext=(6, 6), fontsize=7)
        ax.set_ylabel(f"{metric.label}" + (f" [{metric.unit}]" if metric.unit else ""),
                      fontsize=9)
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="x", useOffset=False)
    axes[0].legend(fontsize=8, ncols=len(catalog.bands) + 1, loc="lower left",
                   bbox_to_anchor=(0.0, 1.01))
    axes[-1].set_xlabel("MJD")
    n_flagged = len({o.visit for o in outliers})
    caption = (
        "Per-visit quantities against the exposure midpoint (MJD), coloured by band: the "
        "number of observations selected from the visit (fgcmcal's cuts), the aperture "
        "correction deltaAper (median inner minus outer aperture magnitude), the PSF FWHM "
        "and the sky background. Expect smooth trends with the night and the filter; a "
        f"circled point is an outlier (|robust z| > {threshold:g} among the visits of its "
        f"band with at least {MIN_GROUP_FOR_Z} visits), listed in the table below "
        f"({n_flagged} visit{'s' if n_flagged != 1 else ''}).")
    return Plot("trends", "Per-visit trends", caption, figure)
