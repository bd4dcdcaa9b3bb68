"""The writer's cache of small values read again and again (member lists), one per store.

Member lists are small values scattered over the map and read again visit after visit; reading
them through the map touches (and maps) many pages.  The writing process keeps the committed
values it has read or written in memory, at most :data:`CACHE_MAX_BYTES`, the least recently
used dropped first (heap memory that grows with the store up to that bound).

Writes inside a transaction go to an overlay merged only after the commit, so an aborted
transaction (an error, ``MapFullError`` and its retry) leaves the cache as it was.  At the start
of every write transaction LMDB's last transaction id is compared with that of this cache's
last commit: a commit by anyone else (a ``retract`` or another writer) empties the cache.  LMDB
does not record a write transaction that changed nothing (the next writer, maybe another
process, gets its id), so only a transaction with cached writes counts as this cache's last
commit; after any other, the next transaction starts with an empty cache.

Pure in-memory bookkeeping: reading LMDB on a miss is the table's job
(:class:`streamstars.state.tables.MemberTable`).
"""

from __future__ import annotations

from typing import Final

#: The cache holds at most this many bytes of values (read when a cache is made).
CACHE_MAX_BYTES = 16 * 1024 * 1024

CacheKey = tuple[bytes, bytes]  # (sub-database name, key)


class _Miss:
    """The type of :data:`MISS`."""

    __slots__ = ()


#: What :meth:`WriteCache.get` returns for a key it knows nothing about (``None`` means: known
#: to be absent, deleted in this transaction).
MISS: Final = _Miss()


class WriteCache:
    """LRU cache of committed values plus the overlay of the running write transaction."""

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = CACHE_MAX_BYTES if max_bytes is None else max_bytes
        # least recently used first: dicts keep insertion order and a hit re-inserts its key
        self._values: dict[CacheKey, bytes] = {}
        self.nbytes = 0
        self._txnid = -1
        self._overlay: dict[CacheKey, bytes | None] | None = None

    @property
    def active(self) -> bool:
        """Inside a write transaction (between :meth:`begin` and :meth:`commit`/:meth:`discard`)."""
        return self._overlay is not None

    def keys(self) -> list[CacheKey]:
        """The cached keys, least recently used first (committed values only)."""
        return list(self._values)

    def begin(self, last_txnid: int) -> None:
        """A write transaction starts; ``last_txnid`` is LMDB's last committed transaction id."""
        if last_txnid != self._txnid:
            self._values.clear()
            self.nbytes = 0
        self._overlay = {}

    def discard(self) -> None:
        """The write transaction was aborted: forget its writes."""
        self._overlay = None

    def commit(self, txn_id: int) -> None:
        """The write transaction ``txn_id`` was committed: its writes become cached values."""
        overlay, self._overlay = self._overlay or {}, None
        for key, value in overlay.items():
            self._forget(key)
            if value is not None:
                self.keep(key, value)
        self._txnid = txn_id if overlay else -1

    def get(self, key: CacheKey) -> bytes | None | _Miss:
        """The value of ``key``: written in this transaction (None: deleted), cached (now the
        most recently used), or :data:`MISS`."""
        if self._overlay is not None and key in self._overlay:
            return self._overlay[key]
        value = self._values.pop(key, None)
        if value is None:
            return MISS
        self._values[key] = value
        return value

    def keep(self, key: CacheKey, value: bytes) -> None:
        """Remember a committed value (read from LMDB), dropping the least recently used ones
        past :attr:`max_bytes`."""
        while self._values and self.nbytes + len(value) > self.max_bytes:
            self.nbytes -= len(self._values.pop(next(iter(self._values))))
        self._values[key] = value
        self.nbytes += len(value)

    def put(self, key: CacheKey, value: bytes) -> None:
        """``key`` was written in this transaction (a no-op outside a write transaction)."""
        if self._overlay is not None:
            self._overlay[key] = value

    def delete(self, key: CacheKey) -> None:
        """``key`` was deleted in this transaction (a no-op outside a write transaction)."""
        if self._overlay is not None:
            self._overlay[key] = None

    def _forget(self, key: CacheKey) -> None:
        old = self._values.pop(key, None)
        if old is not None:
            self.nbytes -= len(old)
