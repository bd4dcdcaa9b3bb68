"""Visit metadata from Rubin's ``visitTable`` and ``ccdVisitTable`` parquet files (DPDD ``Visit``
and ``CcdVisit``).

These tables lack the hour angle and the air pressure: the hour angle follows from the
boresight RA, the MJD and the observatory's longitude
(:func:`streamstars.observatory.hour_angle_deg`); the pressure is NaN (fgcm substitutes its
standard).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

from streamstars.errors import InputFileError
from streamstars.observatory import FWHM_PER_SIGMA, RUBIN_LONGITUDE_DEG, hour_angle_deg
from streamstars.visit import VisitMetadata, detector_medians, text_value

__all__ = ["read_visit_tables"]

FloatArray = npt.NDArray[np.float64]


def read_visit_tables(
    visit_table_path: str | Path,
    ccd_visit_table_path: str | Path | None,
    site_longitude_deg: float = RUBIN_LONGITUDE_DEG,
) -> dict[int, VisitMetadata]:
    """Read visit metadata from Rubin's ``visitTable`` and ``ccdVisitTable`` parquet files.

    visitTable columns used: ``visit`` (or ``visitId``), ``physical_filter``, ``band``, ``ra``,
    ``dec`` (or ``decl``) [deg], ``expTime`` [s], ``expMidptMJD`` (or ``obsStartMJD`` + half the
    exposure) [MJD, taken as TAI like afw's ``getDate()``], optional ``skyRotation`` [deg]
    (NaN when absent).  ccdVisitTable columns: ``visitId`` (or ``visit``), ``detector``,
    ``psfSigma`` [pix], optional ``seeing`` [FWHM arcsec], ``pixelScale`` [arcsec/pix],
    ``skyBg``.  A detector's PSF FWHM is ``seeing`` when present, else
    ``psfSigma * pixelScale * sqrt(8 ln 2)``.  There is no pressure (pmb = NaN); the hour angle
    is :func:`~streamstars.observatory.hour_angle_deg` of the boresight RA, the MJD and
    ``site_longitude_deg``.

    Args:
        visit_table_path: the visitTable parquet file.
        ccd_visit_table_path: the ccdVisitTable parquet file, or None (then no per-detector
            values: psf_sigma/psf_fwhm NaN, sky_background -1, no detectors).
        site_longitude_deg: observatory longitude, east positive [deg] (default Rubin).

    Returns:
        ``{visit: VisitMetadata}`` for every row of the visitTable; detectors sorted by id.

    Raises:
        InputFileError: a file is unreadable, lacks a required column, or repeats a visit.
    """
    vpath = Path(visit_table_path)
    visits = _VisitRows.read(vpath, site_longitude_deg)
    if ccd_visit_table_path is None:
        return _metadata(visits, _DetectorRows.none(), str(vpath))
    cpath = Path(ccd_visit_table_path)
    return _metadata(visits, _DetectorRows.read(cpath), f"{vpath} + {cpath}")


@dataclass(frozen=True)
class _VisitRows:
    """The visitTable's columns, one row per visit (angles in degrees, MJD TAI)."""

    visit: npt.NDArray[np.int64]
    physical_filter: np.ndarray
    band: np.ndarray
    ra: FloatArray
    dec: FloatArray
    telha: FloatArray
    rotation: FloatArray
    mjd: FloatArray
    exptime: FloatArray

    @classmethod
    def read(cls, path: Path, site_longitude_deg: float) -> _VisitRows:
        """The rows of the visitTable ``path`` (InputFileError when unusable)."""
        columns = _parquet_columns(path, "visitTable")
        c_visit = _pick(columns, ("visit", "visitId"), path, "visitTable")
        c_filter = _pick(columns, ("physical_filter",), path, "visitTable")
        c_band = _pick(columns, ("band",), path, "visitTable")
        c_ra = _pick(columns, ("ra",), path, "visitTable")
        c_dec = _pick(columns, ("dec", "decl"), path, "visitTable")
        c_exp = _pick(columns, ("expTime",), path, "visitTable")
        _pick(columns, ("expMidptMJD", "obsStartMJD"), path, "visitTable")
        c_mid = "expMidptMJD" if "expMidptMJD" in columns else None
        c_start = "obsStartMJD" if "obsStartMJD" in columns else None
        c_rot = "skyRotation" if "skyRotation" in columns else None
        wanted = [c_visit, c_filter, c_band, c_ra, c_dec, c_exp]
        wanted += [c for c in (c_mid, c_start, c_rot) if c is not None]
        table = _read_parquet(path, wanted, "visitTable")
        n = len(table[c_visit])
        visit_ids = np.asarray(table[c_visit], dtype=np.int64)
        uniq, counts = np.unique(visit_ids, return_counts=True)
        if np.any(counts > 1):
            dup = uniq[counts > 1][:10].tolist()
            raise InputFileError(f"{path}: visitTable repeats visit(s) {dup}; fix the table")
        ra = np.asarray(table[c_ra], dtype=np.float64)
        exptime = np.asarray(table[c_exp], dtype=np.float64)
        mjd = _float_or_nan(table, c_mid, n)
        start = _float_or_nan(table, c_start, n)
        mjd = np.where(np.isfinite(mjd), mjd, start + exptime / 2.0 / 86400.0)
        return cls(visit=visit_ids, physical_filter=table[c_filter], band=table[c_band], ra=ra,
                   dec=np.asarray(table[c_dec], dtype=np.float64),
                   telha=hour_angle_deg(ra, mjd, site_longitude_deg),
                   rotation=_float_or_nan(table, c_rot, n), mjd=mjd, exptime=exptime)


@dataclass(frozen=True)
class _DetectorRows:
    """The ccdVisitTable's per-detector values, sorted by (visit, detector)."""

    visit: npt.NDArray[np.int64]
    detector: npt.NDArray[np.int64]
    psf_sigma: FloatArray
    fwhm: FloatArray
    sky: FloatArray | None

    @classmethod
    def none(cls) -> _DetectorRows:
        """No per-detector values (no ccdVisitTable)."""
        empty = np.zeros(0, dtype=np.int64)
        return cls(empty, empty, np.zeros(0), np.zeros(0), None)

    @classmethod
    def read(cls, path: Path) -> _DetectorRows:
        """The rows of the ccdVisitTable ``path`` (InputFileError when unusable)."""
        columns = _parquet_columns(path, "ccdVisitTable")
        c_visit = _pick(columns, ("visitId", "visit"), path, "ccdVisitTable")
        c_det = _pick(columns, ("detector",), path, "ccdVisitTable")
        c_sigma = _pick(columns, ("psfSigma",), path, "ccdVisitTable")
        optional = [c for c in ("seeing", "pixelScale", "skyBg") if c in columns]
        table = _read_parquet(path, [c_visit, c_det, c_sigma, *optional], "ccdVisitTable")
        visit = np.asarray(table[c_visit], dtype=np.int64)
        detector = np.asarray(table[c_det], dtype=np.int64)
        order = np.lexsort((detector, visit))
        psf_sigma = np.asarray(table[c_sigma], dtype=np.float64)[order]
        if "seeing" in table:
            fwhm = np.asarray(table["seeing"], dtype=np.float64)[order]
        else:
            scale = _float_or_nan(table, "pixelScale" if "pixelScale" in table else None,
                                  len(visit))[order]
            fwhm = psf_sigma * scale * FWHM_PER_SIGMA
        sky = np.asarray(table["skyBg"], dtype=np.float64)[order] if "skyBg" in table else None
        return cls(visit[order], detector[order], psf_sigma, fwhm, sky)


def _metadata(visits: _VisitRows, detectors: _DetectorRows,
              source: str) -> dict[int, VisitMetadata]:
    """One VisitMetadata per visit row, in visit order, with its detectors' values."""
    out: dict[int, VisitMetadata] = {}
    lo = np.searchsorted(detectors.visit, visits.visit, side="left")
    hi = np.searchsorted(detectors.visit, visits.visit, side="right")
    for i in np.argsort(visits.visit, kind="stable"):
        rows = slice(int(lo[i]), int(hi[i]))
        med_sigma, med_fwhm, sky, per_det = detector_medians(
            detectors.psf_sigma[rows], detectors.fwhm[rows],
            None if detectors.sky is None else detectors.sky[rows])
        visit = int(visits.visit[i])
        out[visit] = VisitMetadata(
            visit=visit,
            physical_filter=text_value(visits.physical_filter[i]),
            band=text_value(visits.band[i]),
            telra=float(visits.ra[i]),
            teldec=float(visits.dec[i]),
            telha=float(visits.telha[i]),
            telrot=float(visits.rotation[i]),
            mjd=float(visits.mjd[i]),
            exptime=float(visits.exptime[i]),
            pmb=math.nan,
            psf_sigma=med_sigma,
            psf_fwhm=med_fwhm,
            sky_background=sky,
            detectors=tuple(int(d) for d in detectors.detector[rows]),
            psf_fwhm_detector=per_det,
            source=source,
        )
    return out


def _parquet_columns(path: Path, what: str) -> list[str]:
    """Column names of a parquet file, or InputFileError."""
    try:
        return list(pq.read_schema(path).names)
    except FileNotFoundError as exc:
        raise InputFileError(f"{path}: {what} not found") from exc
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise InputFileError(
            f"{path}: cannot read {what} as parquet ({type(exc).__name__}: {exc}); the file "
            "may be truncated: re-copy or regenerate it"
        ) from exc


def _pick(columns: list[str], candidates: tuple[str, ...], path: Path, what: str) -> str:
    """First of ``candidates`` present in ``columns``, or InputFileError naming them."""
    for name in candidates:
        if name in columns:
            return name
    raise InputFileError(
        f"{path}: {what} lacks required column {' or '.join(repr(c) for c in candidates)}"
    )


def _read_parquet(path: Path, columns: list[str], what: str) -> dict[str, np.ndarray]:
    """Read the given columns as numpy arrays, or InputFileError."""
    try:
        table = pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise InputFileError(
            f"{path}: cannot read {what} ({type(exc).__name__}: {exc}); the file may be "
            "truncated: re-copy or regenerate it"
        ) from exc
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in columns}


def _float_or_nan(data: dict[str, np.ndarray], name: str | None, n: int) -> FloatArray:
    if name is None:
        return np.full(n, np.nan)
    return np.asarray(data[name], dtype=np.float64)
