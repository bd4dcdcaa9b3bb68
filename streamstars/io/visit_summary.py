"""Visit metadata from an afw ``visitSummary`` ExposureCatalog FITS file, as fgcmcal reads it.

Only astropy is needed.  HDU 1 is the per-detector table (``id`` = detector, ``visit``,
``physical_filter``, ``band``, ``psfSigma``, ``skyBg``, sky corners, bounding box, ...;
``visitInfo`` is an integer reference into the archive).  ``ARCHIVE_INDEX`` maps a reference
id to (``cat.archive`` = which archive HDU, ``row0``, ``name``), and the ``VisitInfo`` archive
HDU holds the boresight, the date (``tai``, ns since 1970-01-01 TAI), the exposure time, the
Earth rotation angle, the site and the weather.  The hour angle and the detector pixel scales
come from :mod:`streamstars.observatory`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from astropy.io import fits

from streamstars.errors import InputFileError
from streamstars.observatory import (
    FWHM_PER_SIGMA,
    hour_angle_deg,
    pixel_scale_from_corners,
    wrap180,
)
from streamstars.visit import VisitMetadata, detector_medians, text_value

__all__ = ["detector_table", "read_detector_table", "read_visit_summary"]

#: MJD of 1970-01-01 (the epoch of afw's ``tai`` nanosecond counter).
_MJD_UNIX_EPOCH = 40587.0
_NS_PER_DAY = 86400e9

_ARCHIVE_TYPES = ("ARCHIVE_INDEX", "ARCHIVE_DATA")
_SUMMARY_REQUIRED = (
    "id",
    "visit",
    "physical_filter",
    "band",
    "psfSigma",
    "skyBg",
    "raCorners",
    "decCorners",
    "bbox_min_x",
    "bbox_min_y",
    "bbox_max_x",
    "bbox_max_y",
    "visitInfo",
)
_T = TypeVar("_T")
_VISITINFO_REQUIRED = ("exposuretime", "tai", "boresightradec_ra", "boresightradec_dec")


def read_visit_summary(path: str | Path, reference_ccd: int = 40) -> VisitMetadata:
    """Read one visit's metadata from an afw ``visitSummary`` ExposureCatalog FITS file.

    The VisitInfo (boresight, date, exposure time, weather, ERA, site) is taken from the
    archive object referenced by the ``referenceCCD`` row (fallback: first row, then any row
    with a VisitInfo), as fgcmcal does; ``physical_filter`` and ``band`` come from the same
    row.

    Args:
        path: the visitSummary FITS file.
        reference_ccd: detector id whose row provides physical_filter and VisitInfo.

    Returns:
        The :class:`VisitMetadata`: telra/teldec/telrot [deg], telha [deg] (``ERA + longitude -
        RA``; computed with :func:`~streamstars.observatory.hour_angle_deg` when the ERA is
        NaN), mjd (TAI midpoint) [days], exptime [s], pmb [mbar], psf_sigma [pix], psf_fwhm
        and psf_fwhm_detector [arcsec], sky_background [counts/pix], detectors (``id`` values,
        file order).

    Raises:
        InputFileError: the file is missing, not FITS, truncated, or lacks a required HDU or
            column.
    """
    return read_detector_table(
        path, lambda hdul, where: _read_visit_summary(hdul, where, reference_ccd))


def read_detector_table(path: str | Path, reader: Callable[[fits.HDUList, Path], _T]) -> _T:
    """``reader(hdul, path)`` of the open visitSummary FITS file ``path``, with the file's
    problems turned into :class:`InputFileError` naming it (missing, not FITS, truncated or
    with an invalid header, a missing HDU or column).

    Raises:
        InputFileError: as above, also for what ``reader`` raises of ``OSError``,
            ``ValueError``, ``TypeError``, ``KeyError``, ``IndexError``, ``AttributeError``.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with fits.open(path, memmap=False, lazy_load_hdus=False) as hdul:
                problems = [
                    str(w.message).splitlines()[0]
                    for w in caught
                    if "truncated" in str(w.message) or "Error validating header" in str(w.message)
                ]
                if problems:
                    raise InputFileError(
                        f"{path}: visitSummary FITS file is truncated or corrupt ({problems[0]}); "
                        "re-copy or regenerate it"
                    )
                return reader(hdul, path)
    except InputFileError:
        raise
    except FileNotFoundError as exc:
        raise InputFileError(f"{path}: visitSummary file not found ({exc})") from exc
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise InputFileError(
            f"{path}: cannot read as an afw visitSummary FITS file "
            f"({type(exc).__name__}: {exc}); the file may be truncated or of another format: "
            "re-copy or regenerate it"
        ) from exc


def _read_visit_summary(hdul: fits.HDUList, path: Path, reference_ccd: int) -> VisitMetadata:
    """The metadata of the open visitSummary ``hdul`` (see :func:`read_visit_summary`)."""
    cat = detector_table(hdul, path)
    det_ids = np.asarray(cat["id"], dtype=np.int64)
    visits = np.unique(np.asarray(cat["visit"], dtype=np.int64))
    if visits.size != 1:
        raise InputFileError(
            f"{path}: visitSummary holds several visits {visits.tolist()}; expected one"
        )
    visit = int(visits[0])
    ref_rows = np.flatnonzero(det_ids == reference_ccd)
    ref_row = int(ref_rows[0]) if ref_rows.size else 0
    physical_filter = text_value(cat["physical_filter"][ref_row])
    band = text_value(cat["band"][ref_row])
    vi_refs = np.asarray(cat["visitInfo"], dtype=np.int64)
    order = np.concatenate([[ref_row], np.arange(len(cat))])
    vi_hdu, vi_row = _find_visit_info_row(hdul, vi_refs[order], path, visit)
    visit_info = _visit_info(vi_hdu.data, vi_row, path, visit)
    return VisitMetadata(visit=visit, physical_filter=physical_filter, band=band, **visit_info,
                         **_psf_and_sky(cat), detectors=tuple(int(d) for d in det_ids),
                         source=str(path))


def detector_table(hdul: fits.HDUList, path: Path) -> fits.FITS_rec:
    """The per-detector catalog (first binary table that is not part of the archive), with
    every column the metadata needs."""
    for hdu in hdul[1:]:
        if not isinstance(hdu, fits.BinTableHDU):
            continue
        if str(hdu.header.get("EXTTYPE", "")).strip() in _ARCHIVE_TYPES:
            continue
        cat = hdu.data
        break
    else:
        raise InputFileError(
            f"{path}: no per-detector table HDU found; is this an afw visitSummary "
            "ExposureCatalog?"
        )
    if cat is None or len(cat) == 0:
        raise InputFileError(f"{path}: the visitSummary has no detector rows")
    missing = [c for c in _SUMMARY_REQUIRED if c not in cat.columns.names]
    if missing:
        raise InputFileError(
            f"{path}: visitSummary lacks column(s) {', '.join(missing)}; is it an afw "
            "visitSummary ExposureCatalog? Regenerate it"
        )
    return cat


def _find_visit_info_row(
    hdul: fits.HDUList, ref_ids: npt.NDArray[np.int64], path: Path, visit: int
) -> tuple[fits.BinTableHDU, int]:
    """Locate the VisitInfo archive row referenced by the first usable id of ``ref_ids``.

    ``ARCHIVE_INDEX`` maps an archive id to (``cat.archive``, ``row0``); ``cat.archive`` is the
    ``AR_CATN`` header value of the archive data HDU holding the object.
    """
    index, by_catn = _archive(hdul, path, visit)
    ids = np.asarray(index["id"], dtype=np.int64)
    names = np.array([text_value(n) for n in index["name"]])
    for ref in ref_ids:
        if ref <= 0:
            continue
        hit = np.flatnonzero((ids == ref) & (names == "VisitInfo"))
        if hit.size == 0:
            continue
        catn = int(index["cat.archive"][hit[0]])
        row0 = int(index["row0"][hit[0]])
        hdu = by_catn.get(catn)
        if hdu is not None and row0 < len(hdu.data):
            return hdu, row0
    if not any(str(h.header.get("AR_NAME", "")).strip() == "VisitInfo" for h in by_catn.values()):
        raise InputFileError(
            f"{path} (visit {visit}): no VisitInfo archive HDU; the visitSummary cannot provide "
            "the boresight and date (regenerate it)"
        )
    raise InputFileError(
        f"{path} (visit {visit}): no detector row references a VisitInfo object in the "
        "archive; the visitSummary cannot provide the boresight and date (regenerate it)"
    )


def _archive(hdul: fits.HDUList, path: Path,
             visit: int) -> tuple[fits.FITS_rec, dict[int, fits.BinTableHDU]]:
    """The ``ARCHIVE_INDEX`` table and the archive data HDUs by their ``AR_CATN``."""
    index_hdu = None
    by_catn: dict[int, fits.BinTableHDU] = {}
    for hdu in hdul[1:]:
        if not isinstance(hdu, fits.BinTableHDU):
            continue
        exttype = str(hdu.header.get("EXTTYPE", "")).strip()
        if exttype == "ARCHIVE_INDEX" or str(hdu.header.get("EXTNAME", "")) == "ARCHIVE_INDEX":
            index_hdu = hdu
        elif exttype == "ARCHIVE_DATA" and "AR_CATN" in hdu.header:
            by_catn[int(hdu.header["AR_CATN"])] = hdu
    if index_hdu is None:
        raise InputFileError(
            f"{path} (visit {visit}): no ARCHIVE_INDEX HDU; the file is not a complete "
            "visitSummary (regenerate it)"
        )
    for name in ("id", "cat.archive", "row0", "name"):
        if name not in index_hdu.data.columns.names:
            raise InputFileError(
                f"{path} (visit {visit}): ARCHIVE_INDEX lacks column {name!r}; "
                "regenerate the visitSummary"
            )
    return index_hdu.data, by_catn


def _visit_info(vi: fits.FITS_rec, row: int, path: Path, visit: int) -> dict[str, Any]:
    """The VisitMetadata fields of one VisitInfo archive row: boresight, hour angle, date,
    exposure time, pressure, instrument."""
    vi_cols = vi.columns.names
    missing = [c for c in _VISITINFO_REQUIRED if c not in vi_cols]
    if missing:
        raise InputFileError(
            f"{path} (visit {visit}): VisitInfo lacks column(s) {', '.join(missing)}"
        )

    def vi_float(name: str) -> float:
        return float(vi[name][row]) if name in vi_cols else math.nan

    telra = math.degrees(vi_float("boresightradec_ra"))
    mjd = int(vi["tai"][row]) / _NS_PER_DAY + _MJD_UNIX_EPOCH
    era_deg = math.degrees(vi_float("era"))
    lon_deg = math.degrees(vi_float("longitude"))
    if math.isfinite(era_deg):
        telha = float(wrap180(era_deg + lon_deg - telra))
    else:
        telha = float(hour_angle_deg(telra, mjd, lon_deg))
    instrument = ""
    if "instrumentlabel" in vi_cols:
        try:
            instrument = "".join(text_value(c) for c in np.ravel(vi["instrumentlabel"][row]))
        except (TypeError, ValueError, IndexError):
            instrument = ""
    return {"telra": telra, "teldec": math.degrees(vi_float("boresightradec_dec")),
            "telha": telha, "telrot": math.degrees(vi_float("boresightrotangle")), "mjd": mjd,
            "exptime": vi_float("exposuretime"), "pmb": vi_float("airpressure") / 100.0,
            "instrument": instrument}


def _psf_and_sky(cat: fits.FITS_rec) -> dict[str, Any]:
    """The VisitMetadata fields of the PSF sigma and FWHM (from the pixel scale of the sky
    corners) and the sky background of the detectors
    (:func:`~streamstars.visit.detector_medians`)."""
    psf_sigma = np.asarray(cat["psfSigma"], dtype=np.float64)
    nx = np.asarray(cat["bbox_max_x"], dtype=np.float64) - cat["bbox_min_x"] + 1.0
    ny = np.asarray(cat["bbox_max_y"], dtype=np.float64) - cat["bbox_min_y"] + 1.0
    scale = pixel_scale_from_corners(
        np.asarray(cat["raCorners"], dtype=np.float64).reshape(len(cat), -1),
        np.asarray(cat["decCorners"], dtype=np.float64).reshape(len(cat), -1),
        nx,
        ny,
    )
    fwhm = psf_sigma * scale * FWHM_PER_SIGMA
    medians = detector_medians(psf_sigma, fwhm, np.asarray(cat["skyBg"], dtype=np.float64))
    return dict(zip(("psf_sigma", "psf_fwhm", "sky_background", "psf_fwhm_detector"), medians,
                    strict=True))
