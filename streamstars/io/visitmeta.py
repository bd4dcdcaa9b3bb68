"""Visit metadata readers, one module per source, behind this front.

* :mod:`streamstars.io.visit_summary` — afw ``visitSummary`` ExposureCatalog FITS, what
  fgcmcal reads (:func:`read_visit_summary`);
* :mod:`streamstars.io.visit_tables` — Rubin's ``visitTable`` + ``ccdVisitTable`` parquet
  (:func:`read_visit_tables`);
* :mod:`streamstars.io.visit_values` — explicit values, e.g. inline metadata in a Kafka event
  (:func:`metadata_from_values`).

Each gives :class:`streamstars.visit.VisitMetadata`, the fields of the visit's
fgcmVisitCatalog row (boresight, hour angle, date, exposure time, pressure, PSF and sky per
detector).  The observatory maths they share (hour angle, pixel scale from sky corners) is in
:mod:`streamstars.observatory`.  Everything works without the LSST stack.
"""

from __future__ import annotations

from streamstars.io.visit_summary import read_visit_summary
from streamstars.io.visit_tables import read_visit_tables
from streamstars.io.visit_values import metadata_from_values
from streamstars.observatory import (
    FWHM_PER_SIGMA,
    RUBIN_LONGITUDE_DEG,
    hour_angle_deg,
    pixel_scale_from_corners,
)

__all__ = [
    "FWHM_PER_SIGMA",
    "RUBIN_LONGITUDE_DEG",
    "hour_angle_deg",
    "metadata_from_values",
    "pixel_scale_from_corners",
    "read_visit_summary",
    "read_visit_tables",
]
