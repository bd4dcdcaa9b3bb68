"""The metadata of one visit: what becomes its fgcmVisitCatalog row."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

#: Value written for per-detector quantities that are missing or bad (fgcmcal's convention).
BAD_DETECTOR_VALUE = -9999.0


@dataclass(frozen=True)
class VisitMetadata:
    """Per-visit metadata (reference §1.2).  Angles in degrees.

    Attributes:
        visit: visit id.
        physical_filter: physical filter of the reference detector row.
        band: band recorded with the visit (``physicalFilterMap`` may override it).
        telra, teldec: boresight RA/Dec [deg].
        telha: boresight hour angle [deg], wrapped to [-180, 180).
        telrot: boresight rotation angle [deg].
        mjd: exposure midpoint, MJD (TAI) [days].
        exptime: exposure time [s].
        pmb: air pressure [mbar]; NaN when unknown.
        psf_sigma: median PSF sigma over good detectors [pixels].
        psf_fwhm: median PSF FWHM [arcsec].
        sky_background: median sky background [counts/pixel]; -1 when none.
        detectors: detector ids that have metadata.
        psf_fwhm_detector: PSF FWHM per entry of ``detectors`` [arcsec], -9999 where bad.
        instrument: instrument name when known.
        source: where the metadata came from (file path or "event").
    """

    visit: int
    physical_filter: str
    band: str
    telra: float
    teldec: float
    telha: float
    telrot: float
    mjd: float
    exptime: float
    pmb: float = math.nan
    psf_sigma: float = math.nan
    psf_fwhm: float = math.nan
    sky_background: float = -1.0
    detectors: tuple[int, ...] = field(default_factory=tuple)
    psf_fwhm_detector: tuple[float, ...] = field(default_factory=tuple)
    instrument: str = ""
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (NaN written as null)."""
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, float) and math.isnan(value):
                out[key] = None
            elif isinstance(value, tuple):
                out[key] = list(value)
        return out

    def to_json(self) -> str:
        """Canonical JSON (sorted keys) of the metadata."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VisitMetadata:
        """Inverse of :meth:`to_dict`."""
        kwargs = dict(data)
        for f in dataclasses.fields(cls):
            if f.name in kwargs and kwargs[f.name] is None:
                kwargs[f.name] = math.nan
        kwargs["detectors"] = tuple(int(d) for d in kwargs.get("detectors", ()))
        kwargs["psf_fwhm_detector"] = tuple(float(v) for v in kwargs.get("psf_fwhm_detector", ()))
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> VisitMetadata:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))
