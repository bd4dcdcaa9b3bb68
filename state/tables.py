"""Named tables of a store: one sub-database each, inside one transaction.

A table turns the keys and values of :mod:`streamstars.state.schema` into what the algorithms
work with (column dicts, :class:`~streamstars.state.records.VisitRecord`, numpy member rows)
and does its own map-size accounting: every value it reads, writes or deletes in a loop over
many keys counts as one scattered access of the map (:meth:`MapTrimmer.note_access`), so no
caller has to remember it.  Single small lookups (a visit record, a meta value, an offset) do
not count.  Tables are made by :class:`streamstars.state.transaction.Transaction`; nothing
outside ``state/`` touches an LMDB transaction.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import lmdb
import numpy as np

from streamstars.columns import OBSERVATION_DTYPES, ColumnDict, concat, take
from streamstars.config import BuildStarsConfig, config_from_json, to_dict
from streamstars.errors import StateError
from streamstars.sky import fixed_unit_vectors, pixels_in_discs, pixels_of, vectors_from_fixed
from streamstars.state.cache import WriteCache
from streamstars.state.codec import ColumnReader, decode_columns, encode_columns
from streamstars.state.environment import MapTrimmer
from streamstars.state.records import VisitRecord
from streamstars.state.schema import (
    CANDIDATE_DTYPES,
    COMPONENT_DTYPES,
    DB_MEMBERS,
    FINE_FACTOR,
    FINE_SHIFT,
    MAX_RMAX_VALUE,
    MEMBER_DTYPE,
    META_CONFIG,
    META_REFCAT,
    META_SOURCE_INDEX,
    OFFSET_VALUE,
    POSITION_COLUMNS,
    POSITION_DTYPES,
    STORED_OBSERVATION_DTYPES,
    band_from_key,
    band_key,
    int_from_key,
    int_key,
    max_rmax_key,
    member_key,
    observation_key,
    offset_from_key,
    offset_key,
    pixel_key,
    refcache_schema,
    refs_key,
)

_OBS_READER = ColumnReader(STORED_OBSERVATION_DTYPES)
_OBSERVATION_COLUMNS = frozenset(OBSERVATION_DTYPES)


class _Table:
    """One sub-database inside one transaction."""

    def __init__(self, txn: lmdb.Transaction, db: Any, trimmer: MapTrimmer) -> None:
        self._txn = txn
        self._db = db
        self._trimmer = trimmer

    def count(self) -> int:
        """Number of stored values."""
        return int(self._txn.stat(self._db)["entries"])

    def clear(self) -> None:
        """Remove every value."""
        self._txn.drop(self._db, delete=False)

    def _prefix_items(self, prefix: bytes, *, copy: bool = True) -> Iterator[tuple[bytes, Any]]:
        """(key, value) of every key starting with ``prefix``, each counted as one access.

        ``copy=False`` yields the value as the transaction returns it: in a transaction begun
        with ``buffers=True`` a zero-copy view of the map, valid only until the next write in
        that transaction; only the pages actually read are faulted in.
        """
        cursor = self._txn.cursor(db=self._db)
        if not cursor.set_range(prefix):
            return
        for raw_key, value in cursor:
            key = bytes(raw_key)
            if not key.startswith(prefix):
                return
            self._trimmer.note_access()
            yield key, (bytes(value) if copy else value)


# ---------------------------------------------------------------------------------------------
# meta
# ---------------------------------------------------------------------------------------------
def config_value(config: BuildStarsConfig) -> bytes:
    """The stored form of a configuration (``meta/config``)."""
    # key order kept: the order of fgcmLoadReferenceCatalog.filterMap is FILTERNAMES
    return json.dumps(to_dict(config)).encode()


class MetaTable(_Table):
    """``meta``: the store's format version, configuration, reference catalog, flags."""

    def get(self, key: bytes) -> bytes | None:
        """A raw value (the keys are :mod:`streamstars.state.schema`'s ``META_*``)."""
        value = self._txn.get(key, db=self._db)
        return None if value is None else bytes(value)

    def put(self, key: bytes, value: bytes) -> None:
        """Set a raw value."""
        self._txn.put(key, value, db=self._db)

    def delete(self, key: bytes) -> None:
        """Remove a value (absent: nothing happens)."""
        self._txn.delete(key, db=self._db)

    def config(self) -> BuildStarsConfig | None:
        """The configuration the store was built with (as recorded), or None.

        Raises:
            ConfigError: the recorded configuration is not valid any more.
        """
        raw = self.get(META_CONFIG)
        return None if raw is None else config_from_json(raw.decode())

    def set_config(self, config: BuildStarsConfig) -> None:
        """Record ``config`` as the store's configuration."""
        self.put(META_CONFIG, config_value(config))

    def refcat(self) -> dict[str, Any] | None:
        """The identity of the reference catalog whose stars are cached, or None."""
        raw = self.get(META_REFCAT)
        return None if raw is None else dict(json.loads(raw))

    def set_refcat(self, identity: dict[str, Any] | None) -> None:
        """Record the identity of the cached reference catalog (None: no catalog)."""
        if identity is None:
            self.delete(META_REFCAT)
        else:
            self.put(META_REFCAT, json.dumps(identity, sort_keys=True).encode())

    def source_index_complete(self) -> bool:
        """Whether ``source_ids`` indexes every stored observation."""
        return self.get(META_SOURCE_INDEX) is not None

    def mark_source_index_complete(self) -> None:
        """Record that ``source_ids`` indexes every stored observation."""
        self.put(META_SOURCE_INDEX, b"1")


# ---------------------------------------------------------------------------------------------
# visits and offsets
# ---------------------------------------------------------------------------------------------
class VisitTable(_Table):
    """``visits``: the record of every applied visit."""

    def get(self, visit: int) -> VisitRecord | None:
        """The record of ``visit`` or None."""
        raw = self._txn.get(int_key(visit), db=self._db)
        return None if raw is None else VisitRecord.from_json(bytes(raw))

    def put(self, record: VisitRecord) -> None:
        """Store (or replace) the record of ``record.visit``."""
        self._txn.put(int_key(record.visit), record.to_json(), db=self._db)

    def delete(self, visit: int) -> None:
        """Remove the record of ``visit``."""
        self._txn.delete(int_key(visit), db=self._db)

    def items(self) -> Iterator[tuple[int, VisitRecord]]:
        """(visit, record) of every applied visit, in visit order."""
        for key, value in self._txn.cursor(db=self._db):
            self._trimmer.note_access()
            yield int_from_key(bytes(key)), VisitRecord.from_json(bytes(value))

    def records(self) -> list[VisitRecord]:
        """Every record, in visit order."""
        return [record for _, record in self.items()]


class OffsetTable(_Table):
    """``offsets``: the next Kafka offset to consume, per (topic, partition)."""

    def put(self, topic: str, partition: int, next_offset: int) -> None:
        """Record the next offset of (topic, partition)."""
        self._txn.put(offset_key(topic, partition), OFFSET_VALUE.pack(next_offset),
                      db=self._db)

    def items(self) -> Iterator[tuple[str, int, int]]:
        """(topic, partition, next offset) of every recorded Kafka position."""
        for raw_key, value in self._txn.cursor(db=self._db):
            topic, partition = offset_from_key(bytes(raw_key))
            yield topic, partition, int(OFFSET_VALUE.unpack(bytes(value))[0])


# ---------------------------------------------------------------------------------------------
# observations
# ---------------------------------------------------------------------------------------------
class ObservationRecord:
    """One stored value of ``observations`` (one visit's observations in one pixel), decoded
    on demand."""

    __slots__ = ("_key", "_value")

    def __init__(self, key: Any, value: Any) -> None:
        self._key = key
        self._value = value

    @property
    def band(self) -> str:
        """The band of the observations."""
        return band_from_key(bytes(self._key))

    def columns(self, only: frozenset[str] | None = None) -> ColumnDict:
        """The stored columns (``only`` these; zero-copy views of the value)."""
        return decode_columns(self._value, STORED_OBSERVATION_DTYPES, only)


class FineRows:
    """Some rows of one stored value of ``observations`` (one visit's observations of one
    band in one store pixel): those in chosen fine pixels, read from the value on demand."""

    __slots__ = ("_value", "_n", "rows")

    def __init__(self, value: Any, n: int, rows: np.ndarray) -> None:
        self._value = value
        self._n = n
        self.rows = rows  # indices into the value, in (fine pixel, sourceId) order

    def column(self, name: str) -> np.ndarray:
        """Column ``name`` (:data:`STORED_OBSERVATION_DTYPES`) of these rows, copied."""
        view = _OBS_READER.column(self._value, name, self._n)
        return np.array(view) if len(self.rows) == self._n else view[self.rows]

    def smallest_source_id(self) -> int:
        """The smallest sourceId of these rows (there is at least one)."""
        view = _OBS_READER.column(self._value, "source_id", self._n)
        return int((view if len(self.rows) == self._n else view[self.rows]).min())

    def columns(self, schema: dict[str, np.dtype]) -> ColumnDict:
        """The columns of ``schema`` of these rows, copied."""
        return {name: self.column(name) for name in schema}

    def restricted(self, fine: np.ndarray) -> FineRows | None:
        """These rows in the fine pixels ``fine`` (sorted, unique) only; None if none."""
        fp = self.column("fine_pixel")
        if not len(fine) or not len(fp):
            return None
        at = np.minimum(np.searchsorted(fine, fp), len(fine) - 1)
        hit = fine[at] == fp
        return FineRows(self._value, self._n, self.rows[hit]) if hit.any() else None


class ObservationTable(_Table):
    """``observations``: each visit's selected observations per (band, store pixel)."""

    def __init__(self, txn: lmdb.Transaction, db: Any, trimmer: MapTrimmer,
                 store_nside: int) -> None:
        super().__init__(txn, db, trimmer)
        self._nside = store_nside

    def put_visit(self, band: str, visit: int, obs: ColumnDict) -> list[int]:
        """Store one visit's observations per pixel; returns the pixels written (sorted).

        Rows are keyed by their pixel at ``storeNside`` and sorted by (fine pixel, sourceId),
        computed from the same fixed-point vectors as the association, so keys and geometry
        always agree.
        """
        if len(obs["source_id"]) == 0:
            return []
        v = vectors_from_fixed(fixed_unit_vectors(obs["ra"], obs["dec"]))
        fine = pixels_of(v, self._nside * FINE_FACTOR)
        order = np.lexsort((obs["source_id"], fine))
        rows = {**take(obs, order), "fine_pixel": fine[order]}
        pixel = fine[order] >> FINE_SHIFT
        bounds = np.flatnonzero(np.r_[True, pixel[1:] != pixel[:-1], True])
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            self._trimmer.note_access()
            self._txn.put(observation_key(band, int(pixel[lo]), visit),
                          encode_columns({k: c[lo:hi] for k, c in rows.items()},
                                         STORED_OBSERVATION_DTYPES), db=self._db)
        return pixel[bounds[:-1]].tolist()

    def delete_visit(self, band: str, pixels: Iterable[int], visit: int) -> None:
        """Remove one visit's observations from ``pixels``."""
        for pixel in pixels:
            self._trimmer.note_access()
            self._txn.delete(observation_key(band, int(pixel), visit), db=self._db)

    def visit_rows(self, band: str, pixels: Iterable[int], visit: int) -> ColumnDict:
        """Every column (:data:`OBSERVATION_DTYPES`) of the observations one visit stores in
        ``pixels``, copied."""
        parts = []
        for pixel in pixels:
            self._trimmer.note_access()
            raw = self._txn.get(observation_key(band, int(pixel), visit), db=self._db)
            if raw is not None:
                parts.append({k: np.array(v) for k, v in decode_columns(
                    bytes(raw), STORED_OBSERVATION_DTYPES, _OBSERVATION_COLUMNS).items()})
        return concat(parts, OBSERVATION_DTYPES)

    def visit_source_ids(self, band: str, pixels: Iterable[int], visit: int) -> np.ndarray:
        """The sourceIds one visit stores in ``pixels``."""
        parts = []
        for pixel in pixels:
            self._trimmer.note_access()
            raw = self._txn.get(observation_key(band, int(pixel), visit), db=self._db)
            if raw is not None:
                parts.append(decode_columns(bytes(raw), STORED_OBSERVATION_DTYPES,
                                            frozenset({"source_id"}))["source_id"])
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def positions(self, band: str, pixels: Iterable[int]) -> ColumnDict:
        """Identity and position (source_id, visit, ra, dec) of every stored observation of
        ``band`` in ``pixels`` (all visits)."""
        parts = []
        for pixel in pixels:
            for _, value in self._prefix_items(pixel_key(band, int(pixel))):
                parts.append(decode_columns(value, STORED_OBSERVATION_DTYPES, POSITION_COLUMNS))
        return concat(parts, POSITION_DTYPES)

    def rows(self, band: str, pixels: Iterable[int]) -> ColumnDict:
        """Every column (:data:`OBSERVATION_DTYPES`) of every stored observation of ``band``
        in ``pixels`` (all visits), copied; in key order (pixel, visit)."""
        parts = []
        for pixel in pixels:
            for _, value in self._prefix_items(pixel_key(band, int(pixel)), copy=False):
                parts.append({k: np.array(v) for k, v in decode_columns(
                    value, STORED_OBSERVATION_DTYPES, _OBSERVATION_COLUMNS).items()})
        return concat(parts, OBSERVATION_DTYPES)

    def bands(self) -> list[str]:
        """The bands with stored observations, in key order (one cursor jump per band)."""
        found: list[str] = []
        cursor = self._txn.cursor(db=self._db)
        positioned = cursor.first()
        while positioned:
            band = band_from_key(bytes(cursor.key()))
            found.append(band)
            # past every key of this band: its 8-byte prefix followed by the largest suffix
            positioned = cursor.set_range(band_key(band) + b"\xff" * 17)
        return found

    def positions_near(self, band: str, centres: np.ndarray,
                       radii_chord: np.ndarray) -> ColumnDict:
        """Identity and position of the stored observations of ``band`` in the fine pixels
        touching discs (centre unit vectors, chord radii): a superset of those in the discs.

        Read in place: only the fine-pixel column and the rows wanted are read from the map
        (the transaction must be begun with ``buffers=True``, as write transactions are).
        """
        fine = pixels_in_discs(centres, radii_chord, self._nside * FINE_FACTOR)
        return self.rows_in_fine_pixels(band, fine, POSITION_DTYPES)

    def rows_in_fine_pixels(self, band: str, fine: np.ndarray,
                            columns: dict[str, np.dtype] | None = None) -> ColumnDict:
        """``columns`` (default: every column of :data:`OBSERVATION_DTYPES`) of the stored
        observations of ``band`` whose fine pixel (nest, ``storeNside * FINE_FACTOR``) is one
        of ``fine`` (sorted, unique), copied; in key order (store pixel, visit), each
        value's rows in (fine pixel, sourceId) order.

        Read in place: only the fine-pixel column and the rows wanted are read from the map
        (in a transaction begun with ``buffers=True``).
        """
        schema = OBSERVATION_DTYPES if columns is None else columns
        return concat([part.columns(schema) for part in self.values_in_fine_pixels(band, fine)],
                      schema)

    def values_in_fine_pixels(self, band: str, fine: np.ndarray) -> list[FineRows]:
        """The stored values of ``band`` with observations in the fine pixels ``fine``
        (sorted, unique), in key order (store pixel, visit): each as the rows it holds there
        (:class:`FineRows`, in (fine pixel, sourceId) order), read lazily.

        Zero-copy: the rows are read from the map when asked for, so the transaction must be
        a read transaction (begun with ``buffers=True``) that is still open.
        """
        fine = np.asarray(fine, dtype=np.int64)
        coarse = fine >> FINE_SHIFT
        found = []
        for pixel in np.unique(coarse).tolist():
            wanted = fine[coarse == pixel]
            every = len(wanted) == 1 << FINE_SHIFT  # the whole store pixel
            for _, value in self._prefix_items(pixel_key(band, pixel), copy=False):
                n = _OBS_READER.rows(value)
                if every:
                    found.append(FineRows(value, n, np.arange(n)))
                    continue
                fp = _OBS_READER.column(value, "fine_pixel", n)
                # each row's place among the wanted pixels: cheaper than searching every
                # wanted pixel when a value holds fewer rows than there are wanted pixels
                if n < len(wanted):
                    at = np.minimum(np.searchsorted(wanted, fp), len(wanted) - 1)
                    rows = np.flatnonzero(wanted[at] == fp)
                else:
                    lo = np.searchsorted(fp, wanted)
                    hi = np.searchsorted(fp, wanted, side="right")
                    hit = hi > lo
                    lo, length = lo[hit], (hi - lo)[hit]
                    rows = np.repeat(lo - np.cumsum(length) + length, length) + \
                        np.arange(length.sum())
                if len(rows):
                    found.append(FineRows(value, n, rows))
        return found

    def scan(self) -> Iterator[ObservationRecord]:
        """Every stored value in key order (band, pixel, visit): the same order in every scan
        of one transaction."""
        for key, value in self._txn.cursor(db=self._db):
            yield ObservationRecord(key, value)
            self._trimmer.note_access()


# ---------------------------------------------------------------------------------------------
# association state
# ---------------------------------------------------------------------------------------------
class PixelRecordTable(_Table):
    """A (band, pixel)-keyed table of columnar records with a ``comp_id`` column."""

    schema: ClassVar[dict[str, np.dtype]]

    def load(self, band: str, pixels: Iterable[int]) -> tuple[ColumnDict, np.ndarray]:
        """Writable records of ``band`` under ``pixels`` and the pixel each came from."""
        parts, pix = [], []
        for pixel in pixels:
            self._trimmer.note_access()
            raw = self._txn.get(pixel_key(band, int(pixel)), db=self._db)
            if raw is not None:
                part = decode_columns(bytes(raw), self.schema)
                parts.append(part)
                pix.append(np.full(len(part["comp_id"]), pixel, dtype=np.int64))
        records = concat(parts, self.schema)
        if len(parts) == 1:  # concat copies several parts; one part is a read-only view
            records = {k: np.array(v) for k, v in records.items()}
        return records, (np.concatenate(pix) if pix else np.zeros(0, dtype=np.int64))

    def write(self, band: str, table: ColumnDict, pixel: np.ndarray,
              pixels_to_write: np.ndarray) -> None:
        """Write ``table``'s rows grouped by ``pixel`` (sorted by comp_id) for each of
        ``pixels_to_write``; a pixel without rows loses its record."""
        order = np.lexsort((table["comp_id"], pixel))
        sorted_pixels = pixel[order]
        for p in pixels_to_write:
            lo, hi = np.searchsorted(sorted_pixels, [p, p + 1])
            key = pixel_key(band, int(p))
            self._trimmer.note_access()
            if hi > lo:
                self._txn.put(key, encode_columns(take(table, order[lo:hi]), self.schema),
                              db=self._db)
            else:
                self._txn.delete(key, db=self._db)

    def read_band(self, band: str) -> ColumnDict:
        """Every record of ``band``."""
        parts = [decode_columns(v, self.schema) for _, v in self._prefix_items(band_key(band))]
        return concat(parts, self.schema)

    def items(self) -> Iterator[tuple[str, ColumnDict]]:
        """(band, records) of every stored value."""
        for key, value in self._txn.cursor(db=self._db):
            self._trimmer.note_access()
            yield band_from_key(bytes(key)), decode_columns(value, self.schema)


class CandidateTable(PixelRecordTable):
    """``candidates``: the star candidates of non-clique components, by the pixel of their
    component's centre."""

    schema = CANDIDATE_DTYPES


class ComponentTable(PixelRecordTable):
    """``components``: the friends-of-friends component records of each primary band, by the
    pixel of their centre; keeps the ``max_rmax:BAND`` bound in ``meta``."""

    schema = COMPONENT_DTYPES

    def __init__(self, txn: lmdb.Transaction, db: Any, trimmer: MapTrimmer,
                 meta: MetaTable) -> None:
        super().__init__(txn, db, trimmer)
        self._meta = meta

    def max_rmax(self, band: str) -> float:
        """An upper bound on ``rmax`` of every stored component of ``band`` (chord).

        Raised whenever components are written; a store written before the bound existed
        gets it computed once from its components (no format change).
        """
        bound, stored = self._rmax_bound(band)
        if not stored:
            self._meta.put(max_rmax_key(band), MAX_RMAX_VALUE.pack(bound))
        return bound

    def read_max_rmax(self, band: str) -> float:
        """:meth:`max_rmax` for a read transaction: a bound missing from ``meta`` is computed
        from the components and not recorded."""
        return self._rmax_bound(band)[0]

    def _rmax_bound(self, band: str) -> tuple[float, bool]:
        raw = self._meta.get(max_rmax_key(band))
        if raw is not None:
            return float(MAX_RMAX_VALUE.unpack(raw)[0]), True
        bound = 0.0
        for _, value in self._prefix_items(band_key(band)):
            rmax = decode_columns(value, COMPONENT_DTYPES, frozenset({"rmax"}))["rmax"]
            bound = max(bound, float(rmax.max(initial=0.0)))
        return bound, False

    def write(self, band: str, table: ColumnDict, pixel: np.ndarray,
              pixels_to_write: np.ndarray) -> None:
        """:meth:`PixelRecordTable.write`, raising the ``rmax`` bound of ``band``."""
        super().write(band, table, pixel, pixels_to_write)
        if len(table["rmax"]):
            top = float(table["rmax"].max())
            if top > self.max_rmax(band):
                self._meta.put(max_rmax_key(band), MAX_RMAX_VALUE.pack(top))


class MemberTable(_Table):
    """``members``: the member lists (:data:`MEMBER_DTYPE` rows) of tracked components.

    In a write transaction values go through the writer's cache
    (:class:`streamstars.state.cache.WriteCache`).
    """

    def __init__(self, txn: lmdb.Transaction, db: Any, trimmer: MapTrimmer,
                 cache: WriteCache | None) -> None:
        super().__init__(txn, db, trimmer)
        self._cache = cache if cache is not None and cache.active else None

    def find(self, band: str, comp_id: int) -> bytes | None:
        """The member list of a component (raw rows), or None."""
        key = member_key(band, comp_id)
        if self._cache is None:
            raw = self._txn.get(key, db=self._db)
            return None if raw is None else bytes(raw)
        ckey = (DB_MEMBERS, key)
        value = self._cache.get(ckey)
        if value is None or isinstance(value, bytes):
            return value
        self._trimmer.note_access()
        raw = self._txn.get(key, db=self._db)
        if raw is None:
            return None
        found = bytes(raw)
        self._cache.keep(ckey, found)  # a committed value: valid for later visits too
        return found

    def get(self, band: str, comp_id: int) -> bytes:
        """The member list of a tracked component (raw rows).

        Raises:
            StateError: it has none (the store is inconsistent).
        """
        raw = self.find(band, comp_id)
        if raw is None:
            raise StateError(f"store is inconsistent: band {band} component {comp_id} is "
                             "tracked but has no member list; rebuild the store")
        return raw

    def read(self, band: str, comp_ids: np.ndarray) -> np.ndarray:
        """The member rows of tracked components, concatenated in the order of ``comp_ids``."""
        parts = [self.get(band, c) for c in comp_ids.tolist()]
        # one buffer, one view: concatenating structured arrays is slow
        return np.frombuffer(b"".join(parts), dtype=MEMBER_DTYPE)

    def put(self, band: str, comp_id: int, value: bytes) -> None:
        """Store the member list (raw :data:`MEMBER_DTYPE` rows) of a component."""
        key = member_key(band, comp_id)
        self._trimmer.note_access()
        self._txn.put(key, value, db=self._db)
        if self._cache is not None:
            self._cache.put((DB_MEMBERS, key), value)

    def delete(self, band: str, comp_id: int) -> None:
        """Forget the member list of a component that no longer exists."""
        key = member_key(band, comp_id)
        self._trimmer.note_access()
        self._txn.delete(key, db=self._db)
        if self._cache is not None:
            self._cache.delete((DB_MEMBERS, key))

    def append(self, band: str, old_id: int, new_id: int, rows: bytes) -> None:
        """Append ``rows`` to a member list whose component id changes from ``old_id`` to
        ``new_id`` (equal when it does not)."""
        value = self.get(band, old_id) + rows
        if old_id != new_id:
            self.delete(band, old_id)
        self.put(band, new_id, value)


def member_rows(source_id: np.ndarray, visit: np.ndarray, fixed: np.ndarray) -> np.ndarray:
    """:data:`MEMBER_DTYPE` rows of observations (fixed-point unit vectors ``fixed``)."""
    rows = np.zeros(len(source_id), dtype=MEMBER_DTYPE)
    rows["source_id"], rows["visit"] = source_id, visit
    rows["x"], rows["y"], rows["z"] = fixed[:, 0], fixed[:, 1], fixed[:, 2]
    return rows


# ---------------------------------------------------------------------------------------------
# reference-star cache
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _refcache_schema(n_filters: int) -> dict[str, np.dtype]:
    return refcache_schema(n_filters)


class ReferenceCacheTable(_Table):
    """``refmatch``: the selected reference stars of each pixel, cached (docs/references.md)."""

    def missing(self, pixels: Iterable[int]) -> np.ndarray:
        """The pixels (in the order given) without a record yet."""
        out = []
        for p in pixels:
            self._trimmer.note_access()
            if self._txn.get(refs_key(p), db=self._db) is None:
                out.append(p)
        return np.array(out, dtype=np.int64)

    def put(self, pixel: int, columns: ColumnDict, n_filters: int) -> None:
        """Store the reference stars of ``pixel`` (columns of :func:`refcache_schema`, sorted
        by ``ref_id``; none is a record too: the pixel is never loaded again)."""
        self._trimmer.note_access()
        self._txn.put(refs_key(pixel), encode_columns(columns, _refcache_schema(n_filters)),
                      db=self._db)

    def items(self, n_filters: int) -> Iterator[tuple[int, ColumnDict]]:
        """(pixel, stars) of every record (empty ones included), in pixel order."""
        schema = _refcache_schema(n_filters)
        for key, value in self._txn.cursor(db=self._db):
            self._trimmer.note_access()
            yield int.from_bytes(bytes(key), "big"), decode_columns(bytes(value), schema)

    def records(self, n_filters: int) -> Iterator[ColumnDict]:
        """The non-empty records, in pixel order."""
        schema = _refcache_schema(n_filters)
        for _, value in self._txn.cursor(db=self._db):
            self._trimmer.note_access()
            part = decode_columns(bytes(value), schema)
            if len(part["ref_id"]):
                yield part
