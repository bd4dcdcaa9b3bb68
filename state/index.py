"""The visit index of a state directory (``STATE/index/``): one small LMDB environment.

It says, for every visit, which sky shards it was routed to and how far its application went,
so that a crash between two shards' commits is repaired (docs/state.md, "Applying a visit
across shards").  Written only by the process that drives the applications (``backfill``,
``run``, ``retract``, ``refresh-refs``); read by anyone.

Sub-databases (key -> value):

==========  ===================================================================================
``meta``    ``format_version`` (ASCII ``2``), ``created``, ``config`` (the state's current
            configuration, JSON), ``refcat`` (JSON identity of the reference catalog the
            shards cache, absent without one)
``visits``  :func:`~streamstars.state.schema.int_key` (visit) -> JSON :class:`IndexRecord`
``offsets`` :func:`~streamstars.state.schema.offset_key` -> next Kafka offset to consume
            (:data:`~streamstars.state.schema.OFFSET_VALUE`) of the single consumer
``shards``  shard nest pixel (8 bytes big-endian) -> empty: the shards that hold committed data
            (registered once a visit's shards all committed); a registered shard whose
            directory is missing is an error naming it
==========  ===================================================================================
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import lmdb

from streamstars.errors import StateError
from streamstars.state.environment import check_free_disk, grow_map, min_free_disk, open_env
from streamstars.state.schema import (
    OFFSET_VALUE,
    int_from_key,
    int_key,
    offset_from_key,
    offset_key,
)

T = TypeVar("T")

INDEX_FORMAT_VERSION = 2
INDEX_DBS = (b"meta", b"visits", b"offsets", b"shards")
_DB_META, _DB_VISITS, _DB_OFFSETS, _DB_SHARDS = INDEX_DBS
META_FORMAT_VERSION = b"format_version"
META_CREATED = b"created"
META_CONFIG = b"config"
META_REFCAT = b"refcat"
_PIXEL = struct.Struct(">Q")

#: ``applying``: the intent was recorded, the shards' commits may be incomplete;
#: ``applied``: every shard of ``shards`` committed it; ``retracting``: being removed from
#: ``shards`` and ``old_shards``.
IndexStatus = Literal["applying", "applied", "retracting"]
_REQUIRED = ("visit", "band", "content_hash", "status", "shards")


@dataclass
class IndexRecord:
    """What the index keeps of one visit.

    Attributes:
        visit: the visit id.
        band: its band.
        content_hash: the content hash of what is (being) applied (docs/state.md).
        status: see :data:`IndexStatus`.
        shards: the shards it is recorded in (sorted nest pixels at ``shardNside``): those
            its selected rows are routed to, and its home shard.
        old_shards: shards that may still hold an older version of it (a replacement or a
            retraction in progress): the visit is removed from those not in ``shards``.
        n_sources, n_selected: source-table rows read, observations selected (the visit's).
        dropped_rows: rows dropped for unusable coordinates, by reason.
        files, source_paths, dataset_ids, metadata_source: where it was read from (for
            resuming; a visit skipped as unchanged follows its moved files).
        kafka: [topic, partition, next offset] when it came from Kafka.
    """

    visit: int
    band: str
    content_hash: str
    status: IndexStatus
    shards: list[int]
    old_shards: list[int] = field(default_factory=list)
    n_sources: int = 0
    n_selected: int = 0
    dropped_rows: dict[str, int] = field(default_factory=dict)
    files: list[list[Any]] | None = None
    source_paths: list[str] | None = None
    dataset_ids: list[str] | None = None
    metadata_source: str | None = None
    kafka: list[Any] | None = None

    @classmethod
    def from_json(cls, raw: bytes) -> IndexRecord:
        """Parse a stored record.

        Raises:
            StateError: not an index record.
        """
        values = json.loads(raw)
        missing = [k for k in _REQUIRED if k not in values]
        if missing:
            raise StateError(f"a visit record of the state's index lacks {missing} (visit "
                             f"{values.get('visit', '?')}); the index is damaged: rebuild the "
                             "state with `streamstars backfill` into a new directory")
        known = {k: values[k] for k in cls.__dataclass_fields__ if k in values}
        return cls(**known)

    def to_json(self) -> bytes:
        """The stored form (JSON, sorted keys; empty optional values left out)."""
        values = {k: getattr(self, k) for k in self.__dataclass_fields__}
        return json.dumps({k: v for k, v in values.items()
                           if k in _REQUIRED or v not in (None, [], {})},
                          sort_keys=True).encode()


class IndexTransaction:
    """The index's tables inside one LMDB transaction."""

    def __init__(self, txn: lmdb.Transaction, dbs: dict[bytes, Any]) -> None:
        self._txn = txn
        self._dbs = dbs

    # visits
    def get(self, visit: int) -> IndexRecord | None:
        """The record of ``visit`` or None."""
        raw = self._txn.get(int_key(visit), db=self._dbs[_DB_VISITS])
        return None if raw is None else IndexRecord.from_json(bytes(raw))

    def put(self, record: IndexRecord) -> None:
        """Store (or replace) the record of ``record.visit``."""
        self._txn.put(int_key(record.visit), record.to_json(), db=self._dbs[_DB_VISITS])

    def delete(self, visit: int) -> None:
        """Remove the record of ``visit`` (absent: nothing happens)."""
        self._txn.delete(int_key(visit), db=self._dbs[_DB_VISITS])

    def items(self) -> Iterator[tuple[int, IndexRecord]]:
        """(visit, record) of every visit, in visit order."""
        for key, value in self._txn.cursor(db=self._dbs[_DB_VISITS]):
            yield int_from_key(bytes(key)), IndexRecord.from_json(bytes(value))

    def count(self) -> int:
        """Number of visits with a record."""
        return int(self._txn.stat(self._dbs[_DB_VISITS])["entries"])

    # offsets
    def put_offset(self, topic: str, partition: int, next_offset: int) -> None:
        """Record the next offset of (topic, partition)."""
        self._txn.put(offset_key(topic, partition), OFFSET_VALUE.pack(next_offset),
                      db=self._dbs[_DB_OFFSETS])

    def offsets(self) -> Iterator[tuple[str, int, int]]:
        """(topic, partition, next offset) of every recorded Kafka position."""
        for raw_key, value in self._txn.cursor(db=self._dbs[_DB_OFFSETS]):
            topic, partition = offset_from_key(bytes(raw_key))
            yield topic, partition, int(OFFSET_VALUE.unpack(bytes(value))[0])

    # shards
    def register_shards(self, pixels: list[int]) -> None:
        """Record that these shards hold committed data."""
        for pixel in pixels:
            self._txn.put(_PIXEL.pack(int(pixel)), b"", db=self._dbs[_DB_SHARDS],
                          overwrite=False)

    def registered_shards(self) -> list[int]:
        """Every shard that holds committed data (sorted)."""
        return [int(_PIXEL.unpack(bytes(k))[0])
                for k, _ in self._txn.cursor(db=self._dbs[_DB_SHARDS])]

    # meta
    def get_meta(self, key: bytes) -> bytes | None:
        """A raw ``meta`` value."""
        raw = self._txn.get(key, db=self._dbs[_DB_META])
        return None if raw is None else bytes(raw)

    def put_meta(self, key: bytes, value: bytes | None) -> None:
        """Set (``None``: remove) a raw ``meta`` value."""
        if value is None:
            self._txn.delete(key, db=self._dbs[_DB_META])
        else:
            self._txn.put(key, value, db=self._dbs[_DB_META])


class VisitIndex:
    """The open index environment.  :meth:`read` gives one consistent view, :meth:`write`
    runs a body in one write transaction.

    Attributes:
        path: ``STATE/index``.
        env: the LMDB environment (crash tests wrap it to arm kill timers at commits).
    """

    def __init__(self, path: Path, env: lmdb.Environment, readonly: bool) -> None:
        self.path = path
        self.env = env
        self.readonly = readonly
        self._dbs = {name: env.open_db(name, create=not readonly) for name in INDEX_DBS}
        self.min_free_disk = min_free_disk()

    @classmethod
    def create(cls, path: Path, meta: dict[bytes, bytes]) -> None:
        """Create the index environment in the (new, empty) directory ``path``."""
        env = open_env(path, readonly=False)
        try:
            dbs = {name: env.open_db(name) for name in INDEX_DBS}
            with env.begin(write=True) as txn:
                txn.put(META_FORMAT_VERSION, str(INDEX_FORMAT_VERSION).encode(),
                        db=dbs[_DB_META])
                for key, value in meta.items():
                    txn.put(key, value, db=dbs[_DB_META])
        finally:
            env.close()

    @classmethod
    def open(cls, path: Path, readonly: bool) -> VisitIndex:
        """Open the index of a state directory.

        Raises:
            StateError: missing, unreadable, or not a visit index of this format.
        """
        if not (path / "data.mdb").exists():
            raise StateError(f"the visit index {path} is missing (no data.mdb): the state "
                             "directory is damaged; restore it from a backup, or rebuild it "
                             "with `streamstars backfill` into a new directory")
        env = open_env(path, readonly)
        try:
            index = cls(path, env, readonly)
            with index.read() as tx:
                version = tx.get_meta(META_FORMAT_VERSION)
            if version is None or version.decode() != str(INDEX_FORMAT_VERSION):
                raise StateError(f"{path} is not a visit index of format version "
                                 f"{INDEX_FORMAT_VERSION}; the state directory is damaged")
            return index
        except lmdb.Error as exc:
            env.close()
            raise StateError(f"the visit index {path} cannot be read ({exc}); the state "
                             "directory is damaged") from exc
        except BaseException:
            env.close()
            raise

    def close(self) -> None:
        """Close the environment (idempotent)."""
        self.env.close()

    @contextmanager
    def read(self) -> Iterator[IndexTransaction]:
        """One read-only view of the index."""
        while True:
            try:
                txn = self.env.begin(write=False)
                break
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)
        try:
            yield IndexTransaction(txn, self._dbs)
        finally:
            txn.abort()

    def write(self, body: Callable[[IndexTransaction], T]) -> T:
        """Run ``body(tx)`` in ONE write transaction (again from scratch after the map grew).

        Raises:
            StateError: opened read-only.
            DiskFullError: the disk is nearly full (nothing was written).
        """
        if self.readonly:
            raise StateError(f"the visit index {self.path} was opened read-only")
        check_free_disk(self.path, self.min_free_disk)
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    return body(IndexTransaction(txn, self._dbs))
            except lmdb.MapFullError:
                grow_map(self.env)

    def get(self, visit: int) -> IndexRecord | None:
        """The record of ``visit`` (own read transaction) or None."""
        with self.read() as tx:
            return tx.get(visit)

    def put(self, record: IndexRecord) -> None:
        """Store the record of one visit in its own transaction."""
        self.write(lambda tx: tx.put(record))
