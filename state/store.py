"""The LMDB environment holding the star store (see docs/state.md for the layout).

Sub-databases (all keys big-endian so that LMDB's byte order is numeric order):

``meta``          format version, the configuration the store was built with, creation time,
                  the reference catalog in use.
``visits``        visit id -> JSON record (metadata row, content hash, band, pixels written,
                  counts, per-visit aperture corrections, Kafka offset it came from).
``observations``  band + pixel + visit -> columnar selected observations of that visit in that
                  HEALPix (nest, ``storeNside``) pixel.
``components``    band + pixel -> columnar records of the 1" friends-of-friends components of
                  that primary band whose centre lies in the pixel.
``candidates``    band + pixel -> columnar star candidates of the non-clique components there.
``members``       band + component id -> member list (numpy records) of the components that
                  went through the exact path ("tracked"), so later exact work reads them
                  instead of re-reading the observations around them.
``refmatch``      pixel -> columnar reference stars (selected, with magnitudes) lying in that
                  pixel, cached for snapshot-time matching (see streamstars.references).
``offsets``       topic + partition -> next Kafka offset to consume (written in the same
                  transaction as the visit it belongs to).
``source_ids``    block of 64 sourceIds -> which of them each visit stores, so that a visit
                  reusing another visit's sourceIds is refused (streamstars.source_index).

One write transaction per visit; the map grows automatically on ``MapFullError``.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import math
import os
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import lmdb

from streamstars.bands import BAND_KEY_BYTES, band_name_problem
from streamstars.config import BuildStarsConfig, config_from_json, to_dict
from streamstars.errors import ConfigError, DiskFullError, StateError
from streamstars.staging import staged_directory

#: The writer's cache of small values read again and again (member lists) holds at most this
#: many bytes; past it, the least recently used values are dropped.  It is heap memory that
#: grows with the store up to this bound, so it is kept small against the map budget.
CACHE_MAX_BYTES = 16 * 1024 * 1024

#: A write transaction is only begun with this many MiB free on the store's file system
#: (writers write through the memory map: a full disk would otherwise kill them with SIGBUS);
#: ``STREAMSTARS_MIN_FREE_DISK_MB`` overrides it.
MIN_FREE_DISK_MB = 64

#: Scattered accesses of the map between two checks of its resident size (note_access).
TRIM_CHECK_EVERY = 32

#: Bumped whenever the on-disk layout changes; a store of another version is refused.
FORMAT_VERSION = 1

META_FORMAT_VERSION = b"format_version"
META_CONFIG = b"config"
META_FINGERPRINT = b"association_fingerprint"
META_CREATED = b"created"
META_REFCAT = b"refcat"
#: present once ``source_ids`` indexes every stored observation (new stores have it at once;
#: older ones get it built by the first writer, streamstars.source_index.ensure_source_index)
META_SOURCE_INDEX = b"source_index"

DB_META = b"meta"
DB_VISITS = b"visits"
DB_OBSERVATIONS = b"observations"
DB_COMPONENTS = b"components"
DB_CANDIDATES = b"candidates"
DB_REFMATCH = b"refmatch"
DB_MEMBERS = b"members"
DB_OFFSETS = b"offsets"
DB_SOURCE_IDS = b"source_ids"
ALL_DBS = (DB_META, DB_VISITS, DB_OBSERVATIONS, DB_COMPONENTS, DB_CANDIDATES, DB_MEMBERS,
           DB_REFMATCH,
           DB_OFFSETS, DB_SOURCE_IDS)
#: sub-databases a store written by an older streamstars may lack (readers do without them;
#: the first writer creates them)
OPTIONAL_DBS = (DB_SOURCE_IDS,)

INITIAL_MAP_SIZE = 1 << 30

_U64 = struct.Struct(">Q")
_SIGN = 1 << 63

T = TypeVar("T")
log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from streamstars.references import ReferenceSource


@functools.lru_cache(maxsize=256)
def band_key(band: str) -> bytes:
    """Fixed-width (8 byte) key prefix of a band name (cached: keys are built per pixel).

    Raises:
        ValueError: not a storable band name (:func:`streamstars.bands.band_name_problem`);
            visits and configurations are checked before anything reaches here.
    """
    problem = band_name_problem(band)
    if problem is not None:
        raise ValueError(f"band {band!r}: {problem}")
    return band.encode("ascii").ljust(BAND_KEY_BYTES, b"\0")


def band_from_key(key: bytes) -> str:
    """Inverse of :func:`band_key` (reads the first 8 bytes)."""
    return key[:BAND_KEY_BYTES].rstrip(b"\0").decode("ascii")


def int_key(value: int) -> bytes:
    """Order-preserving 8-byte key of a signed 64-bit integer."""
    return _U64.pack((int(value) + _SIGN) & 0xFFFFFFFFFFFFFFFF)


def int_from_key(key: bytes, offset: int = 0) -> int:
    """Inverse of :func:`int_key`."""
    return int(_U64.unpack_from(key, offset)[0]) - _SIGN


def pixel_key(band: str, pixel: int) -> bytes:
    """Key of a (band, pixel) record in ``components`` / ``candidates``."""
    return band_key(band) + _U64.pack(int(pixel))


def observation_key(band: str, pixel: int, visit: int) -> bytes:
    """Key of one visit's observations in one pixel."""
    return band_key(band) + _U64.pack(int(pixel)) + int_key(visit)


def offset_key(topic: str, partition: int) -> bytes:
    """Key of a Kafka (topic, partition) in ``offsets``."""
    return topic.encode() + b"\0" + struct.pack(">I", partition)


class StarStore:
    """An open star store.  Use :meth:`open`; close with :meth:`close` or a ``with`` block."""

    def __init__(self, path: Path, env: lmdb.Environment, config: BuildStarsConfig,
                 readonly: bool) -> None:
        self.path = path
        self.config = config
        self.readonly = readonly
        self.env = env
        self.dbs = {}
        for name in ALL_DBS:
            try:
                self.dbs[name] = env.open_db(name, create=not readonly)
            except lmdb.NotFoundError:
                if name not in OPTIONAL_DBS:
                    raise
        #: the sourceId index was checked (streamstars.source_index.ensure_source_index)
        self.source_index_checked = False
        #: file-backed resident memory (LMDB map) allowed before the map is trimmed; see
        #: :meth:`trim_map_if_large`
        self.map_rss_budget = _map_rss_budget()
        #: free bytes the store's file system must have for a write transaction to begin
        self.min_free_disk = _min_free_disk()
        self._rss_file_baseline = _rss_file_bytes()
        self.map_trims = 0
        self._cache: dict[tuple[bytes, bytes], bytes] = {}
        self._cache_bytes = 0
        self._cache_txnid = -1
        self._accesses = 0
        self._overlay: dict[tuple[bytes, bytes], bytes | None] | None = None
        #: the reference catalog visits cache stars from (streamstars.references.attach_references)
        self.references: ReferenceSource | None = None
        self.references_attached = False

    # ------------------------------------------------------------------ opening / closing
    @classmethod
    def open(cls, path: str | Path, config: BuildStarsConfig | None = None, *,
             readonly: bool = False) -> StarStore:
        """Open (or create) the store in directory ``path``.

        ``config`` None means: use the configuration the store was built with.  A given config
        must agree with the stored one on everything that shapes stored data
        (:meth:`BuildStarsConfig.association_fingerprint`); snapshot-time settings may differ.

        A read-only open of a directory this process cannot write (a backup on a read-only
        file system, another user's store) goes without LMDB's lock file: it cannot be
        created there, and no writer can be working in such a directory.

        Raises:
            StateError: not a store (also another program's LMDB environment, which is never
                written to), another format version, or an incompatible config.
        """
        path = Path(path)
        _map_rss_budget()  # bad settings fail before anything is created
        _min_free_disk()
        if not (path / "data.mdb").exists():
            if readonly or config is None:
                raise StateError(f"{path} is not a streamstars state directory (no data.mdb); "
                                 "create one with `streamstars backfill` or `streamstars run`")
            _create(path, config)
        elif not readonly:
            _refuse_foreign(path)  # before a writer's open could change anything there
        env = _open_env(path, readonly)
        try:
            stored = _read_meta(env)
            if stored is None:
                raise StateError(f"{path} holds no streamstars metadata; it is not a "
                                 "streamstars state directory")
            effective = _check_meta(path, stored, config)
            return cls(path, env, effective, readonly)
        except BaseException:
            env.close()
            raise

    def close(self) -> None:
        """Close the environment (idempotent)."""
        self.env.close()

    def trim_map_if_large(self, *, force: bool = False) -> bool:
        """Drop the LMDB map's pages from this process when they grow large.

        Pages of the memory map that were read stay mapped (and count in the process's RSS)
        until unmapped, and the kernel maps whole page-cache folios around each page touched
        (hundreds of kB per small value read), so a long backfill or consumer would grow
        towards the size of the store.  Past ``map_rss_budget`` bytes of file-backed resident
        memory (``STREAMSTARS_MAP_RSS_MB``, default 32; 0 disables) the map's range is
        ``madvise(MADV_DONTNEED)``-ed: the process no longer holds the pages, the kernel keeps
        them in its page cache, and the next access maps them again.  The map is a shared
        file mapping (read-only for readers; writers write through it, ``writemap``): the
        kernel moves a dropped page's dirty state to the page cache, so this never loses data
        and is safe under open transactions and zero-copy buffers.  Linux only (a no-op
        elsewhere).  ``force``: trim whatever the size (when a phase that read much of the
        map ends and memory is needed next).  Returns True if it trimmed.
        """
        if not self.map_rss_budget or self._rss_file_baseline is None:
            return False
        rss = _rss_file_bytes()
        if not force and (rss is None or rss - self._rss_file_baseline <= self.map_rss_budget):
            return False
        trimmed = _drop_mapped_pages(self.path / "data.mdb")
        self.map_trims += trimmed
        if trimmed:
            # none of the map is resident now: what is left is the process's other file-backed
            # memory (libraries imported since the store was opened, other files), the new
            # baseline — else each later check would trim again for memory that is not ours
            self._rss_file_baseline = _rss_file_bytes()
        return bool(trimmed)

    def note_access(self) -> None:
        """Count one scattered access of the map (a value read, written or replaced: LMDB
        reads a replaced value's old pages to free them); every ``TRIM_CHECK_EVERY`` of them,
        :meth:`trim_map_if_large`.  Loops over many values call it, so the map cannot grow far
        past its budget between two checks."""
        self._accesses += 1
        if self._accesses >= TRIM_CHECK_EVERY:
            self._accesses = 0
            self.trim_map_if_large()

    def __enter__(self) -> StarStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ transactions
    def write(self, body: Callable[[lmdb.Transaction], T]) -> T:
        """Run ``body(txn)`` in ONE write transaction and commit it.

        On ``MapFullError`` the transaction is aborted, the map size doubled and ``body``
        run again from scratch, so ``body`` must not have side effects outside the txn.
        """
        if self.readonly:
            raise StateError(f"store {self.path} was opened read-only")
        self._check_free_disk()
        while True:
            self._begin_overlay()
            try:
                # buffers: values are read in place from the map (zero-copy) where the code
                # asks for it (prefix_items(copy=False)); everything else copies with bytes()
                with self.env.begin(write=True, buffers=True) as txn:
                    txn_id = txn.id()
                    result = body(txn)
                break
            except lmdb.MapFullError:
                self._overlay = None
                new_size = self.env.info()["map_size"] * 2
                self.env.set_mapsize(new_size)
            except BaseException:
                self._overlay = None
                raise
        self._commit_overlay(txn_id)
        self.trim_map_if_large()
        return result

    def _check_free_disk(self) -> None:
        """Refuse to write when the store's file system is nearly full.

        Writers write through the memory map (``writemap``) into a sparse file, and the kernel
        signals a write to a page it cannot allocate with SIGBUS, not with an error LMDB could
        report; so a transaction is only begun with ``min_free_disk`` bytes free
        (``STREAMSTARS_MIN_FREE_DISK_MB``, default 64).
        """
        try:
            fs = os.statvfs(self.path)
        except OSError:
            return
        free = fs.f_bavail * fs.f_frsize
        if free < self.min_free_disk:
            raise DiskFullError(f"the disk of {self.path} is nearly full ({free / 2**20:.0f} MiB "
                                f"free, {self.min_free_disk / 2**20:.0f} MiB needed to write, "
                                "STREAMSTARS_MIN_FREE_DISK_MB); free some space and run the "
                                "command again (nothing was written)")

    # ------------------------------------------------------------------ cached values
    # Member lists are small values scattered over the map and read again visit after visit;
    # reading them through the map touches (and maps) many pages.  The writer keeps the
    # committed values it has read or written in memory.  Writes inside a transaction go to an
    # overlay merged only after the commit (an aborted transaction leaves the cache as it
    # was); a commit by another process (LMDB's last transaction id is not ours) empties it.
    def _begin_overlay(self) -> None:
        if self.env.info()["last_txnid"] != self._cache_txnid:
            self._cache.clear()
            self._cache_bytes = 0
        self._overlay = {}

    def _commit_overlay(self, txn_id: int) -> None:
        overlay, self._overlay = self._overlay or {}, None
        for key, value in overlay.items():
            self._cache_forget(key)
            if value is not None:
                self._cache_keep(key, value)
        # LMDB does not record a transaction that wrote nothing (its id is then given to the
        # next writer, maybe another process): only a transaction with cached writes surely
        # is the last one; otherwise the next transaction starts with an empty cache
        self._cache_txnid = txn_id if overlay else -1

    def _cache_forget(self, key: tuple[bytes, bytes]) -> None:
        old = self._cache.pop(key, None)
        if old is not None:
            self._cache_bytes -= len(old)

    def _cache_keep(self, key: tuple[bytes, bytes], value: bytes) -> None:
        # least recently used first: dicts keep insertion order and a hit re-inserts its key
        while self._cache and self._cache_bytes + len(value) > CACHE_MAX_BYTES:
            self._cache_bytes -= len(self._cache.pop(next(iter(self._cache))))
        self._cache[key] = value
        self._cache_bytes += len(value)

    def cached_get(self, txn: lmdb.Transaction, db: bytes, key: bytes) -> bytes | None:
        """``txn.get`` of ``db`` through the writer's cache (write transactions only)."""
        if self._overlay is None:  # not inside write(): no cache
            raw = txn.get(key, db=self.dbs[db])
            return None if raw is None else bytes(raw)
        ckey = (db, key)
        if ckey in self._overlay:
            return self._overlay[ckey]
        value = self._cache.pop(ckey, None)
        if value is not None:
            self._cache[ckey] = value  # most recently used now
        else:
            self.note_access()
            raw = txn.get(key, db=self.dbs[db])
            if raw is None:
                return None
            value = bytes(raw)
            self._cache_keep(ckey, value)  # a committed value: valid for later visits too
        return value

    def cached_put(self, txn: lmdb.Transaction, db: bytes, key: bytes, value: bytes) -> None:
        """``txn.put`` into ``db``, remembered by the cache once committed."""
        self.note_access()
        txn.put(key, value, db=self.dbs[db])
        if self._overlay is not None:
            self._overlay[(db, key)] = value

    def cached_delete(self, txn: lmdb.Transaction, db: bytes, key: bytes) -> None:
        """``txn.delete`` from ``db``, forgotten by the cache once committed."""
        self.note_access()
        txn.delete(key, db=self.dbs[db])
        if self._overlay is not None:
            self._overlay[(db, key)] = None

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

    @contextmanager
    def read(self, *, buffers: bool = False) -> Iterator[lmdb.Transaction]:
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
            yield txn
        finally:
            txn.abort()

    # ------------------------------------------------------------------ small records
    def visit_record(self, txn: lmdb.Transaction, visit: int) -> dict[str, Any] | None:
        """The stored record of ``visit`` or None."""
        raw = txn.get(int_key(visit), db=self.dbs[DB_VISITS])
        return None if raw is None else json.loads(bytes(raw))

    def put_visit_record(self, txn: lmdb.Transaction, visit: int, record: dict[str, Any]) -> None:
        """Store the record of ``visit``."""
        txn.put(int_key(visit), json.dumps(record, sort_keys=True).encode(),
                db=self.dbs[DB_VISITS])

    def delete_visit_record(self, txn: lmdb.Transaction, visit: int) -> None:
        """Remove the record of ``visit``."""
        txn.delete(int_key(visit), db=self.dbs[DB_VISITS])

    def iter_visit_records(self, txn: lmdb.Transaction) -> Iterator[tuple[int, dict[str, Any]]]:
        """All visit records in visit order."""
        cursor = txn.cursor(db=self.dbs[DB_VISITS])
        for key, value in cursor:
            yield int_from_key(bytes(key)), json.loads(bytes(value))

    def applied_visits(self) -> dict[int, str]:
        """visit -> content hash of every applied visit."""
        with self.read() as txn:
            return {visit: rec["content_hash"] for visit, rec in self.iter_visit_records(txn)}

    def put_offset(self, txn: lmdb.Transaction, topic: str, partition: int,
                   next_offset: int) -> None:
        """Record the next Kafka offset of (topic, partition) inside ``txn``."""
        txn.put(offset_key(topic, partition), _U64.pack(next_offset), db=self.dbs[DB_OFFSETS])

    def record_offset(self, topic: str, partition: int, next_offset: int) -> None:
        """Record an offset in its own transaction (events that change nothing else)."""
        self.write(lambda txn: self.put_offset(txn, topic, partition, next_offset))

    def iter_offsets(self, txn: lmdb.Transaction) -> Iterator[tuple[str, int, int]]:
        """(topic, partition, next offset) of every recorded Kafka position."""
        for raw_key, value in txn.cursor(db=self.dbs[DB_OFFSETS]):
            key = bytes(raw_key)  # topic + NUL + uint32 partition (see offset_key)
            yield (key[:-5].decode(), struct.unpack(">I", key[-4:])[0],
                   int(_U64.unpack(bytes(value))[0]))

    def stored_offsets(self, topic: str) -> dict[int, int]:
        """partition -> next offset to consume, for ``topic``."""
        with self.read() as txn:
            return {p: o for t, p, o in self.iter_offsets(txn) if t == topic}

    def get_meta(self, key: bytes) -> bytes | None:
        """A raw value of the ``meta`` sub-database."""
        with self.read() as txn:
            value = txn.get(key, db=self.dbs[DB_META])
            return None if value is None else bytes(value)

    def put_meta(self, txn: lmdb.Transaction, key: bytes, value: bytes) -> None:
        """Set a raw value of the ``meta`` sub-database inside ``txn``."""
        txn.put(key, value, db=self.dbs[DB_META])

    def prefix_items(self, txn: lmdb.Transaction, db: bytes, prefix: bytes, *,
                     copy: bool = True) -> Iterator[tuple[bytes, Any]]:
        """(key, value) of every key starting with ``prefix`` in sub-database ``db``.

        ``copy=False`` yields the value as the transaction returns it: in a write transaction
        (begun with ``buffers=True``) a zero-copy view of the map, valid only until the next
        write in that transaction; only the pages actually read are faulted in.
        """
        cursor = txn.cursor(db=self.dbs[db])
        if not cursor.set_range(prefix):
            return
        for raw_key, value in cursor:
            key = bytes(raw_key)
            if not key.startswith(prefix):
                return
            yield key, (bytes(value) if copy else value)


def _megabytes_setting(name: str, default: float) -> int:
    """A size in megabytes from the environment variable ``name``, in bytes (>= 0).

    Raises:
        StateError: not a finite number (``nan``, ``inf`` and text are refused, naming the
            variable).
    """
    raw = os.environ.get(name, str(default))
    try:
        megabytes = float(raw)
    except ValueError as exc:
        raise StateError(f"{name} must be a number of megabytes, not {raw!r}") from exc
    if not math.isfinite(megabytes):
        raise StateError(f"{name} must be a finite number of megabytes, not {raw!r}")
    return int(max(megabytes, 0.0) * 1024 * 1024)


def _map_rss_budget() -> int:
    return _megabytes_setting("STREAMSTARS_MAP_RSS_MB", 32)


def _min_free_disk() -> int:
    return _megabytes_setting("STREAMSTARS_MIN_FREE_DISK_MB", MIN_FREE_DISK_MB)


def _rss_file_bytes() -> int | None:
    """File-backed resident memory of this process (Linux ``RssFile``), None elsewhere."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"RssFile:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


_MADV_DONTNEED = 4  # Linux <sys/mman.h>
_LIBC: list[ctypes.CDLL] = []  # loaded once, on the first trim


def _libc() -> ctypes.CDLL:
    if not _LIBC:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        _LIBC.append(libc)
    return _LIBC[0]


def _drop_mapped_pages(data_file: Path) -> int:
    """``madvise(MADV_DONTNEED)`` every mapping of ``data_file`` in this process; returns how
    many ranges were trimmed (0 where /proc/self/maps or libc are not available)."""
    target = str(data_file.resolve())
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].rstrip("\n") == target:
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    ranges.append((start, end - start))
        libc = _libc()
    except OSError:
        return 0
    done = 0
    for start, length in ranges:
        if libc.madvise(start, length, _MADV_DONTNEED) == 0:
            done += 1
    return done


def _writable(path: Path) -> bool:
    """Whether this process may write in directory ``path`` (and its LMDB lock file)."""
    lock = path / "lock.mdb"
    return os.access(path, os.W_OK) and (not lock.exists() or os.access(lock, os.W_OK))


def _open_env(path: Path, readonly: bool) -> lmdb.Environment:
    """Open the environment; writers use a writable map (``writemap``, docs/state.md).

    A reader that cannot write in the directory opens it without the lock file (LMDB cannot
    create or update it there; no writer can work in such a directory either).
    """
    lock = not readonly or _writable(path)
    try:
        return lmdb.open(str(path), max_dbs=len(ALL_DBS) + 2, map_size=INITIAL_MAP_SIZE,
                         readonly=readonly, subdir=True, metasync=True, sync=True,
                         readahead=False, max_readers=256, lock=lock, writemap=not readonly)
    except lmdb.Error as exc:
        raise StateError(f"cannot open LMDB environment {path}: {exc}") from exc


def _refuse_foreign(path: Path) -> None:
    """Refuse to write into an LMDB environment that is not a streamstars store.

    Looked at through a read-only open (a writer's open could already change the file): a
    store has the ``meta`` sub-database with a format version; an environment holding other
    data is another program's, and nothing is written to it.

    Raises:
        StateError: ``path`` holds another program's LMDB environment (or is unreadable).
    """
    env = _open_env(path, readonly=True)
    try:
        with env.begin() as txn:
            names = [bytes(k) for k, _ in txn.cursor()]
        if not names:
            foreign = ["(an empty LMDB environment)"]
        elif DB_META not in names:
            foreign = [n.decode(errors="replace") for n in names[:5]]
        else:
            try:
                meta = env.open_db(DB_META, create=False)
                with env.begin() as txn:
                    foreign = [] if txn.get(META_FORMAT_VERSION, db=meta) is not None else \
                        ["meta (without a streamstars format version)"]
            except lmdb.Error:
                foreign = ["meta (not a sub-database)"]
    finally:
        env.close()
    if foreign:
        raise StateError(
            f"{path} holds an LMDB environment that is not a streamstars store (it holds "
            f"{', '.join(foreign)}{' ...' if len(names) > 5 else ''}); nothing was written to "
            "it: give an empty or new directory as --state")


def _create(path: Path, config: BuildStarsConfig) -> None:
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
                _write_meta(env, config)
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


def _write_meta(env: lmdb.Environment, config: BuildStarsConfig) -> None:
    meta_db = env.open_db(DB_META)
    with env.begin(write=True) as txn:
        txn.put(META_FORMAT_VERSION, str(FORMAT_VERSION).encode(), db=meta_db)
        # key order kept: the order of fgcmLoadReferenceCatalog.filterMap is FILTERNAMES
        txn.put(META_CONFIG, json.dumps(to_dict(config)).encode(), db=meta_db)
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
