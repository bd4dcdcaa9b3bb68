"""A star store: one LMDB environment holding the association state of a set of visits.

:class:`StarStore` opens (or creates) the environment and runs transactions on it:
``store.write(body)`` runs ``body(tx)`` in ONE write transaction (re-run from scratch after
the map grows), ``with store.read() as tx`` gives one consistent read-only view.  ``tx`` is a
:class:`~streamstars.state.transaction.Transaction` whose named tables are the only way to
the data.  The storage contract (sub-databases, keys, value schemas, meta keys) is
:mod:`streamstars.state.schema`; the LMDB engine (opening, the free-disk guard, map trimming)
is :mod:`streamstars.state.environment`; the writer's member-list cache is
:class:`~streamstars.state.cache.WriteCache`.  docs/state.md describes the layout.

A store holds no reference to the algorithms: what to cache from a reference catalog, how to
associate, is decided by the callers (streamstars.ingest, streamstars.references) through the
tables.  Several stores may be open in one process (one per sky shard, later): nothing here is
process-global.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import lmdb
import numpy as np

from streamstars.config import BuildStarsConfig, config_from_json
from streamstars.errors import ConfigError, StateError
from streamstars.staging import staged_directory
from streamstars.state.cache import WriteCache
from streamstars.state.environment import (
    MapTrimmer,
    check_free_disk,
    grow_map,
    map_rss_budget,
    min_free_disk,
    open_dbs,
)
from streamstars.state.environment import open_env as _open_env
from streamstars.state.environment import refuse_foreign as _refuse_foreign
from streamstars.state.records import VisitRecord
from streamstars.state.schema import (
    ALL_DBS,
    DB_META,
    FORMAT_VERSION,
    META_CONFIG,
    META_CREATED,
    META_FINGERPRINT,
    META_FORMAT_VERSION,
    META_INSTANCE,
    META_SHARD,
    META_SOURCE_INDEX,
    OPTIONAL_DBS,
)
from streamstars.state.tables import config_value
from streamstars.state.transaction import Transaction

T = TypeVar("T")
log = logging.getLogger(__name__)


class StarStore:
    """An open star store.  Use :meth:`open`; close with :meth:`close` or a ``with`` block.

    Attributes:
        path: the state directory.
        config: the effective configuration (the stored one, or the one given to
            :meth:`open` when it agrees with the stored one).
        readonly: opened for reading only.
        env: the LMDB environment (write transactions are begun on it).
        dbs: handles of the sub-databases (for the tables; nothing outside ``state/`` uses
            them).
        trimmer: keeps the resident part of the map under ``STREAMSTARS_MAP_RSS_MB``.
        cache: the writer's member-list cache.
        min_free_disk: bytes the store's file system must have free for a write to begin.
    """

    def __init__(self, path: Path, env: lmdb.Environment, config: BuildStarsConfig,
                 readonly: bool, trimmer: MapTrimmer | None = None,
                 meta: dict[str, bytes] | None = None) -> None:
        self.path = path
        self.config = config
        self.readonly = readonly
        self.env = env
        self.dbs = open_dbs(env, readonly, OPTIONAL_DBS)
        #: the sourceId index was checked (:meth:`ensure_source_index`)
        self.source_index_checked = False
        self.min_free_disk = min_free_disk()
        self.trimmer = MapTrimmer() if trimmer is None else trimmer
        self.trimmer.watch(path / "data.mdb")
        self.cache = WriteCache()
        meta = meta or {}
        raw_shard = meta.get(META_SHARD.decode())
        #: the sky shard this store is (``{"order", "pixel", "nside", "margin"}``), or None
        self.shard: dict[str, Any] | None = None if raw_shard is None else json.loads(raw_shard)
        raw_instance = meta.get(META_INSTANCE.decode())
        #: the UUID drawn when the environment was created (None in older stores)
        self.instance: str | None = None if raw_instance is None else raw_instance.decode()
        self._closed = False

    # ------------------------------------------------------------------ opening / closing
    @classmethod
    def open(cls, path: str | Path, config: BuildStarsConfig | None = None, *,
             readonly: bool = False, trimmer: MapTrimmer | None = None,
             shard: dict[str, Any] | None = None,
             extra_meta: dict[bytes, bytes] | None = None) -> StarStore:
        """Open (or create) the store in directory ``path``.

        ``config`` None means: use the configuration the store was built with.  A given config
        must agree with the stored one on everything that shapes stored data
        (:meth:`BuildStarsConfig.association_fingerprint`); snapshot-time settings may differ.

        A read-only open of a directory this process cannot write (a backup on a read-only
        file system, another user's store) goes without LMDB's lock file: it cannot be
        created there, and no writer can be working in such a directory.

        ``trimmer``: share the map budget with other stores of this process (by default the
        store has its own, :class:`~streamstars.state.environment.MapTrimmer`).

        ``shard``: the store is this sky shard (``{"order", "pixel", "nside", "margin"}``,
        :mod:`streamstars.state.directory`): recorded in a new store (meta ``shard``), and an
        existing store must have recorded the same.  ``extra_meta``: more meta values written
        when the store is created (e.g. the state's reference-catalog identity).

        Raises:
            StateError: not a store (also another program's LMDB environment, which is never
                written to), another format version, an incompatible config, or another shard.
        """
        path = Path(path)
        map_rss_budget()  # bad settings fail before anything is created
        min_free_disk()
        if not (path / "data.mdb").exists():
            if readonly or config is None:
                raise StateError(f"{path} is not a streamstars state directory (no data.mdb); "
                                 "create one with `streamstars backfill` or `streamstars run`")
            _create(path, config, shard, extra_meta or {})
        elif not readonly:
            _refuse_foreign(path)  # before a writer's open could change anything there
        env = _open_env(path, readonly)
        try:
            stored = _read_meta(env)
            if stored is None:
                raise StateError(f"{path} holds no streamstars metadata; it is not a "
                                 "streamstars state directory")
            effective = _check_meta(path, stored, config)
            _check_shard(path, stored, shard)
            return cls(path, env, effective, readonly, trimmer, stored)
        except BaseException:
            env.close()
            raise

    def close(self) -> None:
        """Close the environment (idempotent)."""
        self.trimmer.unwatch(self.path / "data.mdb")
        self.env.close()
        self._closed = True

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def generation(self) -> tuple[str | None, int]:
        """``(instance, LMDB's last transaction id)``: changes with every write transaction
        that changed data (a store rebuilt in the same place gets a new instance); what an
        incremental snapshot compares to tell an unchanged store."""
        return self.instance, int(self.env.info()["last_txnid"])

    def __enter__(self) -> StarStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ memory
    @property
    def map_rss_budget(self) -> int:
        """Bytes of the map this process may keep resident (``STREAMSTARS_MAP_RSS_MB``)."""
        return self.trimmer.budget

    @property
    def map_trims(self) -> int:
        """How many times the map was trimmed (mapping ranges dropped)."""
        return self.trimmer.trims

    def trim_map_if_large(self, *, force: bool = False) -> bool:
        """Drop the map's pages from this process when they grow large (or, with ``force``,
        whatever their size); see :meth:`MapTrimmer.trim_if_large`.  Returns True if it
        trimmed."""
        return self.trimmer.trim_if_large(force=force)

    # ------------------------------------------------------------------ transactions
    def write(self, body: Callable[[Transaction], T]) -> T:
        """Run ``body(tx)`` in ONE write transaction and commit it.

        On ``MapFullError`` the transaction is aborted, the map size doubled and ``body``
        run again from scratch, so ``body`` must not have side effects outside the
        transaction.

        Raises:
            StateError: the store was opened read-only.
            DiskFullError: the store's file system is nearly full (nothing was written).
        """
        if self.readonly:
            raise StateError(f"store {self.path} was opened read-only")
        check_free_disk(self.path, self.min_free_disk)
        while True:
            self.cache.begin(self.env.info()["last_txnid"])
            try:
                # buffers: values are read in place from the map (zero-copy) where a table
                # asks for it; everything else copies with bytes()
                with self.env.begin(write=True, buffers=True) as txn:
                    txn_id = txn.id()
                    result = body(Transaction(txn, self.dbs, self.trimmer, path=self.path,
                                              config=self.config, cache=self.cache,
                                              writable=True))
                break
            except lmdb.MapFullError:
                self.cache.discard()
                grow_map(self.env)
            except BaseException:
                self.cache.discard()
                raise
        self.cache.commit(txn_id)
        self.trim_map_if_large()
        return result

    @contextmanager
    def read(self, *, buffers: bool = False) -> Iterator[Transaction]:
        """A read transaction: one consistent MVCC view while writers go on.

        ``buffers=True``: values are zero-copy views of the map, valid until the transaction
        ends (callers must copy what they keep).
        """
        while True:
            try:
                txn: lmdb.Transaction = (self.env.begin(write=False, buffers=True) if buffers
                                         else self.env.begin(write=False))
                break
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)
        try:
            yield Transaction(txn, self.dbs, self.trimmer, path=self.path, config=self.config)
        finally:
            txn.abort()

    # ------------------------------------------------------------------ small reads and writes
    def visit_record(self, visit: int) -> VisitRecord | None:
        """The stored record of ``visit`` (own read transaction) or None."""
        with self.read() as tx:
            return tx.visits.get(visit)

    def applied_visits(self) -> dict[int, str]:
        """visit -> content hash of every applied visit."""
        with self.read() as tx:
            return {visit: rec.content_hash for visit, rec in tx.visits.items()}

    def record_offset(self, topic: str, partition: int, next_offset: int) -> None:
        """Record an offset in its own transaction (events that change nothing else)."""
        self.write(lambda tx: tx.offsets.put(topic, partition, next_offset))

    def stored_offsets(self, topic: str) -> dict[int, int]:
        """partition -> next offset to consume, for ``topic``."""
        with self.read() as tx:
            return {p: o for t, p, o in tx.offsets.items() if t == topic}

    def get_meta(self, key: bytes) -> bytes | None:
        """A raw value of the ``meta`` sub-database (own read transaction)."""
        with self.read() as tx:
            return tx.meta.get(key)

    def map_size_bytes(self) -> int:
        """The current size of the memory map (``data.mdb`` is a sparse file this large)."""
        return int(self.env.info()["map_size"])

    def used_bytes(self) -> int:
        """Bytes of the map in use (up to its last page)."""
        return int((self.env.info()["last_pgno"] + 1) * self.env.stat()["psize"])

    def ensure_source_index(self) -> None:
        """Build the sourceId index of a store written before it existed (once per store; a
        no-op for stores that have it, checked once per open store)."""
        if self.source_index_checked or self.readonly:
            return
        if self.get_meta(META_SOURCE_INDEX) is None:
            def body(tx: Transaction) -> int:
                shared = tx.source_ids.rebuild(_stored_ids(tx))
                tx.meta.mark_source_index_complete()
                return shared

            shared = self.write(body)
            log.warning("built the sourceId index of %s (a store written by an older "
                        "streamstars)%s", self.path,
                        f"; {shared} sourceIds are stored for more than one visit: retract the "
                        "wrong visits" if shared else "")
        self.source_index_checked = True

    def backup(self, dest: str | Path) -> Path:
        """Copy the store, as of one read transaction, into the new directory ``dest``.

        LMDB's compacting copy (``mdb_env_copy2``): free pages are left out, so the copy is
        as large as the data (not sparse), and it is consistent — every visit with its
        observations, components and Kafka offset, or none — while a writer goes on.  It is
        written into a hidden sibling directory ``.<dest>.backup-<pid>-<random>``, locked
        (``flock``) while the copy runs, and renamed into place, so ``dest`` is either
        complete or absent.  Such directories left behind by a killed backup of the same
        ``dest`` (unlocked, their process gone) are removed first; one of a backup still
        running is left alone (:func:`streamstars.staging.staged_directory`).  Returns
        ``dest``.

        Raises:
            StateError: ``dest`` exists and is not an empty directory, or the copy failed.
        """
        dest = Path(dest)
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise StateError(f"backup destination {dest} exists and is not an empty directory")
        try:
            with staged_directory(dest, "backup") as building:
                self.env.copy(str(building.path), compact=True)
                building.replace_empty_target()
        except (lmdb.Error, OSError) as exc:
            raise StateError(f"cannot back up {self.path} to {dest}: {exc}") from exc
        return dest


def _stored_ids(tx: Transaction) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(sourceIds, visits) of every stored observation record, copied (the index is written
    in the same transaction, which ends zero-copy views)."""
    wanted = frozenset({"source_id", "visit"})
    for record in tx.observations.scan():
        cols = record.columns(wanted)
        yield np.array(cols["source_id"]), np.array(cols["visit"])


def _create(path: Path, config: BuildStarsConfig, shard: dict[str, Any] | None,
            extra_meta: dict[bytes, bytes]) -> None:
    """Create a new store atomically: built beside ``path`` with its metadata and every
    sub-database, then renamed into place, so a reader never sees a half-created store."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise StateError(f"{path} exists and is not a streamstars state directory (no "
                         "data.mdb); give an empty or new directory")
    try:
        with staged_directory(path, "creating") as building:
            env = _open_env(building.path, readonly=False)
            try:
                for name in ALL_DBS:
                    env.open_db(name)
                extra = dict(extra_meta)
                if shard is not None:
                    extra[META_SHARD] = _shard_value(shard)
                _write_meta(env, config, extra)
            finally:
                env.close()
            building.replace_empty_target()
    except OSError:
        if not (path / "data.mdb").exists():  # another process did not just create it
            raise


def _read_meta(env: lmdb.Environment) -> dict[str, bytes] | None:
    try:
        meta_db = env.open_db(DB_META, create=False)
    except lmdb.Error:  # absent, or a plain key of that name: not a store
        return None
    with env.begin() as txn:
        values = {k.decode(): bytes(v) for k, v in txn.cursor(db=meta_db)}
    return values or None


def _shard_value(shard: dict[str, Any]) -> bytes:
    return json.dumps(shard, sort_keys=True).encode()


def _check_shard(path: Path, stored: dict[str, bytes], shard: dict[str, Any] | None) -> None:
    """An existing store opened as a shard must be that shard (a directory copied or moved
    into another shard's place is refused)."""
    if shard is None:
        return
    raw = stored.get(META_SHARD.decode())
    if raw is None or json.loads(raw) != shard:
        raise StateError(
            f"{path} should hold the sky shard {json.dumps(shard, sort_keys=True)} but holds "
            f"{raw.decode() if raw else 'no shard identity'}; a shard directory was moved or "
            "copied: restore the state directory from a backup, or rebuild it with "
            "`streamstars backfill` into a new directory")


def _write_meta(env: lmdb.Environment, config: BuildStarsConfig,
                extra: dict[bytes, bytes]) -> None:
    meta_db = env.open_db(DB_META)
    with env.begin(write=True) as txn:
        txn.put(META_INSTANCE, str(uuid.uuid4()).encode(), db=meta_db)
        for key, value in extra.items():
            txn.put(key, value, db=meta_db)
        txn.put(META_FORMAT_VERSION, str(FORMAT_VERSION).encode(), db=meta_db)
        txn.put(META_CONFIG, config_value(config), db=meta_db)
        txn.put(META_FINGERPRINT,
                json.dumps(config.association_fingerprint(), sort_keys=True).encode(), db=meta_db)
        txn.put(META_CREATED, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()).encode(),
                db=meta_db)
        txn.put(META_SOURCE_INDEX, b"1", db=meta_db)  # an empty store's index is complete


def _check_meta(path: Path, stored: dict[str, bytes],
                config: BuildStarsConfig | None) -> BuildStarsConfig:
    version = stored.get(META_FORMAT_VERSION.decode())
    if version is None or int(version) != FORMAT_VERSION:
        raise StateError(
            f"{path} is a streamstars store of format version "
            f"{version.decode() if version else 'unknown'}, this streamstars reads version "
            f"{FORMAT_VERSION}; rebuild it with `streamstars backfill` into a new directory"
        )
    try:
        stored_config = config_from_json(stored[META_CONFIG.decode()].decode())
    except ConfigError as exc:
        raise StateError(
            f"{path} was built with a configuration this streamstars refuses ({exc}); "
            "rebuild it with a valid configuration into a new state directory") from exc
    if config is None:
        return stored_config
    old = json.loads(stored[META_FINGERPRINT.decode()])
    new = config.association_fingerprint()
    if old != new:
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        details = "; ".join(f"{k}: stored {old.get(k)!r}, given {new.get(k)!r}" for k in keys)
        raise StateError(
            f"{path} was built with an incompatible configuration ({details}). "
            "Use the original configuration, or rebuild into a new state directory."
        )
    return config
