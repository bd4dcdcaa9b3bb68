"""The flat snapshot files streamed from the partitions of the HATS catalog, in ``fgcm_id`` order.

A sharded snapshot writes each shard's stars as one partition of ``OUT/fgcm_stars/``
(:mod:`streamstars.io.hats`, rows sorted by ``fgcm_id`` inside a partition).  The legacy fgcm
FITS files and the production parquet files (same names, schemas, headers and content as
:func:`streamstars.io.snapshot_files.write_snapshot` writes from one ``SnapshotCatalogs``)
are then written here by a k-way merge of the partitions, never holding the survey in memory:

* the merge reads one row group of a partition at a time (opening the file, reading the row
  group, closing it: no file descriptor stays open between reads, whatever the number of
  partitions) and emits, at each step, every buffered star whose id is at most the smallest
  "last id" of the buffered row groups — these are all the stars of the survey up to that id,
  since every partition is sorted (vectorised: one argsort per step, no per-row Python);
* the row groups buffered at once are bounded by ``memory_bytes`` (their uncompressed sizes
  from the footers) and their number by ``max_fan_in``: when the partitions need more,
  groups of partitions are first merged into temporary sorted runs (same schema) which are
  merged in turn — an external merge sort whose fan-in is set by these bounds, not by the
  number of partitions;
* FITS tables are streamed as raw big-endian rows after a header made by astropy for a
  zero-row table, whose ``NAXIS2`` card is rewritten in place once the row count is known
  (the card keeps its 80 bytes), then padded to 2880 bytes: the file is byte-identical to
  astropy's ``writeto`` of the whole table;
* parquet files are written by ``pyarrow.parquet.ParquetWriter`` with the one-shot writer's
  schema and schema metadata, in row groups of ``PARQUET_ROW_GROUP_ROWS`` rows.

``obs_arr_index`` (``obsArrIndex``) and ``obsIndex`` are recomputed as the running sums of the
merged order.  A duplicate ``fgcm_id`` across partitions (a star published by two shards) is
an error.  The visit catalog (small) is written as today from a visits dict.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from astropy.io import fits

from streamstars.columns import OBSERVATION_DTYPES
from streamstars.io.hats import (
    CATALOG_DIR,
    OBSERVATIONS_COLUMN,
    ROW_GROUP_OBSERVATIONS,
    PartitionFile,
    finish_catalog,
    flatten_observations,
    row_group_bounds,
)
from streamstars.io.snapshot_catalogs import (
    FITS_FILES,
    MANIFEST_NAME,
    PARQUET_FILES,
    check_formats,
    normalise_filters,
    normalise_metadata,
    normalise_visits,
)
from streamstars.io.snapshot_directory import SnapshotStaging, fsync_path, write_manifest
from streamstars.io.snapshot_fits import (
    FITS_INDEX_COLUMNS,
    FITS_OBS_COLUMNS,
    FITS_STAR_COLUMNS,
    ID_HEADER,
    check_legacy_obs_count,
    fits_hdulist,
    fits_observation_arrays,
    fits_reference_columns,
    reference_fits_header,
    write_visit_fits,
)
from streamstars.io.snapshot_parquet import (
    PARQUET_COMPRESSION,
    PARQUET_OBS_COLUMNS,
    PARQUET_STAR_COLUMNS,
    fixed_list,
    parquet_observation_arrays,
    parquet_reference_columns,
    parquet_schema,
    reference_parquet_metadata,
    write_visit_parquet,
)

__all__ = [
    "MERGE_FAN_IN",
    "MERGE_MEMORY_BYTES",
    "finish_partitioned_snapshot",
    "iter_merged_stars",
    "write_flat_files",
]

#: Default bound of the row groups the merge buffers at once (uncompressed bytes).
MERGE_MEMORY_BYTES = 256 << 20
#: Default bound of the number of files merged in one pass.
MERGE_FAN_IN = 64
#: Rows per row group of the streamed parquet files.
PARQUET_ROW_GROUP_ROWS = 1 << 17
_RUN_COMPRESSION = "lz4"
_FITS_BLOCK = 2880
_CARD = 80


# --------------------------------------------------------------------------------------------
# the k-way merge
# --------------------------------------------------------------------------------------------


@dataclass
class _Source:
    """One sorted input file: its row-group sizes (from the footer) and, while it is being
    merged, the buffered row group and the position in it."""

    path: Path
    rg_rows: np.ndarray
    rg_bytes: np.ndarray
    next_rg: int = 0
    table: pa.Table | None = None
    ids: np.ndarray | None = None
    pos: int = 0

    @property
    def peak_bytes(self) -> int:
        return int(self.rg_bytes.max()) if self.rg_bytes.size else 0

    def load_next(self, columns: list[str] | None) -> bool:
        """Buffer the next non-empty row group; False when the file is exhausted."""
        while self.next_rg < len(self.rg_rows):
            index = self.next_rg
            self.next_rg += 1
            if self.rg_rows[index] == 0:
                continue
            with pq.ParquetFile(self.path, memory_map=False) as handle:
                self.table = handle.read_row_group(index, columns=columns)
            ids = self.table["fgcm_id"].to_numpy()
            previous = self.ids[-1] if self.ids is not None else None
            if np.any(ids[1:] <= ids[:-1]) or (previous is not None and ids[0] <= previous):
                raise ValueError(f"{self.path} is not sorted by fgcm_id (row group {index})")
            self.ids = ids
            self.pos = 0
            return True
        self.table, self.ids = None, None
        return False


def _source(path: Path) -> _Source:
    md = pq.read_metadata(path)
    rows = np.array([md.row_group(i).num_rows for i in range(md.num_row_groups)],
                    dtype=np.int64)
    size = np.array([md.row_group(i).total_byte_size for i in range(md.num_row_groups)],
                    dtype=np.int64)
    return _Source(Path(path), rows, size)


def _merge_once(sources: list[_Source], columns: list[str] | None) -> Iterator[pa.Table]:
    """Merge sorted files into batches in global ``fgcm_id`` order (see the module docs)."""
    live = [s for s in sources if s.load_next(columns)]
    last_emitted: int | None = None
    while live:
        assert all(s.ids is not None for s in live)
        limit = min(int(s.ids[-1]) for s in live)  # type: ignore[index]
        parts: list[pa.Table] = []
        part_ids: list[np.ndarray] = []
        still: list[_Source] = []
        for s in live:
            ids, table = s.ids, s.table
            assert ids is not None and table is not None
            end = int(np.searchsorted(ids, limit, side="right"))
            if end > s.pos:
                parts.append(table.slice(s.pos, end - s.pos))
                part_ids.append(ids[s.pos:end])
                s.pos = end
            if s.pos < len(ids) or s.load_next(columns):
                still.append(s)
        live = still
        ids = np.concatenate(part_ids)
        order = np.argsort(ids, kind="stable")
        ids = ids[order]
        dup = ids[1:][ids[1:] == ids[:-1]]
        if dup.size or (last_emitted is not None and ids[0] <= last_emitted):
            bad = dup[:5].tolist() if dup.size else [int(ids[0])]
            raise ValueError(f"fgcm_id {bad} appears in more than one partition (a star must "
                             "be published by one shard only), or a partition is not sorted "
                             "by fgcm_id")
        last_emitted = int(ids[-1])
        batch = pa.concat_tables(parts)
        if len(parts) > 1:
            batch = batch.take(pa.array(order))
        yield batch


def _plan(sources: list[_Source], memory_bytes: int, fan_in: int) -> list[list[_Source]]:
    """Consecutive groups of at most ``fan_in`` sources whose largest row groups together fit
    ``memory_bytes`` (at least two per group, so that every level of the merge halves the
    count at least)."""
    groups: list[list[_Source]] = [[]]
    used = 0
    for s in sources:
        full = len(groups[-1]) >= fan_in or used + s.peak_bytes > memory_bytes
        if len(groups[-1]) >= 2 and full:
            groups.append([])
            used = 0
        groups[-1].append(s)
        used += s.peak_bytes
    return groups


def _write_run(path: Path, batches: Iterator[pa.Table], schema: pa.Schema,
               row_group_observations: int) -> None:
    """A temporary sorted run: the merged batches, in row groups of whole stars (lz4: a run
    is read once, soon, so speed matters more than size)."""
    with pq.ParquetWriter(path, schema, compression=_RUN_COMPRESSION) as writer:
        buffered: list[pa.Table] = []
        n_buffered = 0
        for batch in batches:
            buffered.append(batch)
            n_buffered += int(pc.sum(batch["n_obs"]).as_py() or 0)
            if n_buffered >= row_group_observations:
                _flush_run(writer, buffered, row_group_observations)
                buffered, n_buffered = [], 0
        _flush_run(writer, buffered, row_group_observations)


def _flush_run(writer: pq.ParquetWriter, buffered: list[pa.Table], limit: int) -> None:
    if not buffered:
        return
    table = pa.concat_tables(buffered).combine_chunks()
    n_obs = table["n_obs"].to_numpy().astype(np.int64)
    for start, end in row_group_bounds(n_obs, limit):
        writer.write_table(table.slice(start, end - start), row_group_size=end - start)


def iter_merged_stars(partition_files: Sequence[str | os.PathLike[str] | PartitionFile], *,
                      memory_bytes: int = MERGE_MEMORY_BYTES,
                      max_fan_in: int = MERGE_FAN_IN,
                      tmp_dir: str | os.PathLike[str] | None = None,
                      columns: list[str] | None = None) -> Iterator[pa.Table]:
    """Every row of the partitions, in global ``fgcm_id`` order, as a stream of tables.

    Args:
        partition_files: partition files (each sorted by ``fgcm_id``, one schema), any
            number.
        memory_bytes: bound of the row groups buffered at once (uncompressed, from the
            footers).  When the partitions need more, groups of them are merged first into
            temporary runs under ``tmp_dir`` (removed as soon as they are merged).
        max_fan_in: most files merged in one pass (each step of a pass looks at every file of
            the pass: the bound keeps the Python work per merged row group constant).
        tmp_dir: where temporary runs go (a fresh ``.merge-runs-*`` directory is made there,
            default: beside the first partition, and removed at the end); used only when one
            pass does not fit ``memory_bytes``.
        columns: columns to read (default: all).

    Yields:
        Tables of whole stars, in ``fgcm_id`` order over all of them.

    Raises:
        ValueError: an ``fgcm_id`` in two partitions, or a partition not sorted by ``fgcm_id``.
    """
    paths = [p.path if isinstance(p, PartitionFile) else Path(p) for p in partition_files]
    if not paths:
        return
    if memory_bytes < 1 or max_fan_in < 2:
        raise ValueError(f"memory_bytes must be >= 1 and max_fan_in >= 2, got {memory_bytes} "
                         f"and {max_fan_in}")
    read_columns = None if columns is None else list(dict.fromkeys(
        ["fgcm_id", "n_obs", *columns]))
    sources = [_source(p) for p in paths]
    if len(_plan(sources, memory_bytes, max_fan_in)) == 1:
        yield from _merge_once(sources, read_columns)
    else:
        yield from _merge_in_runs(sources, memory_bytes, max_fan_in,
                                  Path(tmp_dir) if tmp_dir is not None else paths[0].parent,
                                  read_columns)


def _merge_in_runs(sources: list[_Source], memory_bytes: int, max_fan_in: int, base: Path,
                   read_columns: list[str] | None) -> Iterator[pa.Table]:
    """The merge of sources too many for one pass: groups are merged into temporary sorted
    runs in a fresh directory under ``base`` (removed at the end), level by level, until one
    pass merges the rest."""
    base.mkdir(parents=True, exist_ok=True)
    runs_dir = Path(tempfile.mkdtemp(prefix=".merge-runs-", dir=base))
    schema = pq.read_schema(sources[0].path)
    if read_columns is not None:
        schema = pa.schema([schema.field(c) for c in read_columns], metadata=schema.metadata)
    level = 0
    try:
        while True:
            groups = _plan(sources, memory_bytes, max_fan_in)
            if len(groups) == 1:
                yield from _merge_once(sources, read_columns)
                return
            sources = _merge_level(groups, runs_dir, level, read_columns, schema)
            read_columns = None  # the runs hold exactly the columns wanted
            level += 1
    finally:
        shutil.rmtree(runs_dir, ignore_errors=True)


def _merge_level(groups: list[list[_Source]], runs_dir: Path, level: int,
                 columns: list[str] | None, schema: pa.Schema) -> list[_Source]:
    """Merge each group of sources into one sorted run (a lone source is kept for the next
    level); the runs of the previous level are deleted once merged."""
    runs: list[_Source] = []
    for i, group in enumerate(groups):
        run = runs_dir / f"run-{level}-{i}.parquet"
        if len(group) == 1:  # a lone file in the last group: merged at the next level
            runs.append(group[0])
            continue
        _write_run(run, _merge_once(group, columns), schema, ROW_GROUP_OBSERVATIONS)
        for s in group:  # a merged run is read once: drop it
            if s.path.parent == runs_dir:
                s.path.unlink()
        runs.append(_source(run))
    return runs


# --------------------------------------------------------------------------------------------
# streamed FITS and parquet writers
# --------------------------------------------------------------------------------------------

_FITS_DTYPES = {"K": ">i8", "J": ">i4", "D": ">f8", "E": ">f4", "L": "u1"}


def _fits_row_dtype(specs: Sequence[tuple[str, str, str, str | None]]) -> np.dtype:
    fields: list[tuple[Any, ...]] = []
    for name, _src, form, _unit in specs:
        repeat = form[:-1]
        code = _FITS_DTYPES[form[-1]]
        fields.append((name, code, (int(repeat),)) if repeat else (name, code))
    return np.dtype(fields)


class _FitsStream:
    """One FITS binary table written row batch by row batch (see the module docstring)."""

    def __init__(self, path: Path, metadata: dict[str, str],
                 specs: Sequence[tuple[str, str, str, str | None]],
                 extra_header: dict[str, tuple[Any, str]] | None = None) -> None:
        self.specs = tuple(specs)
        self.dtype = _fits_row_dtype(self.specs)
        empty = {src: np.zeros((0, *self.dtype[name].shape), dtype=self.dtype[name].base)
                 for name, src, _, _ in self.specs}
        columns = [fits.Column(name=name, format=form, unit=unit,
                               array=empty[src].astype(bool) if form == "L" else empty[src])
                   for name, src, form, unit in self.specs]
        hdul = fits_hdulist(metadata, columns, extra_header)
        if int(hdul[1].header["NAXIS1"]) != self.dtype.itemsize:
            raise AssertionError(f"{path.name}: row width {self.dtype.itemsize} != NAXIS1 "
                                 f"{hdul[1].header['NAXIS1']}")
        buffer = io.BytesIO()
        hdul.writeto(buffer, checksum=False, output_verify="exception")
        head = buffer.getvalue()
        primary_len = len(hdul[0].header.tostring())
        self.naxis2_at, self.naxis2_comment = self._find_naxis2(head, primary_len)
        self.path = path
        self.handle: IO[bytes] = open(path, "wb")  # noqa: SIM115 (closed in close())
        self.handle.write(head)
        self.rows = 0

    @staticmethod
    def _find_naxis2(head: bytes, start: int) -> tuple[int, str]:
        for at in range(start, len(head), _CARD):
            if head[at:at + 9] == b"NAXIS2  =":
                card = fits.Card.fromstring(head[at:at + _CARD].decode("ascii"))
                return at, str(card.comment)
        raise AssertionError("no NAXIS2 card in the table header")

    def write(self, arrays: dict[str, np.ndarray]) -> None:
        n = len(next(iter(arrays.values())))
        rows = np.empty(n, dtype=self.dtype)
        for name, src, form, _ in self.specs:
            if form == "L":
                rows[name] = np.where(arrays[src], ord("T"), ord("F"))
            else:
                rows[name] = arrays[src]
        self.handle.write(rows.tobytes())
        self.rows += n

    def close(self) -> int:
        pad = -(self.rows * self.dtype.itemsize) % _FITS_BLOCK
        self.handle.write(b"\0" * pad)
        card = fits.Card("NAXIS2", self.rows, self.naxis2_comment).image.encode("ascii")
        if len(card) != _CARD:
            raise AssertionError(f"NAXIS2 card of {len(card)} bytes")
        self.handle.seek(self.naxis2_at)
        self.handle.write(card)
        self.handle.close()
        return self.rows


class _ParquetStream:
    """One parquet file written in row groups of ``PARQUET_ROW_GROUP_ROWS`` rows."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.schema = schema
        self.writer = pq.ParquetWriter(path, schema, compression=PARQUET_COMPRESSION)
        self.buffered: list[pa.Table] = []
        self.n_buffered = 0
        self.rows = 0

    def write(self, arrays: list[pa.Array]) -> None:
        table = pa.Table.from_arrays(arrays, schema=self.schema)
        self.buffered.append(table)
        self.n_buffered += table.num_rows
        self.rows += table.num_rows
        if self.n_buffered >= PARQUET_ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self.buffered:
            table = pa.concat_tables(self.buffered)
            self.writer.write_table(table, row_group_size=PARQUET_ROW_GROUP_ROWS)
        self.buffered, self.n_buffered = [], 0

    def close(self) -> int:
        self._flush()
        self.writer.close()
        return self.rows


def _numpy(array: pa.Array, dtype: np.dtype) -> np.ndarray:
    return np.asarray(array.to_numpy(zero_copy_only=False), dtype=dtype)


def write_flat_files(out_dir: str | os.PathLike[str],
                     partition_files: Sequence[str | os.PathLike[str] | PartitionFile], *,
                     visits: dict[str, np.ndarray], metadata: dict[str, str],
                     reference_filters: Sequence[str] = (),
                     formats: Sequence[str] = ("fits", "parquet"),
                     memory_bytes: int = MERGE_MEMORY_BYTES,
                     max_fan_in: int = MERGE_FAN_IN,
                     tmp_dir: str | os.PathLike[str] | None = None) -> dict[str, int]:
    """Write the flat snapshot files into the existing directory ``out_dir`` (a staging
    directory), streamed from the partitions in ``fgcm_id`` order.

    Args:
        out_dir: directory the files are written into (no manifest is written here).
        partition_files: the catalog's partitions
            (:class:`~streamstars.io.hats.PartitionFile` or paths).
        visits: the visit catalog columns, as ``SnapshotCatalogs.visits``.
        metadata: provenance strings (as ``SnapshotCatalogs.metadata``; ``created`` and
            ``streamstars_version`` are added when absent — pass the same dict to everything
            written in one snapshot).
        reference_filters: the partitions' reference filters; when not empty the reference
            files are written (one row per star with a reference match).
        formats: any of ``"fits"`` and ``"parquet"``.
        memory_bytes: see :func:`iter_merged_stars`.
        max_fan_in: see :func:`iter_merged_stars`.
        tmp_dir: see :func:`iter_merged_stars` (default ``out_dir``).

    Returns:
        Rows written per file name.

    Raises:
        ValueError: bad formats, visits or filters; more observations than the legacy int32
            obsIndex holds (with ``"fits"``); a star in two partitions; observations whose
            count differs from ``n_obs``.
    """
    out, fmts = Path(out_dir), check_formats(formats)
    filters = normalise_filters(reference_filters)
    meta = normalise_metadata(metadata)
    visits = normalise_visits(visits)
    with contextlib.ExitStack() as stack:
        # on an error every file opened is closed (the caller's staging directory is dropped)
        files = _FlatFiles(out, fmts, filters, meta, visits, stack)
        wanted = ["fgcm_id", "ra", "dec", "n_obs", "obj_flag",
                  *(["refMag", "refMagErr"] if filters else []), OBSERVATIONS_COLUMN]
        files.write_merged(iter_merged_stars(partition_files, memory_bytes=memory_bytes,
                                             max_fan_in=max_fan_in, columns=wanted,
                                             tmp_dir=tmp_dir if tmp_dir is not None else out),
                           len(filters))
        rows = files.close()
        stack.pop_all()
    return rows


class _FlatFiles:
    """The flat files of one snapshot being streamed: the visit catalogs (written at once)
    and one stream per star, observation, index and reference file of each format."""

    def __init__(self, out: Path, fmts: tuple[str, ...], filters: tuple[str, ...],
                 meta: dict[str, str], visits: dict[str, np.ndarray],
                 stack: contextlib.ExitStack) -> None:
        self.out, self.meta, self.stack = out, meta, stack
        self.rows: dict[str, int] = {}
        self.fits: dict[str, _FitsStream] = {}
        self.parquet: dict[str, _ParquetStream] = {}
        nfilt = len(filters)
        if "fits" in fmts:
            self.rows[FITS_FILES["visits"]] = write_visit_fits(out, visits, meta)
            self._fits("observations", FITS_OBS_COLUMNS)
            self._fits("stars", FITS_STAR_COLUMNS, ID_HEADER)
            self._fits("indices", FITS_INDEX_COLUMNS)
            if filters:
                self._fits("reference", fits_reference_columns(nfilt),
                           reference_fits_header(filters))
        if "parquet" in fmts:
            self.rows[PARQUET_FILES["visits"]] = write_visit_parquet(out, visits, meta)
            self._parquet("observations", parquet_schema(PARQUET_OBS_COLUMNS, meta))
            self._parquet("stars", parquet_schema(PARQUET_STAR_COLUMNS, meta))
            if filters:
                self._parquet("reference", parquet_schema(
                    parquet_reference_columns(nfilt), meta, reference_parquet_metadata(filters)))

    def _fits(self, key: str, *args: Any) -> None:
        self.fits[key] = _FitsStream(self.out / FITS_FILES[key], self.meta, *args)
        self.stack.callback(_close_quietly, self.fits[key])

    def _parquet(self, key: str, schema: pa.Schema) -> None:
        self.parquet[key] = _ParquetStream(self.out / PARQUET_FILES[key], schema)
        self.stack.callback(_close_quietly, self.parquet[key])

    def write_merged(self, batches: Iterator[pa.Table], nfilt: int) -> None:
        """Append the merged batches of stars in order, numbering their observations.

        Raises:
            ValueError: a star's ``n_obs`` differs from its observations, or (FITS) more
                observations than the legacy int32 obsIndex holds.
        """
        n_obs_total = 0
        for batch in batches:
            stars, obs = _batch_columns(batch, n_obs_total)
            n_batch = len(obs["source_id"])
            if self.fits:
                check_legacy_obs_count(n_obs_total + n_batch)
            reference = _reference_rows(batch, stars["fgcm_id"], nfilt) if nfilt else None
            self.write(stars, obs, reference, n_obs_total)
            n_obs_total += n_batch
            del batch, obs, stars, reference

    def write(self, stars: dict[str, np.ndarray], obs: dict[str, np.ndarray],
              reference: dict[str, np.ndarray] | None, first_obs: int) -> None:
        """Append a batch of stars, their observations (numbered from ``first_obs``) and
        their reference rows to every file."""
        if self.fits:
            self.fits["observations"].write(fits_observation_arrays(obs))
            self.fits["stars"].write(
                {**stars, "obs_arr_index": stars["obs_arr_index"].astype(np.int32)})
            self.fits["indices"].write({"obs_index": np.arange(
                first_obs, first_obs + len(obs["source_id"]), dtype=np.int32)})
            if reference is not None:
                self.fits["reference"].write(reference)
        if self.parquet:
            self.parquet["observations"].write(parquet_observation_arrays(obs))
            self.parquet["stars"].write([pa.array(stars[name], type=typ)
                                         for name, typ in PARQUET_STAR_COLUMNS])
            if reference is not None:
                self.parquet["reference"].write([
                    pa.array(reference["fgcm_id"], pa.int64()),
                    fixed_list(reference["refMag"], pa.float32()),
                    fixed_list(reference["refMagErr"], pa.float32())])

    def close(self) -> dict[str, int]:
        """Finish every file; the rows written per file name."""
        for key, fstream in self.fits.items():
            self.rows[FITS_FILES[key]] = fstream.close()
        for key, pstream in self.parquet.items():
            self.rows[PARQUET_FILES[key]] = pstream.close()
        return self.rows


def _batch_columns(batch: pa.Table, first_obs: int) -> tuple[dict[str, np.ndarray],
                                                             dict[str, np.ndarray]]:
    """The star columns (``obs_arr_index`` counted from ``first_obs``) and the observation
    columns of a merged batch.

    Raises:
        ValueError: a star's ``n_obs`` differs from the observations stored with it.
    """
    obs_arrow, lengths = flatten_observations(batch[OBSERVATIONS_COLUMN])
    n_obs = _numpy(batch["n_obs"].combine_chunks(), np.dtype(np.int32))
    if not np.array_equal(lengths, n_obs):
        bad = _numpy(batch["fgcm_id"].combine_chunks(), np.dtype(np.int64))[lengths != n_obs][:5]
        raise ValueError(f"stars {bad.tolist()}: n_obs differs from the number of "
                         "observations stored with them")
    stars = {
        "fgcm_id": _numpy(batch["fgcm_id"].combine_chunks(), np.dtype(np.int64)),
        "ra": _numpy(batch["ra"].combine_chunks(), np.dtype(np.float64)),
        "dec": _numpy(batch["dec"].combine_chunks(), np.dtype(np.float64)),
        "obs_arr_index": np.cumsum(n_obs, dtype=np.int64) - n_obs + first_obs,
        "n_obs": n_obs,
        "obj_flag": _numpy(batch["obj_flag"].combine_chunks(), np.dtype(np.int32)),
    }
    obs = {name: _numpy(obs_arrow[name], np.dtype(obs_arrow[name].type.to_pandas_dtype()))
           for name in OBSERVATION_DTYPES}
    return stars, obs


def _close_quietly(stream: _FitsStream | _ParquetStream) -> None:
    with contextlib.suppress(Exception):
        if isinstance(stream, _FitsStream):
            stream.handle.close()
        else:
            stream.writer.close()


def _reference_rows(batch: pa.Table, ids: np.ndarray, nfilt: int) -> dict[str, np.ndarray]:
    """The reference rows of a merged batch: the stars whose refMag is not null."""
    mags = batch["refMag"].combine_chunks()
    errs = batch["refMagErr"].combine_chunks()
    has = _numpy(mags.is_valid(), np.dtype(np.bool_))
    rows = np.flatnonzero(has)
    out = {"fgcm_id": ids[rows]}
    for name, array in (("refMag", mags), ("refMagErr", errs)):
        taken = array.take(pa.array(rows))
        out[name] = _numpy(taken.flatten(), np.dtype(np.float32)).reshape(-1, nfilt)
    return out


# --------------------------------------------------------------------------------------------
# the whole snapshot
# --------------------------------------------------------------------------------------------


def finish_partitioned_snapshot(staging: SnapshotStaging, partitions: Sequence[PartitionFile],
                                *, visits: dict[str, np.ndarray], metadata: dict[str, str],
                                reference_filters: Sequence[str] = (),
                                formats: Sequence[str] = ("fits", "parquet"),
                                checksums: bool = True,
                                memory_bytes: int = MERGE_MEMORY_BYTES,
                                max_fan_in: int = MERGE_FAN_IN,
                                extra: dict[str, Any] | None = None) -> list[Path]:
    """Finish a snapshot whose partitions are in ``staging.path/fgcm_stars`` (written with
    :func:`~streamstars.io.hats.write_partition` or linked with
    :func:`~streamstars.io.hats.reuse_partition`): the catalog files
    (:func:`~streamstars.io.hats.finish_catalog`), the flat files streamed from the
    partitions (:func:`write_flat_files`) and ``SNAPSHOT.json`` (as
    :func:`~streamstars.io.snapshot_files.write_snapshot` writes it, plus
    ``"partitions": {"written": W, "reused": R}`` counting the partition files, and the
    ``extra`` entries, e.g. the shards' generations).  The swap
    into place happens when the :func:`~streamstars.io.snapshot_directory.stage_snapshot` block
    ends.

    Returns:
        The flat files, the catalog directory and the manifest, under ``staging.target``.

    Raises:
        ValueError: as :func:`~streamstars.io.hats.finish_catalog` and :func:`write_flat_files`.
    """
    fmts = check_formats(formats)
    filters = normalise_filters(reference_filters)
    meta = normalise_metadata(metadata)
    finish_catalog(staging.path / CATALOG_DIR, partitions, reference_filters=filters,
                   metadata=meta)
    rows = write_flat_files(staging.path, partitions, visits=visits, metadata=meta,
                            reference_filters=filters, formats=fmts, memory_bytes=memory_bytes,
                            max_fan_in=max_fan_in)
    written = sum(1 for p in partitions if not p.reused)
    write_manifest(staging.path, rows, fmts, filters, meta, checksums=checksums,
                    extra={**(extra or {}),
                           "partitions": {"written": written,
                                          "reused": len(partitions) - written}})
    fsync_path(staging.path, directory=True)
    return ([staging.target / name for name in sorted(rows)]
            + [staging.target / CATALOG_DIR, staging.target / MANIFEST_NAME])
