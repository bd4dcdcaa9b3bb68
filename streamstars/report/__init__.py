"""``streamstars report``: a self-contained HTML quality-assurance page of a store.

One concept per module:

* :mod:`~streamstars.report.inputs` — what the report reads: a snapshot's parquet files
  (column projection) and, from the store, the per-visit facts a snapshot lacks (band,
  selected observations).  The only module that opens the store.
* :mod:`~streamstars.report.catalog` — the loaded data joined into per-observation arrays
  (band, owning star, position) that every section uses.
* :mod:`~streamstars.report.stats` — vectorised grouped medians and robust z-scores.
* :mod:`~streamstars.report.plotting` — the optional plotting libraries (matplotlib, skyproj)
  and the :class:`~streamstars.report.plotting.Plot` a section returns.
* :mod:`~streamstars.report.skymaps` — HEALPix maps per band on a projection suited to the
  footprint.
* :mod:`~streamstars.report.trends` — per-visit trends against MJD and the outlier visits.
* :mod:`~streamstars.report.distributions` — observations per star, magnitudes, positions.
* :mod:`~streamstars.report.reference` — reference minus instrumental magnitudes.
* :mod:`~streamstars.report.page` — the HTML page.
* :mod:`~streamstars.report.build` — :func:`build_report`, which runs all of the above.

The page and its contents are described in docs/report.md.
"""

from __future__ import annotations

from streamstars.report.build import ReportSummary, build_report

__all__ = ["ReportSummary", "build_report"]
