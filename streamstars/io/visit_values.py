"""Visit metadata from explicit values (e.g. inline metadata in a Kafka event)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from streamstars.errors import PermanentInputError
from streamstars.observatory import RUBIN_LONGITUDE_DEG, hour_angle_deg
from streamstars.visit import BAD_DETECTOR_VALUE, VisitMetadata

__all__ = ["metadata_from_values"]

_REQUIRED_KEYS = ("visit", "physical_filter", "band", "telra", "teldec", "mjd", "exptime")
_FLOAT_KEYS = ("telra", "teldec", "telha", "telrot", "mjd", "exptime", "pmb", "psf_sigma",
               "psf_fwhm", "sky_background")
_OPTIONAL_KEYS = ("telha", "telrot", "pmb", "psf_sigma", "psf_fwhm", "sky_background",
                  "detectors", "psf_fwhm_detector", "instrument", "source", "site_longitude_deg")


def metadata_from_values(values: Mapping[str, Any]) -> VisitMetadata:
    """Build :class:`VisitMetadata` from explicit values (units as in :class:`VisitMetadata`).

    Required keys: ``visit``, ``physical_filter``, ``band``, ``telra``, ``teldec`` [deg],
    ``mjd`` [MJD TAI], ``exptime`` [s].  Optional: ``telha`` [deg] (computed with
    :func:`~streamstars.observatory.hour_angle_deg` from telra, mjd and
    ``site_longitude_deg`` [deg, default Rubin] when absent or None), ``telrot`` [deg] (NaN
    when absent), ``pmb`` [mbar], ``psf_sigma`` [pix], ``psf_fwhm`` [arcsec],
    ``sky_background``, ``detectors``, ``psf_fwhm_detector`` [arcsec], ``instrument``,
    ``source`` (default ``"event"``).  None means absent.

    Raises:
        PermanentInputError: missing or unknown keys (all listed), values of the wrong type,
            or ``detectors``/``psf_fwhm_detector`` of different lengths.
    """
    given = {k: v for k, v in values.items() if v is not None}
    visit_text = f"visit {given['visit']}" if "visit" in given else "visit ?"
    _check_keys(given, visit_text)
    visit, floats, detectors, per_det, lon = _parse(given, visit_text)
    if per_det and len(per_det) != len(detectors):
        raise PermanentInputError(
            f"inline visit metadata ({visit_text}): psf_fwhm_detector has {len(per_det)} "
            f"entries but detectors has {len(detectors)}"
        )
    if not per_det:
        per_det = (BAD_DETECTOR_VALUE,) * len(detectors)
    telha = floats.get("telha")
    if telha is None:
        telha = float(hour_angle_deg(floats["telra"], floats["mjd"], lon))
    return VisitMetadata(
        visit=visit,
        physical_filter=str(given["physical_filter"]),
        band=str(given["band"]),
        telra=floats["telra"],
        teldec=floats["teldec"],
        telha=telha,
        telrot=floats.get("telrot", math.nan),
        mjd=floats["mjd"],
        exptime=floats["exptime"],
        pmb=floats.get("pmb", math.nan),
        psf_sigma=floats.get("psf_sigma", math.nan),
        psf_fwhm=floats.get("psf_fwhm", math.nan),
        sky_background=floats.get("sky_background", -1.0),
        detectors=detectors,
        psf_fwhm_detector=per_det,
        instrument=str(given.get("instrument", "")),
        source=str(given.get("source", "event")),
    )


def _check_keys(given: dict[str, Any], visit_text: str) -> None:
    """Refuse missing required keys and unknown keys, listing all of them."""
    missing = [k for k in _REQUIRED_KEYS if k not in given]
    unknown = sorted(k for k in given if k not in _REQUIRED_KEYS and k not in _OPTIONAL_KEYS)
    problems = []
    if missing:
        problems.append(f"missing required key(s) {', '.join(missing)}")
    if unknown:
        problems.append(f"unknown key(s) {', '.join(unknown)}")
    if problems:
        raise PermanentInputError(
            f"inline visit metadata ({visit_text}): {'; '.join(problems)}; allowed keys: "
            f"required {', '.join(_REQUIRED_KEYS)}, optional {', '.join(_OPTIONAL_KEYS)}"
        )


def _parse(given: dict[str, Any], visit_text: str) -> tuple[
        int, dict[str, float], tuple[int, ...], tuple[float, ...], float]:
    """(visit, the float values, detectors, psf_fwhm_detector, site longitude) of the values."""
    try:
        visit = int(given["visit"])
        if isinstance(given["visit"], bool) or visit != given["visit"]:
            raise ValueError(f"visit must be an integer, got {given['visit']!r}")
        floats = {k: float(given[k]) for k in _FLOAT_KEYS if k in given}
        detectors = tuple(int(d) for d in given.get("detectors", ()))
        per_det = tuple(float(v) for v in given.get("psf_fwhm_detector", ()))
        lon = float(given.get("site_longitude_deg", RUBIN_LONGITUDE_DEG))
    except (TypeError, ValueError) as exc:
        raise PermanentInputError(
            f"inline visit metadata ({visit_text}): bad value ({exc}); angles/times must be "
            "numbers, detectors a list of integers"
        ) from exc
    return visit, floats, detectors, per_det, lon
