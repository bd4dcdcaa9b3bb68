"""The sky corners of a visit's detectors, from its visitSummary or the ccdVisitTable.

A visitSummary row (afw ExposureCatalog) carries ``raCorners`` / ``decCorners``: the sky
positions [deg] of the four corners of the detector's bounding box (afw
``Box2D(bbox).getCorners()``: the outer edges of the corner pixels) through the visit's WCS.
Rubin's ``ccdVisitTable`` (DPDD ``CcdVisit``) carries the same four points as ``llcra``,
``llcdec``, ``ulcra``, ``ulcdec``, ``urcra``, ``urcdec``, ``lrcra``, ``lrcdec``
(``makeCcdVisitTable`` fills them from ``raCorners[:, 0..3]``).  The order of the corners
does not matter to :mod:`streamstars.footprint`, which uses them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
from astropy.io import fits

from streamstars.errors import InputFileError
from streamstars.io.visit_summary import detector_table, read_detector_table

__all__ = [
    "CCD_VISIT_CORNER_COLUMNS",
    "DetectorCorners",
    "read_ccd_visit_corners",
    "read_visit_summary_corners",
]

#: The ccdVisitTable's corner columns, (RA, Dec) of each corner.
CCD_VISIT_CORNER_COLUMNS: tuple[tuple[str, str], ...] = (
    ("llcra", "llcdec"), ("ulcra", "ulcdec"), ("urcra", "urcdec"), ("lrcra", "lrcdec"))


@dataclass(frozen=True)
class DetectorCorners:
    """The sky corners of one visit's detectors.

    Attributes:
        visit: the visit.
        detectors: detector ids (n,).
        ra, dec: corner positions [deg], shape (n, 4); NaN where the file has none.
        source: the file they were read from.
    """

    visit: int
    detectors: npt.NDArray[np.int64]
    ra: npt.NDArray[np.float64]
    dec: npt.NDArray[np.float64]
    source: str

    @property
    def complete(self) -> bool:
        """Every corner of every detector is a finite position (a detector without a WCS has
        NaN corners: its sources cannot be bounded by them)."""
        return bool(len(self.detectors)) and bool(
            np.isfinite(self.ra).all() and np.isfinite(self.dec).all())


def read_visit_summary_corners(path: str | Path) -> DetectorCorners:
    """The detector corners of a visitSummary FITS file (``raCorners``, ``decCorners``).

    Raises:
        InputFileError: the file is unreadable, not a visitSummary of one visit, or its corner
            columns are not four values per detector.
    """

    def corners(hdul: fits.HDUList, where: Path) -> DetectorCorners:
        cat = detector_table(hdul, where)
        visits = np.unique(np.asarray(cat["visit"], dtype=np.int64))
        if visits.size != 1:
            raise InputFileError(f"{where}: visitSummary holds visits {visits.tolist()}; "
                                 "expected one")
        ra = np.asarray(cat["raCorners"], dtype=np.float64).reshape(len(cat), -1)
        dec = np.asarray(cat["decCorners"], dtype=np.float64).reshape(len(cat), -1)
        if ra.shape[1] != 4 or dec.shape != ra.shape:
            raise InputFileError(f"{where}: raCorners/decCorners hold {ra.shape[1]} and "
                                 f"{dec.shape[1]} values per detector, expected 4")
        return DetectorCorners(int(visits[0]), np.asarray(cat["id"], dtype=np.int64), ra, dec,
                               str(where))

    return read_detector_table(path, corners)


def read_ccd_visit_corners(path: str | Path) -> dict[int, DetectorCorners]:
    """The detector corners of every visit of a ccdVisitTable parquet file (its visit column,
    ``detector`` and the corner columns only), by visit; empty when the table has no corner
    columns (older tables).

    Raises:
        InputFileError: the file is unreadable or lacks the visit or detector column.
    """
    path = Path(path)
    try:
        names = set(pq.read_schema(path).names)
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise InputFileError(f"{path}: cannot read the ccdVisitTable ({type(exc).__name__}: "
                             f"{exc}); re-copy or regenerate it") from exc
    corner_names = [name for pair in CCD_VISIT_CORNER_COLUMNS for name in pair]
    if not set(corner_names) <= names:
        return {}
    visit_column = next((c for c in ("visitId", "visit") if c in names), None)
    if visit_column is None or "detector" not in names:
        raise InputFileError(f"{path}: ccdVisitTable lacks its 'visitId' (or 'visit') or "
                             "'detector' column")
    try:
        table = pq.read_table(path, columns=[visit_column, "detector", *corner_names])
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise InputFileError(f"{path}: cannot read the ccdVisitTable ({type(exc).__name__}: "
                             f"{exc}); re-copy or regenerate it") from exc
    visit = table.column(visit_column).to_numpy().astype(np.int64)
    detector = table.column("detector").to_numpy().astype(np.int64)
    ra = np.stack([_floats(table, r) for r, _ in CCD_VISIT_CORNER_COLUMNS], axis=1)
    dec = np.stack([_floats(table, d) for _, d in CCD_VISIT_CORNER_COLUMNS], axis=1)
    if len(visit) == 0:
        return {}
    order = np.lexsort((detector, visit))
    visit, detector, ra, dec = visit[order], detector[order], ra[order], dec[order]
    bounds = np.flatnonzero(np.r_[True, visit[1:] != visit[:-1], True])
    return {int(visit[lo]): DetectorCorners(int(visit[lo]), detector[lo:hi], ra[lo:hi],
                                            dec[lo:hi], str(path))
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)}


def _floats(table: pa.Table, name: str) -> npt.NDArray[np.float64]:
    """A column as float64, nulls as NaN."""
    column = table.column(name)
    return np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.float64) \
        if column.null_count == 0 else \
        np.asarray(column.fill_null(np.nan).to_numpy(zero_copy_only=False), dtype=np.float64)
