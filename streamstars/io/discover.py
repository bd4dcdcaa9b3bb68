"""Repository discovery: find source tables and visit metadata anywhere under a directory.

Files are recognised by name pattern, but source tables and metadata are paired by the
``visit`` values *inside* the files, never by file name:

* source tables: ``sourceTable_visit*.parq*`` or legacy ``sourceTable-*.parq`` (raw
  ``SRC-*.parq`` files are not source tables); only their ``visit`` column is read (parquet
  statistics when they prove a single visit, otherwise the column alone);
* visit metadata: ``visitSummary*.fits`` (preferred, what fgcmcal uses), and pairs of
  ``visitTable*.parq*`` + ``ccdVisitTable*.parq*`` (paired by the name suffix after the
  prefix, e.g. ``visitTable_HSC.parq`` with ``ccdVisitTable_HSC.parq``; when exactly one of
  each is left unpaired they are paired together).

Unreadable files never stop discovery: each is recorded in :attr:`RepoInventory.problems`
with the file and the cause.
"""

from __future__ import annotations

import fnmatch
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from astropy.io import fits

from ..errors import StreamstarsError
from ..visit import VisitMetadata
from .visitmeta import RUBIN_LONGITUDE_DEG, read_visit_summary, read_visit_tables

__all__ = [
    "CCD_VISIT_TABLE_PATTERNS",
    "SOURCE_TABLE_PATTERNS",
    "VISIT_SUMMARY_PATTERNS",
    "VISIT_TABLE_PATTERNS",
    "DiscoveredVisit",
    "RepoInventory",
    "discover_repo",
    "is_source_table_name",
    "read_parquet_visits",
]

SOURCE_TABLE_PATTERNS: tuple[str, ...] = ("sourceTable_visit*.parq*", "sourceTable-*.parq")
VISIT_SUMMARY_PATTERNS: tuple[str, ...] = ("visitSummary*.fits",)
VISIT_TABLE_PATTERNS: tuple[str, ...] = ("visitTable*.parq*",)
CCD_VISIT_TABLE_PATTERNS: tuple[str, ...] = ("ccdVisitTable*.parq*",)


@dataclass
class DiscoveredVisit:
    """One visit found in a repository.

    Attributes:
        visit: visit id.
        source_paths: source tables holding rows of this visit (sorted).
        metadata: the visit's metadata, None when none was found or it could not be read.
        metadata_error: why ``metadata`` is None although a metadata file names this visit.
        metadata_path: the file the metadata came from (or failed to come from).
        dataset_ids: UUIDs of the Butler datasets the visit comes from (source tables and
            visitSummary, sorted; :mod:`streamstars.butler.discover`); empty for a directory.
        ccd_visit_table_path: the ccdVisitTable paired with the visitTable the metadata came
            from (None for a visitSummary or a visitTable alone): where the detectors' sky
            corners are (:mod:`streamstars.footprint`).
    """

    visit: int
    source_paths: list[Path] = field(default_factory=list)
    metadata: VisitMetadata | None = None
    metadata_error: str | None = None
    metadata_path: Path | None = None
    dataset_ids: list[str] = field(default_factory=list)
    ccd_visit_table_path: Path | None = None


@dataclass
class RepoInventory:
    """What :func:`discover_repo` found.

    Attributes:
        root: the directory searched.
        visits: every visit with source tables or metadata, keyed and ordered by visit id.
        problems: one message per file that could not be used (naming the file and cause),
            sorted.
        visits_without_metadata: visits with source tables but no usable metadata, sorted.
    """

    root: Path
    visits: dict[int, DiscoveredVisit] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    visits_without_metadata: list[int] = field(default_factory=list)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def is_source_table_name(name: str) -> bool:
    """True when a file name looks like a (post-transform) source table."""
    return _matches(name, SOURCE_TABLE_PATTERNS)


def read_parquet_visits(path: str | Path, column: str = "visit") -> np.ndarray:
    """Distinct values [int64, sorted] of the ``visit`` column of a parquet file, read cheaply.

    Row-group statistics are used when every row group proves a single value; otherwise only
    that column is read.

    Raises:
        KeyError: the file has no such column.
        OSError, pyarrow.ArrowException, ValueError: the file is unreadable (e.g. truncated)
            or the column holds nulls.
    """
    pf = pq.ParquetFile(path)
    try:
        names = pf.schema_arrow.names
        if column not in names:
            raise KeyError(f"no {column!r} column")
        md = pf.metadata
        if md.num_rows == 0:
            return np.zeros(0, dtype=np.int64)
        values: set[int] = set()
        use_stats = True
        for rg in range(md.num_row_groups):
            group = md.row_group(rg)
            if group.num_rows == 0:
                continue
            stats = None
            for ci in range(group.num_columns):
                chunk = group.column(ci)
                if chunk.path_in_schema == column:
                    stats = chunk.statistics
                    break
            if (
                stats is None
                or not stats.has_min_max
                or stats.min != stats.max
                or (stats.null_count or 0) > 0
                or not isinstance(stats.min, int)
            ):
                use_stats = False
                break
            values.add(int(stats.min))
        if use_stats:
            return np.array(sorted(values), dtype=np.int64)
        table = pf.read(columns=[column])
        arr = table.column(column)
        if arr.null_count:
            raise ValueError(f"{arr.null_count} null value(s) in {column!r}")
        return np.unique(arr.to_numpy(zero_copy_only=False).astype(np.int64))
    finally:
        pf.close()


def _fits_visits(path: Path) -> np.ndarray:
    """Distinct ``visit`` values of a visitSummary's per-detector table (HDU 1)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fits.open(path, memmap=False) as hdul:
            return np.unique(np.asarray(hdul[1].data["visit"], dtype=np.int64))


def _walk(root: Path) -> list[Path]:
    """Every regular file under ``root`` (following directory symlinks once), sorted."""
    out: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        out.extend(Path(dirpath) / f for f in filenames)
    return sorted(out)


def _suffix_key(name: str, prefix: str) -> str:
    """Name after ``prefix`` without the extension, used to pair visit/ccdVisit tables."""
    rest = name[len(prefix):]
    return re.sub(r"\.parq(uet)?$", "", rest)


def discover_repo(
    root: str | Path,
    site_longitude_deg: float = RUBIN_LONGITUDE_DEG,
    reference_ccd: int = 40,
) -> RepoInventory:
    """Find source tables and visit metadata under ``root`` and pair them by visit id.

    Args:
        root: directory to search (any layout, walked recursively).
        site_longitude_deg: observatory longitude [deg, east positive] used for the hour angle
            of visits whose metadata comes from visitTable/ccdVisitTable (visitSummary files
            carry their own site).
        reference_ccd: fgcmcal's ``referenceCCD`` for visitSummary files.

    Returns:
        A :class:`RepoInventory`.  When a visit has several metadata sources, the first
        visitSummary (sorted by path) wins, then the visitTables; the others are noted in
        ``problems``.  A parquet source table holding several visits is listed under each of
        them and noted in ``problems`` as "mixed visits".

    Raises:
        FileNotFoundError: ``root`` is not a directory.  Problems with individual files are
            never raised; they are recorded in ``problems`` / ``metadata_error``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"repository root {root} is not a directory")
    inv = RepoInventory(root=root)
    problems: list[str] = []
    summaries, visit_tables, ccd_tables = _walk_repo(inv, problems)
    for path in summaries:
        _add_visit_summary(inv, path, reference_ccd, problems)
    for vt, ccd in _pair_visit_tables(visit_tables, ccd_tables, problems):
        _add_visit_tables(inv, vt, ccd, site_longitude_deg, problems)
    inv.visits = {v: inv.visits[v] for v in sorted(inv.visits)}
    for entry in inv.visits.values():
        entry.source_paths.sort()
    inv.visits_without_metadata = [
        v for v, e in inv.visits.items() if e.source_paths and e.metadata is None
    ]
    inv.problems = sorted(problems)
    return inv


def _walk_repo(inv: RepoInventory,
               problems: list[str]) -> tuple[list[Path], list[Path], list[Path]]:
    """List every source table of the repository under its visits; return the visitSummary
    files, the visitTables and the ccdVisitTables found, each sorted by path."""
    summaries: list[Path] = []
    visit_tables: list[Path] = []
    ccd_tables: list[Path] = []
    for path in _walk(inv.root):
        name = path.name
        if is_source_table_name(name):
            _add_source_table(inv, path, problems)
        elif _matches(name, VISIT_SUMMARY_PATTERNS):
            summaries.append(path)
        elif _matches(name, CCD_VISIT_TABLE_PATTERNS):
            ccd_tables.append(path)
        elif _matches(name, VISIT_TABLE_PATTERNS):
            visit_tables.append(path)
    return summaries, visit_tables, ccd_tables


def _entry(inv: RepoInventory, visit: int) -> DiscoveredVisit:
    """The inventory's entry of ``visit``, created when absent."""
    if visit not in inv.visits:
        inv.visits[visit] = DiscoveredVisit(visit=visit)
    return inv.visits[visit]


def _add_source_table(inv: RepoInventory, path: Path, problems: list[str]) -> None:
    """List a source table under every visit it holds (a problem when unreadable, empty or
    holding several visits)."""
    try:
        visits = read_parquet_visits(path)
    except KeyError as exc:
        problems.append(f"{path}: source table unusable ({exc.args[0]})")
        return
    except (OSError, pa.ArrowException, ValueError) as exc:
        problems.append(
            f"{path}: source table unreadable ({type(exc).__name__}: {exc}); "
            "truncated or not parquet?"
        )
        return
    if visits.size == 0:
        problems.append(f"{path}: source table has no rows")
        return
    if visits.size > 1:
        problems.append(
            f"{path}: mixed visits {visits.tolist()} in one source table"
        )
    for v in visits:
        _entry(inv, int(v)).source_paths.append(path)


def _add_visit_summary(inv: RepoInventory, path: Path, reference_ccd: int,
                       problems: list[str]) -> None:
    """Read the metadata of a visitSummary (one visit) unless its visit has some already."""
    try:
        in_file = _fits_visits(path)
    except (OSError, ValueError, TypeError, KeyError, IndexError) as exc:
        problems.append(f"{path}: visitSummary unreadable ({type(exc).__name__}: {exc})")
        return
    if in_file.size != 1:
        problems.append(f"{path}: visitSummary holds visits {in_file.tolist()}, expected one")
        return
    entry = _entry(inv, int(in_file[0]))
    if entry.metadata is not None or entry.metadata_error is not None:
        problems.append(
            f"{path}: second metadata file for visit {entry.visit} ignored "
            f"(using {entry.metadata_path})"
        )
        return
    entry.metadata_path = path
    try:
        entry.metadata = read_visit_summary(path, reference_ccd=reference_ccd)
    except StreamstarsError as exc:
        entry.metadata_error = str(exc)
        problems.append(str(exc))


def _pair_visit_tables(visit_tables: list[Path], ccd_tables: list[Path],
                       problems: list[str]) -> list[tuple[Path, Path | None]]:
    """visitTable + ccdVisitTable pairs (by name suffix; the last unpaired one of each are
    paired together), sorted by visitTable path; a visitTable left alone has no ccd table."""
    ccd_by_key = {_suffix_key(p.name, "ccdVisitTable"): p for p in ccd_tables}
    pairs: list[tuple[Path, Path | None]] = []
    unpaired_vt: list[Path] = []
    for vt in visit_tables:
        ccd = ccd_by_key.pop(_suffix_key(vt.name, "visitTable"), None)
        if ccd is None:
            unpaired_vt.append(vt)
        else:
            pairs.append((vt, ccd))
    if len(unpaired_vt) == 1 and len(ccd_by_key) == 1:
        pairs.append((unpaired_vt.pop(), ccd_by_key.popitem()[1]))
    for vt in unpaired_vt:
        problems.append(f"{vt}: no matching ccdVisitTable; per-detector PSF values unknown")
        pairs.append((vt, None))
    for ccd in ccd_by_key.values():
        problems.append(f"{ccd}: ccdVisitTable without a matching visitTable, ignored")
    return sorted(pairs, key=lambda p: str(p[0]))


def _add_visit_tables(inv: RepoInventory, vt: Path, ccd: Path | None,
                      site_longitude_deg: float, problems: list[str]) -> None:
    """Give the visits of a visitTable pair their metadata where no visitSummary (or earlier
    table) did; a failed visitSummary is replaced (noted in ``problems``)."""
    try:
        table_meta = read_visit_tables(vt, ccd, site_longitude_deg=site_longitude_deg)
    except StreamstarsError as exc:
        problems.append(str(exc))
        return
    for visit, meta in sorted(table_meta.items()):
        entry = _entry(inv, visit)
        if entry.metadata is not None:
            continue  # visitSummary (or an earlier table) already provides it
        if entry.metadata_error is not None:
            problems.append(
                f"visit {visit}: using {vt} because {entry.metadata_path} failed"
            )
            entry.metadata_error = None
        entry.metadata = meta
        entry.metadata_path = vt
        entry.ccd_visit_table_path = ccd
