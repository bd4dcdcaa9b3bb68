"""A state directory (format version 2): a manifest, the visit index and one store per sky shard.

::

    STATE/
      manifest.json            written once, when the directory is created
      index/                   the visit index (:class:`~streamstars.state.index.VisitIndex`)
      shards/<order>/<pixel>/  one :class:`~streamstars.state.store.StarStore` per shard that
                               has data (``order = log2(shardNside)``, ``pixel`` its nest
                               pixel, both decimal), created the first time a visit routes
                               rows (or its home) to it

A *shard* is a HEALPix nest pixel at ``shardNside``; its store holds the observations inside
it (core) and within ``shardMargin`` arcsec outside it (margin) with the association state
over both (docs/state.md).  Which observation goes where is decided by the callers
(:mod:`streamstars.ingest`, with :mod:`streamstars.shards`); this module only keeps the
directory: creation (staged, so a reader never sees half a directory), the manifest, the
format-1 refusal, the configuration check, opening shards lazily (every store of one
:class:`StateDirectory` shares one :class:`~streamstars.state.environment.MapTrimmer`),
creating them (staged), closing them, backups.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lmdb

from streamstars.config import BuildStarsConfig, config_from_json
from streamstars.errors import ConfigError, ShardError, StateError
from streamstars.staging import staged_directory
from streamstars.state.environment import (
    MapTrimmer,
    map_rss_budget,
    min_free_disk,
    open_env,
    refuse_foreign,
)
from streamstars.state.index import (
    META_CONFIG,
    META_CREATED,
    META_REFCAT,
    IndexRecord,
    VisitIndex,
)
from streamstars.state.records import VisitRecord
from streamstars.state.schema import DB_META, META_FORMAT_VERSION
from streamstars.state.schema import META_REFCAT as STORE_META_REFCAT
from streamstars.state.store import StarStore
from streamstars.state.tables import config_value

MANIFEST_NAME = "manifest.json"
#: index ``meta`` key: JSON list of the shards whose partition was revoked (group consumers)
META_REVOKED = b"revoked"
INDEX_DIR = "index"
SHARDS_DIR = "shards"
STATE_FORMAT = "streamstars-state"
STATE_FORMAT_VERSION = 2
#: Shard stores a writer keeps open at most between visits (:meth:`StateDirectory.keep_open`):
#: each open environment holds two file descriptors and a map.
MAX_OPEN_SHARDS = 128

ShardOpened = Callable[[StarStore], None]


def shard_order(nside: int) -> int:
    """``log2(nside)``: the HEALPix order of the shards."""
    return int(nside).bit_length() - 1


class StateDirectory:
    """An open state directory.  Use :meth:`open`; close with :meth:`close` or ``with``.

    Attributes:
        path: the directory.
        config: the effective configuration (the given one, when it agrees with the state's,
            else the state's).
        readonly: opened for reading only.
        manifest: the parsed ``manifest.json``.
        index: the visit index.
        trimmer: the map budget shared by every store this object opens.
        shard_opened: called with every shard store this object opens (instrumentation: the
            consumer's crash-test hooks arm kill timers on its commits); None by default.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], index: VisitIndex,
                 config: BuildStarsConfig, readonly: bool, trimmer: MapTrimmer,
                 lock_fd: int | None) -> None:
        self.path = path
        self.manifest = manifest
        self.index = index
        self.config = config
        self.readonly = readonly
        self.trimmer = trimmer
        self.shard_opened: ShardOpened | None = None
        self._lock_fd = lock_fd
        self._stores: OrderedDict[int, StarStore] = OrderedDict()
        self._closed = False

    # ------------------------------------------------------------------ opening / closing
    @classmethod
    def open(cls, path: str | Path, config: BuildStarsConfig | None = None, *,
             readonly: bool = False, trimmer: MapTrimmer | None = None,
             writer_lock: bool = True) -> StateDirectory:
        """Open (or, with ``config`` and not ``readonly``, create) the state directory ``path``.

        ``config`` None means: use the configuration the state was built with.  A given config
        must agree with the state's on everything that shapes stored data
        (:meth:`BuildStarsConfig.association_fingerprint`: also ``shardNside`` and
        ``shardMargin``); snapshot-time settings may differ.  A writer takes an exclusive lock
        on the directory (one writing process at a time: ``backfill``, ``run``, ``retract``,
        ``refresh-refs``); ``writer_lock=False`` is for the worker processes of the process
        holding it.

        Raises:
            StateError: not a state directory (a format-1 store, another program's LMDB
                environment, a non-empty directory), an incompatible config, a damaged
                manifest or index, a shard the index knows whose directory is missing, or
                another process writing it.
        """
        path = Path(path)
        map_rss_budget()  # bad settings fail before anything is created
        min_free_disk()
        manifest_path = path / MANIFEST_NAME
        if not manifest_path.exists():
            _refuse_other_directory(path)
            if readonly or config is None:
                raise StateError(f"{path} is not a streamstars state directory (no "
                                 f"{MANIFEST_NAME}); create one with `streamstars backfill` or "
                                 "`streamstars run`")
            _create(path, config)
        manifest = _read_manifest(manifest_path)
        effective = _check_config(path, manifest, config)
        lock_fd = None
        if not readonly and writer_lock:
            lock_fd = _lock_writer(path)
        try:
            index = VisitIndex.open(path / INDEX_DIR, readonly)
        except BaseException:
            _unlock(lock_fd)
            raise
        try:
            if config is None:
                with index.read() as tx:
                    raw = tx.get_meta(META_CONFIG)
                if raw is not None:
                    effective = _config_from(path, raw.decode())
            state = cls(path, manifest, index, effective, readonly,
                        trimmer if trimmer is not None else MapTrimmer(), lock_fd)
            state.check_shards_present()
            return state
        except BaseException:
            index.close()
            _unlock(lock_fd)
            raise

    @contextmanager
    def visit_boundary(self, *, exclusive: bool) -> Iterator[None]:
        """Hold the state's *visit boundary* (``flock`` on ``STATE/visits.lock``).

        A writer holds it exclusively while a visit goes from its intent to its last shard
        commit (a parallel backfill: for its whole run); a snapshot holds it shared while it
        opens its read transactions of every shard, so that it sees each visit in all of its
        shards or in none.  Each call opens its own descriptor: two threads of one process
        exclude each other like two processes.  A read-only directory without the file (no
        writer ever opened it) needs no boundary.
        """
        lock_path = self.path / BOUNDARY_NAME
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT if not self.readonly else os.O_RDONLY,
                         0o644)
        except FileNotFoundError:
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the flock

    def close(self) -> None:
        """Close every shard store, the index and the writer lock (idempotent)."""
        if self._closed:
            return
        for store in self._stores.values():
            store.close()
        self._stores.clear()
        self.index.close()
        _unlock(self._lock_fd)
        self._lock_fd = None
        self._closed = True

    def __enter__(self) -> StateDirectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ settings
    @property
    def shard_nside(self) -> int:
        """``shardNside`` of the state (from the manifest)."""
        return int(self.manifest["shardNside"])

    @property
    def shard_order(self) -> int:
        """``log2(shardNside)``."""
        return shard_order(self.shard_nside)

    @property
    def shard_margin(self) -> float:
        """``shardMargin`` [arcsec] of the state (from the manifest)."""
        return float(self.manifest["shardMargin"])

    def shard_identity(self, pixel: int) -> dict[str, Any]:
        """The ``shard`` meta value of a shard store."""
        return {"order": self.shard_order, "pixel": int(pixel), "nside": self.shard_nside,
                "margin": self.shard_margin}

    # ------------------------------------------------------------------ shards
    def shard_path(self, pixel: int) -> Path:
        """``STATE/shards/<order>/<pixel>``."""
        return self.path / SHARDS_DIR / str(self.shard_order) / str(int(pixel))

    def shards(self) -> list[tuple[int, int]]:
        """``(order, pixel)`` of every shard that has a store, sorted."""
        base = self.path / SHARDS_DIR / str(self.shard_order)
        if not base.is_dir():
            return []
        found = [int(p.name) for p in base.iterdir()
                 if p.name.isdigit() and (p / "data.mdb").exists()]
        return [(self.shard_order, pixel) for pixel in sorted(found)]

    def has_shard(self, pixel: int) -> bool:
        """Whether the shard has a store."""
        return (self.shard_path(pixel) / "data.mdb").exists()

    def check_shards_present(self) -> None:
        """Every shard the index knows to hold data has its store.

        Raises:
            ShardError: naming the missing shards (nothing was written).
        """
        with self.index.read() as tx:
            known = tx.registered_shards()
        missing = [p for p in known if not self.has_shard(p)]
        if missing:
            names = ", ".join(f"{self.shard_order}/{p}" for p in missing[:10])
            raise ShardError(
                f"{len(missing)} shard(s) of {self.path} that hold data are missing: "
                f"{names}{' ...' if len(missing) > 10 else ''} (no {SHARDS_DIR}/<order>/<pixel>"
                "/data.mdb); nothing was written. Restore the state directory from a backup "
                "(`streamstars backup`), or rebuild it with `streamstars backfill` into a new "
                "directory")

    def open_shard(self, pixel: int, readonly: bool = True) -> StarStore:
        """The store of an existing shard, opened once per process and kept open until
        :meth:`close` (a store the caller closed is opened again).

        Raises:
            ShardError: the shard has no store, or it cannot be used (naming the shard).
        """
        pixel = int(pixel)
        store = self._stores.get(pixel)
        if store is not None and not store.closed and (readonly or not store.readonly):
            self._stores.move_to_end(pixel)
            return store
        if store is not None:
            store.close()
            del self._stores[pixel]
        if not self.has_shard(pixel):
            raise ShardError(f"shard {self.shard_order}/{pixel} of {self.path} has no store "
                             f"({self.shard_path(pixel)}/data.mdb is missing)")
        return self._open_store(pixel, readonly=readonly, create=False)

    def shard_for_write(self, pixel: int) -> StarStore:
        """The writable store of a shard, created (staged) when it has none yet.

        Raises:
            StateError: opened read-only.
            ShardError: the shard cannot be used (naming it).
        """
        if self.readonly:
            raise StateError(f"the state directory {self.path} was opened read-only")
        pixel = int(pixel)
        store = self._stores.get(pixel)
        if store is not None and not store.closed and not store.readonly:
            self._stores.move_to_end(pixel)
            return store
        if store is not None:
            store.close()
            del self._stores[pixel]
        return self._open_store(pixel, readonly=False, create=not self.has_shard(pixel))

    def _open_store(self, pixel: int, *, readonly: bool, create: bool) -> StarStore:
        path = self.shard_path(pixel)
        extra: dict[bytes, bytes] = {}
        if create:
            refcat = self.stored_refcat()
            if refcat is not None:  # a new shard caches the state's catalog
                extra[STORE_META_REFCAT] = json.dumps(refcat, sort_keys=True).encode()
        try:
            store = StarStore.open(path, self.config if (create or not readonly) else None,
                                   readonly=readonly, trimmer=self.trimmer,
                                   shard=self.shard_identity(pixel), extra_meta=extra)
        except StateError as exc:
            raise ShardError(f"shard {self.shard_order}/{pixel} of {self.path} cannot be used: "
                             f"{exc}") from exc
        except lmdb.Error as exc:
            raise ShardError(f"shard {self.shard_order}/{pixel} of {self.path} cannot be read "
                             f"({exc}): restore the state directory from a backup, or rebuild "
                             "it with `streamstars backfill` into a new directory") from exc
        self._stores[pixel] = store
        if self.shard_opened is not None:
            self.shard_opened(store)
        return store

    def keep_open(self, pixels: Collection[int]) -> None:
        """Close the least recently used shard stores beyond :data:`MAX_OPEN_SHARDS`, never
        those of ``pixels`` (the shards about to be used)."""
        keep = {int(p) for p in pixels}
        excess = len(self._stores) - max(MAX_OPEN_SHARDS, len(keep))
        for pixel in list(self._stores):
            if excess <= 0:
                break
            if pixel not in keep:
                self._stores.pop(pixel).close()
                excess -= 1

    def close_shard(self, pixel: int) -> None:
        """Close one shard store if it is open."""
        store = self._stores.pop(int(pixel), None)
        if store is not None:
            store.close()

    # ------------------------------------------------------------------ visits
    def visit_record(self, visit: int) -> IndexRecord | None:
        """The index record of ``visit``, or None."""
        return self.index.get(visit)

    def index_records(self) -> list[IndexRecord]:
        """Every index record, in visit order."""
        with self.index.read() as tx:
            return [record for _, record in tx.items()]

    def applied_visits(self) -> dict[int, str]:
        """visit -> content hash of every visit completely applied (status ``applied``)."""
        with self.index.read() as tx:
            return {v: r.content_hash for v, r in tx.items() if r.status == "applied"}

    def visit_records(self) -> list[VisitRecord]:
        """The visit records of every shard, one per visit (:func:`merge_visit_records`)."""
        per_shard = []
        for _, pixel in self.shards():
            with self.open_shard(pixel).read() as tx:
                per_shard.append(tx.visits.records())
        return merge_visit_records(per_shard)

    def stored_offsets(self, topic: str) -> dict[int, int]:
        """partition -> next offset to consume of ``topic`` (the single consumer's)."""
        with self.index.read() as tx:
            return {p: o for t, p, o in tx.offsets() if t == topic}

    def record_offset(self, topic: str, partition: int, next_offset: int) -> None:
        """Record an offset in its own index transaction (events that change nothing else)."""
        self.index.write(lambda tx: tx.put_offset(topic, partition, next_offset))

    def shard_offset(self, pixel: int, topic: str, partition: int) -> int | None:
        """The next offset of (``topic``, ``partition``) recorded in the shard's own store
        with the last event it applied (None: the shard has no store, or no event of that
        partition reached it)."""
        if not self.has_shard(pixel):
            return None
        return self.open_shard(pixel).stored_offsets(topic).get(int(partition))

    def shard_offsets(self, topic: str) -> dict[int, dict[int, int]]:
        """shard -> {partition: next offset} of ``topic`` recorded in each shard's store."""
        out: dict[int, dict[int, int]] = {}
        for _, pixel in self.shards():
            offsets = self.open_shard(pixel).stored_offsets(topic)
            if offsets:
                out[pixel] = offsets
        return out

    # ------------------------------------------------------------------ revoked shards
    def revoked_shards(self) -> set[int]:
        """Shards whose partition was revoked from this state's consumer (index
        ``meta/revoked``): their copies here are stale, never published from this state."""
        with self.index.read() as tx:
            raw = tx.get_meta(META_REVOKED)
        return set() if raw is None else {int(p) for p in json.loads(raw)}

    def set_revoked(self, pixels: Collection[int], revoked: bool) -> None:
        """Mark shards revoked (``revoked``) or owned again, in one index transaction."""
        def body(tx: Any) -> None:
            raw = tx.get_meta(META_REVOKED)
            now = set() if raw is None else {int(p) for p in json.loads(raw)}
            now = now | {int(p) for p in pixels} if revoked else now - {int(p) for p in pixels}
            tx.put_meta(META_REVOKED, json.dumps(sorted(now)).encode() if now else None)

        self.index.write(body)

    # ------------------------------------------------------------------ reference catalog
    def stored_refcat(self) -> dict[str, Any] | None:
        """The identity of the reference catalog the shards cache (index ``meta/refcat``)."""
        with self.index.read() as tx:
            raw = tx.get_meta(META_REFCAT)
        return None if raw is None else dict(json.loads(raw))

    def set_refcat(self, identity: dict[str, Any] | None) -> None:
        """Record the state's reference-catalog identity (new shards copy it)."""
        value = None if identity is None else json.dumps(identity, sort_keys=True).encode()
        self.index.write(lambda tx: tx.put_meta(META_REFCAT, value))

    def set_config(self, config: BuildStarsConfig) -> None:
        """Record the state's current configuration (``refresh-refs`` changes its reference
        catalog settings); the manifest keeps the one it was created with."""
        self.index.write(lambda tx: tx.put_meta(META_CONFIG, config_value(config)))
        self.config = config

    # ------------------------------------------------------------------ backups
    def backup(self, dest: str | Path) -> Path:
        """Copy the state into the new directory ``dest``: the manifest, the index, then every
        shard, each with LMDB's compacting copy inside one read transaction, into a hidden
        sibling renamed into place (``dest`` is complete or absent).

        Each shard's copy is consistent on its own and the index's copy is not newer than any
        shard's (it is taken first): visits in flight while the backup ran are "applying" in
        the copy and are completed by the next ``backfill`` or ``run`` on it (docs/state.md).

        Raises:
            StateError: ``dest`` exists and is not an empty directory, or a copy failed.
        """
        dest = Path(dest)
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise StateError(f"backup destination {dest} exists and is not an empty directory")
        try:
            with staged_directory(dest, "backup") as building:
                (building.path / MANIFEST_NAME).write_bytes(
                    (self.path / MANIFEST_NAME).read_bytes())
                (building.path / INDEX_DIR).mkdir()
                self.index.env.copy(str(building.path / INDEX_DIR), compact=True)
                for order, pixel in self.shards():
                    target = building.path / SHARDS_DIR / str(order) / str(pixel)
                    target.mkdir(parents=True)
                    self.open_shard(pixel).env.copy(str(target), compact=True)
                (building.path / SHARDS_DIR).mkdir(exist_ok=True)
                building.replace_empty_target()
        except (lmdb.Error, OSError) as exc:
            raise StateError(f"cannot back up {self.path} to {dest}: {exc}") from exc
        return dest


# ---------------------------------------------------------------------------------------------
# creation and checks
# ---------------------------------------------------------------------------------------------
def _refuse_other_directory(path: Path) -> None:
    """A directory without a manifest: a format-1 store (one LMDB environment), a store made
    alone through the Python API, another program's environment, or other files.

    Raises:
        StateError: saying what it is and what to do.
    """
    if (path / "data.mdb").exists():
        version = _store_format_version(path)
        if version == "1":
            raise StateError(
                f"{path} is a streamstars store of format version 1 (one LMDB environment for "
                f"the whole sky); this streamstars keeps state directories of format version "
                f"{STATE_FORMAT_VERSION} (sky shards): rebuild it with `streamstars backfill` "
                "into a new directory")
        if version is not None:
            raise StateError(
                f"{path} is a single streamstars store (format version {version}, one LMDB "
                f"environment), not a state directory (no {MANIFEST_NAME}): give the state "
                "directory, or rebuild with `streamstars backfill` into a new directory")
        refuse_foreign(path)  # another program's environment: says what it holds
        raise StateError(f"{path} holds a streamstars store without a format version; give "
                         "an empty or new directory as --state")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise StateError(f"{path} exists and is not a streamstars state directory (no "
                         f"{MANIFEST_NAME}); give an empty or new directory")


def _store_format_version(path: Path) -> str | None:
    """The ``meta/format_version`` of a single store in ``path`` (None: not a store)."""
    try:
        env = open_env(path, readonly=True)
    except StateError:
        return None
    try:
        meta = env.open_db(DB_META, create=False)
        with env.begin() as txn:
            raw = txn.get(META_FORMAT_VERSION, db=meta)
        return None if raw is None else bytes(raw).decode(errors="replace")
    except lmdb.Error:
        return None
    finally:
        env.close()


def _create(path: Path, config: BuildStarsConfig) -> None:
    """Create a new state directory atomically: manifest, index and an empty ``shards/`` built
    in a hidden sibling and renamed into place."""
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    manifest = {
        "format": STATE_FORMAT,
        "format_version": STATE_FORMAT_VERSION,
        "shardNside": config.shardNside,
        "shardMargin": config.shardMargin,
        "config": json.loads(config_value(config)),
        "association_fingerprint": config.association_fingerprint(),
        "created": created,
    }
    try:
        with staged_directory(path, "creating") as building:
            (building.path / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
            (building.path / INDEX_DIR).mkdir()
            VisitIndex.create(building.path / INDEX_DIR, {
                META_CREATED: created.encode(), META_CONFIG: config_value(config)})
            (building.path / SHARDS_DIR).mkdir()
            building.replace_empty_target()
    except OSError:
        if not (path / MANIFEST_NAME).exists():  # another process did not just create it
            raise


def _read_manifest(manifest_path: Path) -> dict[str, Any]:
    path = manifest_path.parent
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise StateError(f"{manifest_path} cannot be read ({exc}); the state directory is "
                         "damaged: restore it from a backup") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != STATE_FORMAT:
        raise StateError(f"{manifest_path} is not the manifest of a streamstars state directory")
    version = manifest.get("format_version")
    if version != STATE_FORMAT_VERSION:
        raise StateError(
            f"{path} is a streamstars state directory of format version {version}, this "
            f"streamstars reads version {STATE_FORMAT_VERSION}; rebuild it with `streamstars "
            "backfill` into a new directory")
    nside, margin = manifest.get("shardNside"), manifest.get("shardMargin")
    if not (isinstance(nside, int) and nside >= 1 and isinstance(margin, int | float)
            and math.isfinite(margin)):
        raise StateError(f"{manifest_path} has no valid shardNside / shardMargin; the state "
                         "directory is damaged")
    return manifest


def _config_from(path: Path, text: str) -> BuildStarsConfig:
    try:
        return config_from_json(text)
    except ConfigError as exc:
        raise StateError(
            f"{path} was built with a configuration this streamstars refuses ({exc}); "
            "rebuild it with a valid configuration into a new state directory") from exc


def _check_config(path: Path, manifest: dict[str, Any],
                  config: BuildStarsConfig | None) -> BuildStarsConfig:
    stored = _config_from(path, json.dumps(manifest["config"]))
    if config is None:
        return stored
    old = manifest["association_fingerprint"]
    new = config.association_fingerprint()
    if old != new:
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        details = "; ".join(f"{k}: stored {old.get(k)!r}, given {new.get(k)!r}" for k in keys)
        raise StateError(
            f"{path} was built with an incompatible configuration ({details}). "
            "Use the original configuration, or rebuild into a new state directory.")
    return config


def merge_visit_records(per_shard: Collection[list[VisitRecord]]) -> list[VisitRecord]:
    """One record per visit (visit order) from the records of its shards: a visit's record in
    its first shard, with ``pixels`` the union of its shards' and ``n_selected`` the sum of
    their ``core_selected`` (each selected row lies in exactly one core)."""
    merged: dict[int, VisitRecord] = {}
    pixels: dict[int, set[int]] = {}
    for records in per_shard:
        for record in records:
            pixels.setdefault(record.visit, set()).update(record.pixels)
            core = int(record.core_selected or 0)
            if record.visit in merged:
                merged[record.visit].n_selected += core
            else:
                merged[record.visit] = record.replace(n_selected=core)
    return [merged[v].replace(pixels=sorted(pixels[v])) for v in sorted(merged)]


#: the file whose flock is the visit boundary (:meth:`StateDirectory.visit_boundary`)
BOUNDARY_NAME = "visits.lock"


def _lock_writer(path: Path) -> int:
    """Take the state's writer lock (``flock`` on the manifest) or refuse."""
    fd = os.open(path / MANIFEST_NAME, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateError(
            f"another streamstars process is writing {path} (backfill, run, retract or "
            "refresh-refs: one writer at a time); wait for it to finish or stop it") from None
    except OSError:
        os.close(fd)
        raise
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock
