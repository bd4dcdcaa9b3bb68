"""The metadata of one visit: what becomes its fgcmVisitCatalog row."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

#: Value written for per-detector quantities that are missing or bad (fgcmcal's convention).
BAD_DETECTOR_VALUE = -9999.0


@dataclass(frozen=True)
class VisitMetadata:
    """Per-visit metadata: what fgcmcal takes from the visitSummary for the visit catalog.

    Angles in degrees.

    Attributes:
        visit: visit id.
        physical_filter: physical filter of the ``referenceCCD`` detector row.
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


def detector_medians(
    psf_sigma: npt.NDArray[np.float64], fwhm: npt.NDArray[np.float64],
    sky_background: npt.NDArray[np.float64] | None,
) -> tuple[float, float, float, tuple[float, ...]]:
    """The visit values fgcmcal derives from per-detector values (one entry per detector).

    Args:
        psf_sigma: PSF sigma per detector [pixels].
        fwhm: PSF FWHM per detector [arcsec].
        sky_background: sky background per detector [counts/pixel], or None when unknown.

    Returns:
        ``(psf_sigma, psf_fwhm, sky_background, psf_fwhm_detector)``: the median PSF sigma
        over the detectors with a positive sigma (NaN if none), the median FWHM over those
        with a positive FWHM too (NaN if none), the median positive sky background (-1 if
        none), and the FWHM per detector with :data:`BAD_DETECTOR_VALUE` where it is bad.
    """
    good_sigma = np.isfinite(psf_sigma) & (psf_sigma > 0)
    good_fwhm = good_sigma & np.isfinite(fwhm) & (fwhm > 0)
    med_sigma = float(np.median(psf_sigma[good_sigma])) if good_sigma.any() else math.nan
    med_fwhm = float(np.median(fwhm[good_fwhm])) if good_fwhm.any() else math.nan
    sky = -1.0
    if sky_background is not None:
        good_sky = np.isfinite(sky_background) & (sky_background > 0)
        if good_sky.any():
            sky = float(np.median(sky_background[good_sky]))
    per_det = np.where(good_fwhm, fwhm, BAD_DETECTOR_VALUE)
    return med_sigma, med_fwhm, sky, tuple(float(v) for v in per_det)


def text_value(value: Any) -> str:
    """A text cell of a metadata file (``str`` or ASCII ``bytes``) as a stripped ``str``."""
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    return str(value).strip()
