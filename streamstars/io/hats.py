"""The published stars as a HATS catalog (``OUT/fgcm_stars/``), one partition per shard pixel.

A sharded snapshot derives the stars each shard owns on its own and writes them as one
partition of a `HATS <https://www.ivoa.net/documents/Notes/HATS/>`_ catalog, the format
``lsdb.open_catalog`` and ``nested-pandas`` read as a nested frame::

    fgcm_stars/
    ├── hats.properties, properties      catalog properties (same content, both names)
    ├── partition_info.csv               Norder,Npix of every partition
    └── dataset/
        ├── _common_metadata             the schema (+ FILTERNAMES, provenance)
        ├── _metadata                    every partition's row-group footers (paths relative)
        └── Norder=k/Dir=d/Npix=n.parquet    d = (n // 10000) * 10000

One row per star, sorted by ``fgcm_id`` inside a partition (declared in every row group's
parquet ``sorting_columns``): ``_healpix_29`` (int64 HEALPix nest index of the star at order
29), the ``fgcm_star_ids`` columns ``fgcm_id``, ``ra``, ``dec`` (deg), ``n_obs``, ``obj_flag``
(``obs_arr_index`` is a property of the flat file and is recomputed when the flat files are
streamed, :mod:`streamstars.io.flat_stream`), with a reference catalog the nullable
``refMag`` / ``refMagErr`` (``fixed_size_list<float32>[nfilt]``, 99 = missing in a filter,
null = the star matched no reference star; filter order in the ``FILTERNAMES`` schema
metadata), and ``observations``: the star's observations in (visit, sourceId) order as a
nested column (nested-pandas ``NestedDtype``), with the columns and types of
``fgcm_star_observations.parquet`` except ``x`` and ``y``, kept float64 because the legacy
``fgcmStarObservations.fits`` stores them as float64 (``D``) and is streamed from these
partitions.  On disk the nested column is a struct of equal-length lists
(``struct<ra: list<double>, ...>``), nested-pandas' own layout and what lsdb's ``to_hats``
writes: each row is a list of observation structs to nested-pandas and lsdb, and unlike a
``list<struct>`` column it can be loaded partially (``columns=["observations.inst_mag"]``),
which lsdb's ``cone_search`` / ``search`` on an opened catalog rely on.

Rows are in ``fgcm_id`` order rather than HATS' usual ``_healpix_29`` order so that the flat
files can be streamed from the partitions by a k-way merge of bounded row groups; lsdb and
hats accept it (they index by ``_healpix_29`` without requiring it sorted, and the tests
open the catalog with both).  Row groups hold whole stars and at most
``row_group_observations`` observations (one star with more gets a row group of its own).

``_healpix_29`` is healpy's ``ang2pix(2**29, ra, dec, nest=True, lonlat=True)``
(computed with hpgeom, :func:`streamstars.sky.healpix29`); a star
belongs to the partition ``_healpix_29 >> 2 * (29 - k)`` (:func:`pixel_at_order`).  The shard
that owns a star must decide ownership with that function so that every star lies in its
partition (``write_partition`` checks it).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from streamstars import __version__
from streamstars.columns import OBSERVATION_DTYPES
from streamstars.io.snapshot_catalogs import (
    HATS_CATALOG_DIR,
    normalise_filters,
    provenance_json,
)
from streamstars.io.snapshot_directory import fsync_path
from streamstars.io.snapshot_parquet import (
    PARQUET_COMPRESSION,
    PARQUET_META_KEY,
    PARQUET_OBS_COLUMNS,
    ipc_bytes,
    parquet_reference_columns,
    reference_parquet_metadata,
)
from streamstars.sky import HEALPIX_ORDER, healpix29, pixel_at_order

__all__ = [
    "CATALOG_DIR",
    "HEALPIX_COLUMN",
    "OBSERVATIONS_COLUMN",
    "CatalogSummary",
    "PartitionFile",
    "compare_catalogs",
    "finish_catalog",
    "flatten_observations",
    "healpix29",
    "link_or_copy",
    "list_partitions",
    "partition_path",
    "partition_schema",
    "pixel_at_order",
    "read_partition_file",
    "reuse_partition",
    "row_group_bounds",
    "write_partition",
]

#: Name of the HATS catalog directory inside a snapshot directory.
CATALOG_DIR = HATS_CATALOG_DIR
#: HATS spatial-index column and its order.
HEALPIX_COLUMN = "_healpix_29"
#: The nested column holding each star's observations.
OBSERVATIONS_COLUMN = "observations"
#: Default bound of a partition row group, in observations (~5 MB decoded).
ROW_GROUP_OBSERVATIONS = 1 << 16
#: Schema-metadata key of a partition file: JSON with its order, pixel and counts.
PARTITION_META_KEY = b"streamstars_partition"

_STAR_FIELDS: tuple[tuple[str, pa.DataType], ...] = (
    (HEALPIX_COLUMN, pa.int64()),
    ("fgcm_id", pa.int64()),
    ("ra", pa.float64()),
    ("dec", pa.float64()),
    ("n_obs", pa.int32()),
    ("obj_flag", pa.int32()),
)
_STAR_INPUT_COLUMNS = ("fgcm_id", "ra", "dec", "n_obs", "obj_flag")
#: The observation struct: fgcm_star_observations' columns and types, x/y float64 (see above).
OBSERVATION_FIELDS: tuple[tuple[str, pa.DataType], ...] = tuple(
    (name, pa.float64() if name in ("x", "y") else typ) for name, typ in PARQUET_OBS_COLUMNS)
_PROPERTIES_FILES = ("hats.properties", "properties")
_HATS_VERSION = "v1.0"
_HATS_RELEASE_DATE = "2025-08-22"  # release date of the HATS IVOA note v1.0


@dataclass(frozen=True)
class PartitionFile:
    """One partition file of the catalog.

    ``path`` is where it was written (under the staging directory while a snapshot is being
    written; the same relative path under ``OUT`` after the swap).  ``reused``: hard-linked
    from the previous snapshot rather than written now.
    """

    order: int
    pixel: int
    path: Path
    n_stars: int
    n_observations: int
    reused: bool = False


@dataclass(frozen=True)
class CatalogSummary:
    """What :func:`finish_catalog` recorded."""

    path: Path
    n_stars: int
    n_partitions: int
    max_rows: int


# --------------------------------------------------------------------------------------------
# HEALPix
# --------------------------------------------------------------------------------------------


def _check_order(order: int) -> None:
    if not 0 <= int(order) <= HEALPIX_ORDER:
        raise ValueError(f"HEALPix order must be within 0..{HEALPIX_ORDER}, got {order}")


def _check_pixel(order: int, pixel: int) -> None:
    _check_order(order)
    if not 0 <= int(pixel) < 12 * 4 ** int(order):
        raise ValueError(f"pixel {pixel} does not exist at order {order} "
                         f"(0..{12 * 4 ** int(order) - 1})")


# --------------------------------------------------------------------------------------------
# paths and schema
# --------------------------------------------------------------------------------------------


def _relative_partition_path(order: int, pixel: int) -> str:
    return f"Norder={int(order)}/Dir={int(pixel) // 10000 * 10000}/Npix={int(pixel)}.parquet"


def partition_path(catalog_dir: str | os.PathLike[str], order: int, pixel: int) -> Path:
    """``catalog_dir/dataset/Norder=order/Dir=d/Npix=pixel.parquet`` (d = pixel // 10000 *
    10000), the HATS path of one partition."""
    _check_pixel(order, pixel)
    return Path(catalog_dir) / "dataset" / _relative_partition_path(order, pixel)


def _observation_type() -> pa.DataType:
    # struct of lists, nested-pandas' own layout (what lsdb's to_hats writes): lsdb's search
    # methods and column selection load nested sub-columns, which nested-pandas supports for
    # this layout only (a list<struct> column must be read whole)
    return pa.struct([pa.field(n, pa.list_(t)) for n, t in OBSERVATION_FIELDS])


def flatten_observations(column: pa.Array | pa.ChunkedArray) -> tuple[dict[str, pa.Array],
                                                                     np.ndarray]:
    """The observation columns of an ``observations`` column (all its stars' observations, in
    row order) and the number of observations of each row.  Accepts the struct-of-lists
    layout written here and a list<struct> one.

    Raises:
        ValueError: the lists of one row differ in length, or the column is neither layout.
    """
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_struct(array.type):
        children = array.flatten()  # honours the struct's own slice offset
        names = [array.type.field(i).name for i in range(array.type.num_fields)]
        if not children:
            return {}, np.zeros(len(array), dtype=np.int64)
        lengths = children[0].value_lengths().fill_null(0).to_numpy().astype(np.int64)
        for name, child in zip(names[1:], children[1:], strict=True):
            other = child.value_lengths().fill_null(0).to_numpy()
            if not np.array_equal(other, lengths):
                raise ValueError(f"observations: the lists of {name!r} and {names[0]!r} "
                                 "differ in length")
        return {n: c.flatten() for n, c in zip(names, children, strict=True)}, lengths
    if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        lengths = array.value_lengths().fill_null(0).to_numpy().astype(np.int64)
        values = array.flatten()
        return {values.type.field(i).name: f
                for i, f in enumerate(values.flatten())}, lengths
    raise ValueError(f"observations column of type {array.type} is neither a struct of lists "
                     "nor a list of structs")


def partition_schema(reference_filters: Sequence[str] = ()) -> pa.Schema:
    """Arrow schema of a partition (without metadata); ``refMag``/``refMagErr`` present when
    ``reference_filters`` is not empty."""
    fields = [pa.field(n, t) for n, t in _STAR_FIELDS]
    if reference_filters:
        fields += [pa.field(n, t) for n, t in
                   parquet_reference_columns(len(reference_filters))[1:]]
    fields.append(pa.field(OBSERVATIONS_COLUMN, _observation_type()))
    return pa.schema(fields)


def _schema_metadata(reference_filters: Sequence[str]) -> dict[bytes, bytes]:
    if not reference_filters:
        return {}
    return {k.encode(): v.encode()
            for k, v in reference_parquet_metadata(reference_filters).items()}


# --------------------------------------------------------------------------------------------
# writing one partition
# --------------------------------------------------------------------------------------------


def _group_rows(n_obs: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Observation rows of the stars ``order`` (groups of ``n_obs`` in star order)."""
    starts = np.concatenate(([0], np.cumsum(n_obs)[:-1])).astype(np.int64)
    counts = n_obs[order]
    total = int(counts.sum())
    new_starts = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
    return np.repeat(starts[order] - new_starts, counts) + np.arange(total, dtype=np.int64)


def row_group_bounds(n_obs: np.ndarray, limit: int) -> list[tuple[int, int]]:
    """Consecutive star ranges holding at most ``limit`` observations each (at least one
    star each)."""
    cum = np.cumsum(n_obs, dtype=np.int64)
    bounds: list[tuple[int, int]] = []
    start, done = 0, 0
    n = len(n_obs)
    while start < n:  # one iteration per row group
        end = int(np.searchsorted(cum, done + limit, side="right"))
        end = max(end, start + 1)
        bounds.append((start, end))
        done = int(cum[end - 1])
        start = end
    return bounds


def write_partition(catalog_dir: str | os.PathLike[str], order: int, pixel: int,
                    stars: dict[str, np.ndarray], observations: dict[str, np.ndarray],
                    reference: dict[str, np.ndarray] | None = None,
                    reference_filters: Sequence[str] = (), *,
                    metadata: dict[str, str] | None = None,
                    row_group_observations: int = ROW_GROUP_OBSERVATIONS) -> PartitionFile | None:
    """Write the stars one shard owns as the partition ``(order, pixel)`` of the catalog.

    Args:
        catalog_dir: the catalog being written (``STAGING/fgcm_stars``); created as needed.
        order: the HEALPix order of the shard's nest pixel.
        pixel: the shard's nest pixel.
        stars: ``fgcm_id`` (int64, unique), ``ra``, ``dec`` (deg), ``n_obs``, ``obj_flag``;
            any order (rows are written sorted by ``fgcm_id``); other columns
            (``obs_arr_index``) are ignored.
        observations: :data:`streamstars.columns.OBSERVATION_DTYPES` columns grouped by star
            in ``stars`` order (star ``i`` owns the next ``n_obs[i]`` rows), ra/dec in degrees.
        reference: ``fgcm_id`` (a subset of the stars, unique), ``refMag``/``refMagErr``
            (n, nfilt) float32 (99 = missing), or None.  With ``reference_filters`` non-empty
            the partition has ``refMag``/``refMagErr`` columns (null where a star has no
            reference match).
        reference_filters: filter names, in the column order of ``refMag`` (no commas).
        metadata: strings stored with the partition (schema metadata
            ``streamstars_partition``), e.g. the shard's last write transaction, to decide
            later whether it can be reused.
        row_group_observations: bound of a row group, in observations.

    Returns:
        The file written, or None when the shard owns no star (nothing is written: HATS has
        no empty partitions).

    Raises:
        ValueError: missing columns, inconsistent lengths, duplicate ids, a star outside the pixel
            (:func:`pixel_at_order`), reference rows of unknown stars or of the wrong shape.
    """
    _check_pixel(order, pixel)
    filters = normalise_filters(reference_filters)
    if row_group_observations < 1:
        raise ValueError(f"row_group_observations must be >= 1, got {row_group_observations}")
    where = f"partition {order}/{pixel}"
    star_cols, obs_cols = _partition_columns(where, stars, observations)
    if reference is not None and not filters:
        raise ValueError(f"{where}: reference rows need reference_filters")
    if len(star_cols["fgcm_id"]) == 0:
        return None
    rows = _PartitionRows.sorted(where, order, pixel, star_cols, obs_cols)
    table = rows.table(order, pixel, reference, filters, metadata or {})
    path = partition_path(catalog_dir, order, pixel)
    _write_sorted_table(path, table, rows.n_obs, row_group_observations)
    return PartitionFile(int(order), int(pixel), path, len(rows.ids), int(rows.n_obs.sum()))


def _partition_columns(where: str, stars: dict[str, np.ndarray],
                       observations: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray],
                                                                     dict[str, np.ndarray]]:
    """The star and observation columns a partition needs, checked: present, of one length
    each, ``n_obs`` non-negative and summing to the observations."""
    missing = [c for c in _STAR_INPUT_COLUMNS if c not in stars]
    missing += [c for c in OBSERVATION_DTYPES if c not in observations]
    if missing:
        raise ValueError(f"{where}: columns missing: {', '.join(missing)}")
    n = len(np.asarray(stars["fgcm_id"], dtype=np.int64))
    star_cols = {c: np.asarray(stars[c]) for c in _STAR_INPUT_COLUMNS}
    bad = [c for c, v in star_cols.items() if v.shape != (n,)]
    obs_cols = {c: np.asarray(observations[c]).astype(dt, copy=False)
                for c, dt in OBSERVATION_DTYPES.items()}
    n_rows = len(obs_cols["source_id"])
    bad += [c for c, v in obs_cols.items() if v.shape != (n_rows,)]
    if bad:
        raise ValueError(f"{where}: columns of inconsistent length: {', '.join(bad)}")
    n_obs = star_cols["n_obs"].astype(np.int64)
    if np.any(n_obs < 0) or int(n_obs.sum()) != n_rows:
        raise ValueError(f"{where}: n_obs must be >= 0 and sum to the {n_rows} observations "
                         f"(grouped by star), got sum {int(n_obs.sum())}")
    return star_cols, obs_cols


@dataclass(frozen=True)
class _PartitionRows:
    """The stars of a partition sorted by ``fgcm_id``, their observations regrouped to match."""

    ids: np.ndarray
    ra: np.ndarray
    dec: np.ndarray
    healpix: np.ndarray
    n_obs: np.ndarray
    obj_flag: np.ndarray
    observations: dict[str, np.ndarray]

    @classmethod
    def sorted(cls, where: str, order: int, pixel: int, star_cols: dict[str, np.ndarray],
               obs_cols: dict[str, np.ndarray]) -> _PartitionRows:
        """Sort the stars by id; refuse duplicate ids and stars outside the pixel."""
        fgcm_id = np.asarray(star_cols["fgcm_id"], dtype=np.int64)
        order_ids = np.argsort(fgcm_id, kind="stable")
        sorted_ids = fgcm_id[order_ids]
        dup = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]]
        if dup.size:
            raise ValueError(f"{where}: duplicate fgcm_id {dup[:5].tolist()}")
        ra = star_cols["ra"].astype(np.float64)[order_ids]
        dec = star_cols["dec"].astype(np.float64)[order_ids]
        h29 = healpix29(ra, dec)
        outside = (h29 >> np.int64(2 * (HEALPIX_ORDER - order))) != pixel
        if np.any(outside):
            raise ValueError(
                f"{where}: {int(outside.sum())} stars lie outside the pixel "
                f"(fgcm_id {sorted_ids[outside][:5].tolist()}); a shard publishes only the "
                "stars whose pixel_at_order(ra, dec, order) is its own pixel")
        n_obs = star_cols["n_obs"].astype(np.int64)
        if not np.all(np.diff(order_ids) > 0):  # not already sorted: regroup the observations
            rows = _group_rows(n_obs, order_ids)
            obs_cols = {c: v[rows] for c, v in obs_cols.items()}
        return cls(ids=sorted_ids, ra=ra, dec=dec, healpix=h29, n_obs=n_obs[order_ids],
                   obj_flag=star_cols["obj_flag"].astype(np.int32)[order_ids],
                   observations=obs_cols)

    def table(self, order: int, pixel: int, reference: dict[str, np.ndarray] | None,
              filters: tuple[str, ...], metadata: dict[str, str]) -> pa.Table:
        """The partition table: the star columns, the reference columns when ``filters``, the
        nested observations; its order, pixel, counts and ``metadata`` in the schema
        metadata."""
        arrays = self.star_arrays()
        if filters:
            arrays += _reference_arrays(order, pixel, self.ids, reference, len(filters))
        arrays.append(self.observation_array())
        info = {"order": int(order), "pixel": int(pixel), "stars": len(self.ids),
                "observations": len(self.observations["source_id"]),
                "streamstars_version": __version__,
                **{str(k): str(v) for k, v in metadata.items()}}
        meta = _schema_metadata(filters) | {PARTITION_META_KEY: json.dumps(
            info, sort_keys=True).encode()}
        table = pa.Table.from_arrays(arrays, schema=partition_schema(filters))
        return table.replace_schema_metadata(meta)

    def star_arrays(self) -> list[pa.Array]:
        """The star columns of the partition schema, up to the reference columns."""
        return [pa.array(self.healpix, pa.int64()), pa.array(self.ids, pa.int64()),
                pa.array(self.ra, pa.float64()), pa.array(self.dec, pa.float64()),
                pa.array(self.n_obs.astype(np.int32), pa.int32()),
                pa.array(self.obj_flag, pa.int32())]

    def observation_array(self) -> pa.StructArray:
        """The nested ``observations`` column: a struct of lists, one list per star."""
        offsets = pa.array(np.concatenate(([0], np.cumsum(self.n_obs))).astype(np.int32),
                           pa.int32())
        return pa.StructArray.from_arrays(
            [pa.ListArray.from_arrays(offsets, pa.array(
                self.observations[name].astype(typ.to_pandas_dtype(), copy=False), type=typ))
             for name, typ in OBSERVATION_FIELDS],
            fields=list(_observation_type()))


def _write_sorted_table(path: Path, table: pa.Table, n_obs: np.ndarray,
                        row_group_observations: int) -> None:
    """Write ``table`` (sorted by fgcm_id) with row groups of whole stars, fsynced; the
    directories are created as needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sorting = pq.SortingColumn.from_ordering(table.schema, [("fgcm_id", "ascending")])
    with pq.ParquetWriter(path, table.schema, compression=PARQUET_COMPRESSION,
                          sorting_columns=sorting, write_page_index=True) as writer:
        for start, end in row_group_bounds(n_obs, row_group_observations):
            writer.write_table(table.slice(start, end - start), row_group_size=end - start)
    fsync_path(path)


def _reference_arrays(order: int, pixel: int, ids: np.ndarray,
                      reference: dict[str, np.ndarray] | None, nfilt: int) -> list[pa.Array]:
    """Nullable refMag/refMagErr columns aligned with the sorted star ids."""
    has = np.zeros(len(ids), dtype=bool)
    mags = {name: np.zeros((len(ids), nfilt), dtype=np.float32)
            for name in ("refMag", "refMagErr")}
    if reference is not None:
        missing = [c for c in ("fgcm_id", "refMag", "refMagErr") if c not in reference]
        if missing:
            raise ValueError(f"partition {order}/{pixel}: reference columns missing: "
                             f"{', '.join(missing)}")
        ref_id = np.asarray(reference["fgcm_id"], dtype=np.int64)
        where = np.searchsorted(ids, ref_id)
        found = (where < len(ids)) & (ids[np.minimum(where, len(ids) - 1)] == ref_id)
        if not np.all(found):
            raise ValueError(f"partition {order}/{pixel}: reference rows of stars not in the "
                             f"partition (fgcm_id {ref_id[~found][:5].tolist()})")
        if np.unique(ref_id).size != ref_id.size:
            raise ValueError(f"partition {order}/{pixel}: duplicate reference fgcm_id")
        has[where] = True
        for name in ("refMag", "refMagErr"):
            values = np.asarray(reference[name], dtype=np.float32)
            if values.shape != (len(ref_id), nfilt):
                raise ValueError(f"partition {order}/{pixel}: reference column {name!r} must "
                                 f"have shape ({len(ref_id)}, {nfilt}), got {values.shape}")
            mags[name][where] = values
    mask = pa.array(~has)
    return [pa.FixedSizeListArray.from_arrays(pa.array(mags[name].reshape(-1), pa.float32()),
                                              nfilt, mask=mask)
            for name in ("refMag", "refMagErr")]


# --------------------------------------------------------------------------------------------
# reading partitions back, reuse
# --------------------------------------------------------------------------------------------


def read_partition_file(path: str | os.PathLike[str], *, reused: bool = False) -> PartitionFile:
    """The :class:`PartitionFile` of an existing partition (its footer only is read).

    Raises:
        ValueError: the file is not a streamstars partition (no ``streamstars_partition`` metadata).
    """
    path = Path(path)
    md = pq.read_metadata(path)
    raw = (md.metadata or {}).get(PARTITION_META_KEY)
    if raw is None:
        raise ValueError(f"{path} is not a streamstars partition (no "
                         f"{PARTITION_META_KEY.decode()} schema metadata)")
    info = json.loads(raw)
    return PartitionFile(int(info["order"]), int(info["pixel"]), path, md.num_rows,
                         int(info["observations"]), reused)


def list_partitions(catalog_dir: str | os.PathLike[str]) -> list[PartitionFile]:
    """The partitions of an existing catalog, from its ``partition_info.csv``.

    Raises:
        FileNotFoundError: no ``partition_info.csv`` or a listed partition file is missing.
    """
    catalog_dir = Path(catalog_dir)
    lines = (catalog_dir / "partition_info.csv").read_text().split()
    if not lines or lines[0].strip() != "Norder,Npix":
        raise ValueError(f"{catalog_dir}/partition_info.csv does not start with 'Norder,Npix'")
    out = []
    for line in lines[1:]:
        order, pixel = (int(v) for v in line.split(","))
        out.append(read_partition_file(partition_path(catalog_dir, order, pixel)))
    return out


def reuse_partition(previous_catalog_dir: str | os.PathLike[str],
                    catalog_dir: str | os.PathLike[str], order: int,
                    pixel: int) -> PartitionFile:
    """Hard-link the partition ``(order, pixel)`` of a previous catalog into ``catalog_dir``.

    The previous snapshot stays intact (the file is shared, never written again).  On a
    filesystem without hard links (or across devices) the file is copied instead.

    Raises:
        FileNotFoundError: the previous catalog has no such partition.
        ValueError: the file there is not the partition ``(order, pixel)`` of a streamstars catalog.
    """
    src = partition_path(previous_catalog_dir, order, pixel)
    dst = partition_path(catalog_dir, order, pixel)
    part = read_partition_file(src)
    if (part.order, part.pixel) != (int(order), int(pixel)):
        raise ValueError(f"{src} holds partition {part.order}/{part.pixel}, "
                         f"not {order}/{pixel}")
    link_or_copy(src, dst)
    return PartitionFile(part.order, part.pixel, dst, part.n_stars, part.n_observations,
                         reused=True)


def link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes a hard link to the partition file ``src`` (its parent created), or a
    durable copy where the file system cannot link (another device, no hard links).

    Raises:
        OSError: neither works.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP,
                             errno.EOPNOTSUPP):
            raise
        shutil.copyfile(src, dst)
        fsync_path(dst)


# --------------------------------------------------------------------------------------------
# finishing the catalog
# --------------------------------------------------------------------------------------------


def _sorted_partitions(partitions: Iterable[PartitionFile]) -> list[PartitionFile]:
    """Partitions in HATS (breadth-first, like ``_healpix_29``) order; overlaps refused."""
    parts = list(partitions)
    starts = np.array([p.pixel << (2 * (HEALPIX_ORDER - p.order)) for p in parts],
                      dtype=np.int64)
    ends = np.array([(p.pixel + 1) << (2 * (HEALPIX_ORDER - p.order)) for p in parts],
                    dtype=np.int64)
    order = np.lexsort((np.array([p.order for p in parts]), starts))
    parts = [parts[i] for i in order]
    overlap = np.flatnonzero(starts[order][1:] < ends[order][:-1])
    if overlap.size:
        a, b = parts[int(overlap[0])], parts[int(overlap[0]) + 1]
        raise ValueError(f"partitions {a.order}/{a.pixel} and {b.order}/{b.pixel} overlap")
    return parts


def _creation_date(metadata: dict[str, str]) -> str:
    created = metadata.get("created", "")
    try:
        when = datetime.fromisoformat(created.replace("Z", "+00:00"))
    except ValueError:
        when = datetime.now(UTC)
    if when.tzinfo is not None:
        when = when.astimezone(UTC)
    return when.strftime("%Y-%m-%dT%H:%MUTC")


def _write_properties(catalog_dir: Path, properties: dict[str, Any]) -> None:
    text = "#HATS catalog\n" + "".join(f"{k}={v}\n" for k, v in properties.items())
    for name in _PROPERTIES_FILES:
        (catalog_dir / name).write_text(text)
        fsync_path(catalog_dir / name)


def finish_catalog(catalog_dir: str | os.PathLike[str], partitions: Sequence[PartitionFile],
                   *, reference_filters: Sequence[str] = (),
                   metadata: dict[str, str] | None = None,
                   catalog_name: str = CATALOG_DIR) -> CatalogSummary:
    """Write the catalog-level files once every partition is in place (written or reused).

    ``hats.properties`` and ``properties`` (same content, :func:`_properties`),
    ``partition_info.csv``, ``dataset/_common_metadata`` (the schema, FILTERNAMES and the
    provenance JSON under ``streamstars``) and ``dataset/_metadata`` (the schema and the
    row-group footers of every partition, paths relative to ``dataset/``).  Footers are read
    one file at a time.

    Raises:
        ValueError: duplicate or overlapping partitions, a partition outside ``catalog_dir``,
            or one whose schema is not the catalog's (e.g. a partition reused from a catalog
            with other reference filters).
    """
    catalog_dir = Path(catalog_dir)
    dataset = catalog_dir / "dataset"
    dataset.mkdir(parents=True, exist_ok=True)
    filters = normalise_filters(reference_filters)
    parts = _sorted_partitions(partitions)
    n_total, max_rows, size = _write_dataset_metadata(dataset, parts, filters, metadata)
    with open(catalog_dir / "partition_info.csv", "w") as handle:
        handle.write("Norder,Npix\n")
        handle.writelines(f"{p.order},{p.pixel}\n" for p in parts)
    fsync_path(catalog_dir / "partition_info.csv")
    size += sum((dataset / name).stat().st_size for name in ("_common_metadata", "_metadata"))
    _write_properties(catalog_dir, _properties(catalog_name, parts, n_total, max_rows, size,
                                               metadata or {}))
    for directory in {p.path.parent for p in parts} | {p.path.parent.parent for p in parts} \
            | {dataset, catalog_dir}:
        fsync_path(directory, directory=True)
    return CatalogSummary(catalog_dir, n_total, len(parts), max_rows)


def _write_dataset_metadata(dataset: Path, parts: list[PartitionFile], filters: tuple[str, ...],
                            metadata: dict[str, str] | None) -> tuple[int, int, int]:
    """Write ``_common_metadata`` and ``_metadata``; return the number of rows, the largest
    partition's and the partition files' bytes."""
    expected = partition_schema(filters)
    common_meta = _schema_metadata(filters)
    if metadata:
        common_meta[PARQUET_META_KEY] = provenance_json(metadata).encode()
    pq.write_metadata(expected.with_metadata(common_meta), dataset / "_common_metadata")
    combined = pq.read_metadata(dataset / "_common_metadata")
    n_total, max_rows, size = 0, 0, 0
    for part in parts:
        relative = _relative_partition_path(part.order, part.pixel)
        if part.path.resolve() != (dataset / relative).resolve():
            raise ValueError(f"partition {part.order}/{part.pixel} is at {part.path}, not at "
                             f"{dataset / relative}")
        md = pq.read_metadata(part.path)
        schema = md.schema.to_arrow_schema().remove_metadata()
        if not schema.equals(expected):
            raise ValueError(f"partition {part.path} has schema {schema}, the catalog has "
                             f"{expected} (reference filters {list(filters)})")
        md.set_file_path(relative)
        combined.append_row_groups(md)
        n_total += md.num_rows
        max_rows = max(max_rows, md.num_rows)
        size += part.path.stat().st_size
    combined.write_metadata_file(str(dataset / "_metadata"))
    fsync_path(dataset / "_common_metadata")
    fsync_path(dataset / "_metadata")
    return n_total, max_rows, size


def _properties(catalog_name: str, parts: list[PartitionFile], n_total: int, max_rows: int,
                size: int, metadata: dict[str, str]) -> dict[str, Any]:
    """The catalog properties: ``obs_collection``, ``dataproduct_type=object``,
    ``hats_nrows``, ``hats_col_ra``/``hats_col_dec``, ``hats_col_healpix(_order)``,
    ``hats_npix_suffix``, ``hats_max_rows``, ``hats_order``, ``moc_sky_fraction``,
    ``hats_builder``, ``hats_creation_date`` (from the provenance ``created``),
    ``hats_estsize`` (KiB), ``hats_release_date``, ``hats_version``."""
    properties: dict[str, Any] = {
        "obs_collection": catalog_name,
        "dataproduct_type": "object",
        "hats_nrows": n_total,
        "hats_col_ra": "ra",
        "hats_col_dec": "dec",
        "hats_col_healpix": HEALPIX_COLUMN,
        "hats_col_healpix_order": HEALPIX_ORDER,
        "hats_npix_suffix": ".parquet",
        "hats_max_rows": max_rows,
    }
    if parts:
        properties["hats_order"] = max(p.order for p in parts)
        fraction = sum(4.0 ** -p.order for p in parts) / 12.0
        properties["moc_sky_fraction"] = f"{fraction:0.5f}"
    return properties | {
        "hats_builder": f"streamstars v{__version__}",
        "hats_creation_date": _creation_date(metadata),
        "hats_estsize": size // 1024,
        "hats_release_date": _HATS_RELEASE_DATE,
        "hats_version": _HATS_VERSION,
    }


# --------------------------------------------------------------------------------------------
# comparison (tests, diagnostics)
# --------------------------------------------------------------------------------------------


def _catalog_table(catalog_dir: Path) -> pa.Table:
    tables = [pq.read_table(p.path) for p in list_partitions(catalog_dir)]
    if not tables:
        return pq.read_schema(catalog_dir / "dataset" / "_common_metadata").empty_table()
    table = pa.concat_tables(tables)
    return table.take(pa.array(np.argsort(table["fgcm_id"].to_numpy(), kind="stable")))


def _ipc(array: pa.ChunkedArray) -> bytes:
    return ipc_bytes(pa.table({"c": array.combine_chunks()}))


def compare_catalogs(a_dir: str | os.PathLike[str], b_dir: str | os.PathLike[str],
                     ignore_metadata_keys: Sequence[str] = ("created",)) -> list[str]:
    """Differences between the rows of two catalogs (empty list: the same stars).

    Rows are compared in ``fgcm_id`` order whatever the partitioning (catalogs written with
    different shard orders hold the same rows in other partitions), bitwise per column, and
    so are the schemas, the row counts of the properties and the ``_common_metadata``
    provenance (less ``ignore_metadata_keys``).  Reads both catalogs whole: for tests and
    diagnostics, not for a survey.
    """
    a, b = Path(a_dir), Path(b_dir)
    name = a.name
    diffs: list[str] = []
    props = []
    for d in (a, b):
        text = (d / "properties").read_text().splitlines()
        props.append(dict(line.split("=", 1) for line in text if "=" in line))
    for key in ("obs_collection", "dataproduct_type", "hats_nrows", "hats_col_ra",
                "hats_col_dec", "hats_col_healpix"):
        if props[0].get(key) != props[1].get(key):
            diffs.append(f"{name}/properties: {key} {props[0].get(key)} != {props[1].get(key)}")
    metas = []
    for d in (a, b):
        meta = dict(pq.read_schema(d / "dataset" / "_common_metadata").metadata or {})
        prov = json.loads(meta.pop(PARQUET_META_KEY, b"{}"))
        metas.append((meta, {k: v for k, v in prov.items() if k not in ignore_metadata_keys}))
    if metas[0] != metas[1]:
        diffs.append(f"{name}/dataset/_common_metadata: metadata differs")
    ta, tb = _catalog_table(a), _catalog_table(b)
    ta, tb = ta.replace_schema_metadata(None), tb.replace_schema_metadata(None)
    if ta.schema != tb.schema:
        return diffs + [f"{name}: schema differs: {ta.schema} != {tb.schema}"]
    if ta.num_rows != tb.num_rows:
        return diffs + [f"{name}: {ta.num_rows} rows != {tb.num_rows} rows"]
    diffs += [f"{name}: column {col!r} differs" for col in ta.column_names
              if _ipc(ta[col]) != _ipc(tb[col])]
    return diffs
