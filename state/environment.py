"""The LMDB engine under one store: opening an environment, the free-disk guard, map trimming.

Nothing here knows what a store holds beyond the names of its sub-databases and its format
version key (:mod:`streamstars.state.schema`): this is the part a store shares with any LMDB
environment.  See docs/state.md ("Transactions", "Readers of a directory they cannot write",
"Memory: the map is trimmed").
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
from pathlib import Path
from typing import Any

import lmdb

from streamstars.errors import DiskFullError, StateError
from streamstars.state.schema import ALL_DBS, DB_META, META_FORMAT_VERSION

#: A write transaction is only begun with this many MiB free on the store's file system
#: (writers write through the memory map: a full disk would otherwise kill them with SIGBUS);
#: ``STREAMSTARS_MIN_FREE_DISK_MB`` overrides it.
MIN_FREE_DISK_MB = 64

#: Scattered accesses of the map between two checks of its resident size
#: (:meth:`MapTrimmer.note_access`).
TRIM_CHECK_EVERY = 32

#: The map size of a new environment; it doubles on every ``MapFullError``.
INITIAL_MAP_SIZE = 1 << 30

log = logging.getLogger(__name__)


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


def map_rss_budget() -> int:
    """``STREAMSTARS_MAP_RSS_MB`` (default 32) in bytes: how much of the map a process may keep
    resident before it is trimmed; 0 disables trimming.

    Raises:
        StateError: not a finite number.
    """
    return _megabytes_setting("STREAMSTARS_MAP_RSS_MB", 32)


def min_free_disk() -> int:
    """``STREAMSTARS_MIN_FREE_DISK_MB`` (default :data:`MIN_FREE_DISK_MB`) in bytes.

    Raises:
        StateError: not a finite number.
    """
    return _megabytes_setting("STREAMSTARS_MIN_FREE_DISK_MB", MIN_FREE_DISK_MB)


def check_free_disk(path: Path, needed: int) -> None:
    """Refuse to write when the file system of ``path`` has less than ``needed`` bytes free.

    Writers write through the memory map (``writemap``) into a sparse file, and the kernel
    signals a write to a page it cannot allocate with SIGBUS, not with an error LMDB could
    report; so a transaction is only begun with enough space free.

    Raises:
        DiskFullError: naming the store, the space free and the setting.
    """
    try:
        fs = os.statvfs(path)
    except OSError:
        return
    free = fs.f_bavail * fs.f_frsize
    if free < needed:
        raise DiskFullError(f"the disk of {path} is nearly full ({free / 2**20:.0f} MiB "
                            f"free, {needed / 2**20:.0f} MiB needed to write, "
                            "STREAMSTARS_MIN_FREE_DISK_MB); free some space and run the "
                            "command again (nothing was written)")


def grow_map(env: lmdb.Environment) -> None:
    """Double the map size (after a ``MapFullError``; the transaction is run again)."""
    env.set_mapsize(env.info()["map_size"] * 2)


# ---------------------------------------------------------------------------------------------
# map trimming
# ---------------------------------------------------------------------------------------------
class MapTrimmer:
    """Keeps the resident part of LMDB memory maps under one budget.

    Pages of the memory map that were read stay mapped (and count in the process's RSS) until
    unmapped, and the kernel maps whole page-cache folios around each page touched (hundreds
    of kB per small value read), so a long backfill or consumer would grow towards the size of
    the store.  Every table of the store counts its scattered accesses here
    (:meth:`note_access`); every :data:`TRIM_CHECK_EVERY` of them, and after every commit,
    :meth:`trim_if_large` compares the process's file-backed resident memory with a baseline
    and, past the budget, ``madvise(MADV_DONTNEED)``-s the maps.

    A store makes its own trimmer unless it is given one: resident memory is the process's,
    so the stores one process opens (one per sky shard) may share one trimmer and one budget,
    each :meth:`watch`-ing its ``data.mdb``.
    """

    def __init__(self) -> None:
        #: the ``data.mdb`` files whose mappings are trimmed
        self.data_files: list[Path] = []
        #: file-backed resident memory (the LMDB maps) allowed before the maps are trimmed
        self.budget = map_rss_budget()
        self._baseline = _rss_file_bytes()
        self.trims = 0
        self._accesses = 0

    def watch(self, data_file: Path) -> None:
        """Trim the mappings of ``data_file`` too."""
        if data_file not in self.data_files:
            self.data_files.append(data_file)

    def unwatch(self, data_file: Path) -> None:
        """Stop trimming ``data_file`` (its store is closed)."""
        if data_file in self.data_files:
            self.data_files.remove(data_file)

    def trim_if_large(self, *, force: bool = False) -> bool:
        """Drop the map's pages from this process when they grow large.

        Past ``budget`` bytes of file-backed resident memory (``STREAMSTARS_MAP_RSS_MB``,
        default 32; 0 disables) the map's range is ``madvise(MADV_DONTNEED)``-ed: the process
        no longer holds the pages, the kernel keeps them in its page cache, and the next
        access maps them again.  The map is a shared file mapping (read-only for readers;
        writers write through it, ``writemap``): the kernel moves a dropped page's dirty state
        to the page cache, so this never loses data and is safe under open transactions and
        zero-copy buffers.  Linux only (a no-op elsewhere).  ``force``: trim whatever the size
        (when a phase that read much of the map ends and memory is needed next).  Returns True
        if it trimmed.
        """
        if not self.budget or self._baseline is None:
            return False
        rss = _rss_file_bytes()
        if not force and (rss is None or rss - self._baseline <= self.budget):
            return False
        trimmed = _drop_mapped_pages(self.data_files)
        self.trims += trimmed
        if trimmed:
            # none of the map is resident now: what is left is the process's other file-backed
            # memory (libraries imported since the store was opened, other files), the new
            # baseline — else each later check would trim again for memory that is not ours
            self._baseline = _rss_file_bytes()
        return bool(trimmed)

    def note_access(self) -> None:
        """Count one scattered access of the map (a value read, written or replaced: LMDB
        reads a replaced value's old pages to free them); every ``TRIM_CHECK_EVERY`` of them,
        :meth:`trim_if_large`, so the map cannot grow far past its budget between two checks."""
        self._accesses += 1
        if self._accesses >= TRIM_CHECK_EVERY:
            self._accesses = 0
            self.trim_if_large()


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


def _drop_mapped_pages(data_files: list[Path]) -> int:
    """``madvise(MADV_DONTNEED)`` every mapping of ``data_files`` in this process; returns how
    many ranges were trimmed (0 where /proc/self/maps or libc are not available)."""
    targets = {str(f.resolve()) for f in data_files}
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].rstrip("\n") in targets:
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


# ---------------------------------------------------------------------------------------------
# opening
# ---------------------------------------------------------------------------------------------
def _writable(path: Path) -> bool:
    """Whether this process may write in directory ``path`` (and its LMDB lock file)."""
    lock = path / "lock.mdb"
    return os.access(path, os.W_OK) and (not lock.exists() or os.access(lock, os.W_OK))


def open_env(path: Path, readonly: bool) -> lmdb.Environment:
    """Open the environment; writers use a writable map (``writemap``, docs/state.md).

    A reader that cannot write in the directory opens it without the lock file (LMDB cannot
    create or update it there; no writer can work in such a directory either).

    Raises:
        StateError: LMDB cannot open it.
    """
    lock = not readonly or _writable(path)
    try:
        return lmdb.open(str(path), max_dbs=len(ALL_DBS) + 2, map_size=INITIAL_MAP_SIZE,
                         readonly=readonly, subdir=True, metasync=True, sync=True,
                         readahead=False, max_readers=256, lock=lock, writemap=not readonly)
    except lmdb.Error as exc:
        raise StateError(f"cannot open LMDB environment {path}: {exc}") from exc


def refuse_foreign(path: Path) -> None:
    """Refuse to write into an LMDB environment that is not a streamstars store.

    Looked at through a read-only open (a writer's open could already change the file): a
    store has the ``meta`` sub-database with a format version; an environment holding other
    data is another program's, and nothing is written to it.

    Raises:
        StateError: ``path`` holds another program's LMDB environment (or is unreadable).
    """
    env = open_env(path, readonly=True)
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


def open_dbs(env: lmdb.Environment, readonly: bool,
             optional: tuple[bytes, ...]) -> dict[bytes, Any]:
    """Handles of every sub-database (created by writers); ``optional`` ones a reader may
    miss (a store written by an older streamstars) are left out."""
    dbs = {}
    for name in ALL_DBS:
        try:
            dbs[name] = env.open_db(name, create=not readonly)
        except lmdb.NotFoundError:
            if name not in optional:
                raise
    return dbs
