"""What the report reads: a snapshot's parquet files and the store's per-visit facts.

The catalogs come from a snapshot directory (``streamstars snapshot``), read with pyarrow
column projection: only the columns a plot needs are decoded.  A snapshot lacks two per-visit
facts the report shows — the band a visit was applied as and how many of its sources were
selected — which only the store's visit records hold.  :func:`read_store` is the **only**
function of the report that opens the store (read-only); it is the one place to adapt when the
store's layout changes.  Without ``--snapshot`` it also writes the snapshot the report reads,
into a temporary directory that :func:`report_inputs` removes afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from streamstars.config import BuildStarsConfig
from streamstars.errors import StreamstarsError
from streamstars.io.snapshot_files import MANIFEST_NAME, PARQUET_FILES

__all__ = [
    "OBSERVATION_COLUMNS",
    "STAR_COLUMNS",
    "VISIT_COLUMNS",
    "ReportInputError",
    "SnapshotData",
    "StoreFacts",
    "load_snapshot",
    "read_store",
    "report_inputs",
]

#: Columns of ``fgcm_star_observations.parquet`` the report reads (ra/dec in degrees,
#: magnitudes per second of exposure, see streamstars.select).
OBSERVATION_COLUMNS = ("ra", "dec", "visit", "inst_mag", "inst_mag_err")
#: Columns of ``fgcm_star_ids.parquet`` the report reads.
STAR_COLUMNS = ("fgcm_id", "ra", "dec", "n_obs")
#: Columns of ``fgcmVisitCatalog.parquet`` the report reads.
VISIT_COLUMNS = ("visit", "physicalFilter", "mjd", "exptime", "psfFwhm", "skyBackground",
                 "deltaAper")
_REFERENCE_COLUMNS = ("fgcm_id", "refMag", "refMagErr")
_MANIFEST_FORMAT = "streamstars-snapshot"


class ReportInputError(StreamstarsError):
    """A state or snapshot directory cannot be reported on (empty store, not a snapshot, a
    snapshot without its parquet files or columns).  The CLI exits with code 2."""


@dataclass(frozen=True)
class StoreFacts:
    """Per-visit facts from the store's visit records, and the store's identity.

    Attributes:
        path: the state directory.
        created: when the store was created (UTC, ISO 8601), or None.
        visit: int64 visit ids, ascending.
        band: the band each visit was applied as (str array).
        n_selected: observations selected from each visit (int64).
        n_sources: source-table rows read for each visit (int64).
        config: the configuration the store was built with.
    """

    path: Path
    created: str | None
    visit: np.ndarray
    band: np.ndarray
    n_selected: np.ndarray
    n_sources: np.ndarray
    config: BuildStarsConfig


@dataclass
class SnapshotData:
    """The columns of one snapshot the report uses (numpy arrays).

    Attributes:
        path: the snapshot directory.
        provenance: the manifest's provenance strings (``visits``, ``config``, ``created``...).
        visits: :data:`VISIT_COLUMNS` of the visit catalog.
        stars: :data:`STAR_COLUMNS` (ra/dec degrees); star ``i`` owns the next ``n_obs[i]``
            observation rows (observations are grouped by star in star order).
        observations: :data:`OBSERVATION_COLUMNS`.
        reference: ``fgcm_id`` (int64), ``refMag`` / ``refMagErr`` (n, n_filters) float32
            with 99 for missing, or None when the snapshot has no reference stars.
        reference_filters: the physical filter of each ``refMag`` column.
    """

    path: Path
    provenance: dict[str, str]
    visits: dict[str, np.ndarray]
    stars: dict[str, np.ndarray]
    observations: dict[str, np.ndarray]
    reference: dict[str, np.ndarray] | None
    reference_filters: tuple[str, ...]


def read_store(state: str | Path, snapshot_out: Path | None = None) -> StoreFacts:
    """Read the store's visit records; with ``snapshot_out``, also write a parquet snapshot.

    The one place of the report that opens the store (read-only).  ``snapshot_out`` must not
    exist yet; the snapshot is written with :func:`streamstars.snapshot.write_store_snapshot`
    (parquet only: the report reads nothing else).

    Raises:
        StateError: not a store, or a store of another format version.
        ReportInputError: the store holds no visits.
    """
    # imported here: the store needs the lmdb module, which reading a snapshot does not
    from streamstars.sharded_snapshot import write_state_snapshot
    from streamstars.state import StateDirectory

    with StateDirectory.open(state, readonly=True) as directory:
        # the union of the shards' visit records, one per visit (n_selected: the visit's)
        rows = [(record.visit, record.band, record.n_selected, record.n_sources)
                for record in directory.visit_records()]
        if not rows:
            raise ReportInputError(
                f"the store {state} holds no visits: nothing to report on; apply visits with "
                "`streamstars backfill` or `streamstars run` first")
        if snapshot_out is not None:
            write_state_snapshot(directory, snapshot_out, formats=("parquet",))
        created = directory.manifest.get("created")
        config = directory.config
    visit, band, n_selected, n_sources = zip(*rows, strict=True)
    return StoreFacts(path=Path(state), created=str(created) if created else None,
                      visit=np.asarray(visit, dtype=np.int64), band=np.asarray(band, dtype=str),
                      n_selected=np.asarray(n_selected, dtype=np.int64),
                      n_sources=np.asarray(n_sources, dtype=np.int64), config=config)


@contextmanager
def report_inputs(state: str | Path,
                  snapshot: str | Path | None = None) -> Iterator[tuple[StoreFacts,
                                                                        SnapshotData]]:
    """The store's facts and the snapshot's data, for the duration of a ``with`` block.

    Without ``snapshot``, a snapshot of the store is written into a new temporary directory
    (``TMPDIR``) and removed when the block ends, whatever happens in it.  A given
    ``snapshot`` is checked before the store is opened, so a wrong path fails fast.

    Raises:
        ReportInputError, StateError: see :func:`read_store` and :func:`load_snapshot`.
    """
    if snapshot is not None:
        _check_snapshot_dir(Path(snapshot))
        facts = read_store(state)
        yield facts, load_snapshot(snapshot)
        return
    tmp = Path(tempfile.mkdtemp(prefix="streamstars-report-"))
    try:
        facts = read_store(state, tmp / "snapshot")
        yield facts, load_snapshot(tmp / "snapshot")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_snapshot_dir(path: Path) -> dict[str, Any]:
    """The manifest of a snapshot directory that has the parquet files the report reads."""
    if not path.is_dir():
        raise ReportInputError(f"snapshot {path} is not a directory; give a directory written by "
                               "`streamstars snapshot`, or leave out --snapshot")
    manifest_path = path / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise ReportInputError(
            f"{path} is not a streamstars snapshot (no {MANIFEST_NAME}); give a directory "
            "written by `streamstars snapshot`, or leave out --snapshot to snapshot the store"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportInputError(f"{manifest_path} is not a readable snapshot manifest: {exc}; "
                               "write the snapshot again with `streamstars snapshot`") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != _MANIFEST_FORMAT:
        raise ReportInputError(f"{manifest_path} is not a streamstars snapshot manifest "
                               f"(format {_MANIFEST_FORMAT!r} expected)")
    missing = [PARQUET_FILES[key] for key in ("visits", "stars", "observations")
               if PARQUET_FILES[key] not in manifest.get("files", {})]
    if missing:
        raise ReportInputError(
            f"snapshot {path} has no {', '.join(missing)} (written with --format "
            f"{','.join(manifest.get('formats', [])) or '?'}); the report reads the parquet "
            "files: write the snapshot with --format parquet (the default writes both)")
    return manifest


def load_snapshot(path: str | Path) -> SnapshotData:
    """Read the columns the report uses from a snapshot directory's parquet files.

    Every file is opened through one directory descriptor before any is read, so a snapshot
    replaced meanwhile (``streamstars snapshot`` swaps directories atomically) is read whole,
    old or new, never a mix.

    Raises:
        ReportInputError: not a snapshot, no parquet files, a file or column missing or
            unreadable, or observation rows that do not add up to the stars' ``n_obs``.
    """
    path = Path(path)
    manifest = _check_snapshot_dir(path)
    names = {key: PARQUET_FILES[key] for key in ("visits", "stars", "observations")}
    if PARQUET_FILES["reference"] in manifest.get("files", {}):
        names["reference"] = PARQUET_FILES["reference"]
    dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    handles: dict[str, IO[bytes]] = {}
    try:
        for key, fname in names.items():
            try:
                handles[key] = os.fdopen(os.open(fname, os.O_RDONLY, dir_fd=dir_fd), "rb")
            except FileNotFoundError:
                raise ReportInputError(f"snapshot {path} lacks {fname} (its manifest lists it); "
                                       "write the snapshot again") from None
        visits = _read_columns(path / names["visits"], handles["visits"], VISIT_COLUMNS)
        stars = _read_columns(path / names["stars"], handles["stars"], STAR_COLUMNS)
        observations = _read_columns(path / names["observations"], handles["observations"],
                                     OBSERVATION_COLUMNS)
        reference: dict[str, np.ndarray] | None = None
        filters: tuple[str, ...] = ()
        if "reference" in handles:
            reference, filters = _read_reference(path / names["reference"],
                                                 handles["reference"])
    finally:
        for handle in handles.values():
            handle.close()
        os.close(dir_fd)
    n_rows = int(np.sum(stars["n_obs"], dtype=np.int64))
    if n_rows != len(observations["visit"]):
        raise ReportInputError(
            f"snapshot {path}: the stars' n_obs add up to {n_rows} observations but "
            f"{names['observations']} has {len(observations['visit'])} rows; write the snapshot "
            "again")
    provenance = manifest.get("provenance", {})
    return SnapshotData(path=path, provenance={str(k): str(v) for k, v in provenance.items()},
                        visits=visits, stars=stars, observations=observations,
                        reference=reference, reference_filters=filters)


def _read_table(label: Path, handle: IO[bytes], columns: Sequence[str]) -> pa.Table:
    try:
        parquet = pq.ParquetFile(handle)
    except (pa.ArrowException, OSError) as exc:
        raise ReportInputError(f"{label} is not a readable parquet file: {exc}") from exc
    missing = [c for c in columns if c not in parquet.schema_arrow.names]
    if missing:
        raise ReportInputError(f"{label} lacks the column(s) {', '.join(missing)}; write the "
                               "snapshot again with this streamstars")
    try:
        return parquet.read(columns=list(columns))
    except (pa.ArrowException, OSError) as exc:
        raise ReportInputError(f"{label} cannot be read: {exc}") from exc


def _read_columns(label: Path, handle: IO[bytes],
                  columns: Sequence[str]) -> dict[str, np.ndarray]:
    table = _read_table(label, handle, columns)
    return {name: table.column(name).to_numpy() for name in columns}


def _read_reference(label: Path, handle: IO[bytes]) -> tuple[dict[str, np.ndarray],
                                                             tuple[str, ...]]:
    table = _read_table(label, handle, _REFERENCE_COLUMNS)
    raw = (table.schema.metadata or {}).get(b"FILTERNAMES", b"")
    filters = tuple(f for f in raw.decode().split(",") if f)
    out: dict[str, np.ndarray] = {"fgcm_id": table.column("fgcm_id").to_numpy()}
    for name in ("refMag", "refMagErr"):
        column = table.column(name).combine_chunks()
        values = column.flatten().to_numpy(zero_copy_only=False) if len(column) else \
            np.zeros(0, np.float32)
        if values.size != len(column) * len(filters):
            raise ReportInputError(
                f"{label}: {name} has {values.size} values for {len(column)} stars and "
                f"{len(filters)} FILTERNAMES ({raw.decode()!r}); write the snapshot again")
        out[name] = values.reshape(len(column), len(filters)).astype(np.float32, copy=False)
    return out, filters
