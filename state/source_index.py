"""The index of stored sourceIds (sub-database ``source_ids``): a visit whose sourceIds are
already stored for another visit is refused (sourceIds are unique per instrument; reused ones
would give two stars one ``fgcm_id`` and merge observations of different visits in the
association's bookkeeping).

Layout: the sourceIds of the stored observations are grouped in blocks of 64 consecutive ids;
the key of a block is ``(sourceId ^ 2**63) >> 6`` (big-endian, so LMDB's order is the ids'
order) and its value lists ``(bits, visit)`` records (:data:`SOURCE_ENTRY_DTYPE`), ``bits``
(uint64) marking which of the block's 64 ids that visit stores.  Pipeline sourceIds pack the
visit and detector in their high bits and count the sources of a detector in the low ones, so
a visit's selected sources fill a few hundred to a few thousand blocks, each holding one
record: a visit's check and insertion is one ``getmulti`` and one ``putmulti`` over its blocks
(numpy builds the blocks; no loop over sources).  Ids scattered at random would cost one block
per id — correct, only slower.

Stores written before the index existed get it built once, from their observations, the first
time a writer applies or retracts a visit (:meth:`streamstars.state.store.StarStore.
ensure_source_index`); sourceIds such a store already shares between visits are reported then
(they cannot be refused any more: retract one of the visits).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lmdb
import numpy as np

from streamstars.errors import SourceIdReuseError
from streamstars.state.environment import MapTrimmer
from streamstars.state.schema import SOURCE_BLOCK_BITS, SOURCE_ENTRY_DTYPE, source_block_keys

_SIGN = np.uint64(1 << 63)
_LOW = np.uint64((1 << SOURCE_BLOCK_BITS) - 1)


def _blocks(source_id: np.ndarray, visit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique (block, visit) records: (block keys (uint64), entries)."""
    u = np.asarray(source_id, dtype=np.int64).view(np.uint64) ^ _SIGN
    block = u >> np.uint64(SOURCE_BLOCK_BITS)
    bit = np.left_shift(np.uint64(1), u & _LOW)
    visit = np.asarray(visit, dtype=np.int64)
    order = np.lexsort((visit, block))
    block, bit, visit = block[order], bit[order], visit[order]
    starts = np.flatnonzero(np.r_[True, (block[1:] != block[:-1]) | (visit[1:] != visit[:-1])])
    entries = np.zeros(len(starts), dtype=SOURCE_ENTRY_DTYPE)
    if len(starts):
        entries["bits"] = np.bitwise_or.reduceat(bit, starts)
        entries["visit"] = visit[starts]
    return block[starts], entries


def _group(block: np.ndarray) -> np.ndarray:
    """Start of each run of equal blocks (and the end)."""
    return np.flatnonzero(np.r_[True, block[1:] != block[:-1], True])


def _popcount(bits: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 (numpy >= 1.26 has no bitwise_count everywhere)."""
    raw = np.ascontiguousarray(bits, dtype="<u8").view(np.uint8).reshape(-1, 8)
    return np.unpackbits(raw, axis=1).sum(axis=1)


def _entry_bytes(entries: np.ndarray) -> list[bytes]:
    raw = entries.tobytes()
    size = SOURCE_ENTRY_DTYPE.itemsize
    return [raw[i:i + size] for i in range(0, len(raw), size)]


def _reuse_message(visit: int, clashes: dict[int, list[tuple[int, int]]]) -> str:
    parts = []
    total = 0
    for other in sorted(clashes):
        blocks_bits = clashes[other]
        n = int(_popcount(np.array([b for _, b in blocks_bits], dtype=np.uint64)).sum())
        total += n
        example = _id_of(*blocks_bits[0])
        parts.append(f"{n} already stored for visit {other} (e.g. sourceId {example})")
    return (f"visit {visit}: {total} of its sourceIds are already stored for another visit: "
            f"{'; '.join(parts[:5])}{' ...' if len(parts) > 5 else ''}.  sourceIds are unique "
            f"per instrument, so visit {visit} is refused (its source table holds another "
            "visit's sources, or comes from another instrument or repository); fix its files, "
            "or retract the other visit first if that one is wrong")


def _id_of(block: int, bits: int) -> int:
    """The smallest sourceId marked in ``bits`` of ``block`` (inverse of :func:`_blocks`)."""
    low = (bits & -bits).bit_length() - 1
    u = ((block << SOURCE_BLOCK_BITS) | low) ^ (1 << 63)
    return u - (1 << 64) if u >= 1 << 63 else u


class SourceIdIndex:
    """``source_ids`` inside one transaction (absent in stores of older versions opened by a
    reader: then every method is a no-op or finds nothing)."""

    def __init__(self, txn: lmdb.Transaction, db: Any | None, trimmer: MapTrimmer) -> None:
        self._txn = txn
        self._db = db
        self._trimmer = trimmer

    def claim(self, visit: int, source_id: np.ndarray) -> None:
        """Record that ``visit`` stores ``source_id`` (unique within the visit).

        Raises:
            SourceIdReuseError: some of the ids are stored for another visit; nothing is
                written (the caller's transaction is aborted by the error).
        """
        if len(source_id) == 0 or self._db is None:
            return
        blocks, entries = _blocks(source_id, np.full(len(source_id), visit, dtype=np.int64))
        keys = source_block_keys(blocks)
        cursor = self._txn.cursor(db=self._db)
        values = _entry_bytes(entries)
        self._trimmer.note_access()
        found = {bytes(k): bytes(v) for k, v in cursor.getmulti(keys)}
        # blocks already holding ids (of neighbouring sourceIds, or reused ones): merged one by
        # one; with pipeline sourceIds a new visit rarely shares a block with another
        clashes: dict[int, list[tuple[int, int]]] = {}
        for i in (np.flatnonzero([k in found for k in keys]) if found else ()):
            old = np.frombuffer(found[keys[i]], dtype=SOURCE_ENTRY_DTYPE).copy()
            overlap = old["bits"] & entries["bits"][i]
            for other, bits in zip(old["visit"].tolist(), overlap.tolist(), strict=True):
                if bits and other != visit:
                    clashes.setdefault(other, []).append((int(blocks[i]), bits))
            mine = old["visit"] == visit
            if mine.any():
                old["bits"][mine] |= entries["bits"][i]
            else:
                old = np.concatenate([old, entries[i:i + 1]])
            values[i] = old.tobytes()
        if clashes:
            raise SourceIdReuseError(_reuse_message(visit, clashes))
        self._trimmer.note_access()
        cursor.putmulti(zip(keys, values, strict=True))

    def visits_of(self, source_id: int) -> list[int]:
        """The visits that store ``source_id`` (one, unless the store predates the index and
        holds a reused id; none when it is not stored or the index is absent)."""
        if self._db is None:
            return []
        blocks, entries = _blocks(np.array([source_id], dtype=np.int64),
                                  np.zeros(1, dtype=np.int64))
        raw = self._txn.get(source_block_keys(blocks)[0], db=self._db)
        if raw is None:
            return []
        stored = np.frombuffer(bytes(raw), dtype=SOURCE_ENTRY_DTYPE)
        hit = (stored["bits"] & entries["bits"][0]) != 0
        return sorted(int(v) for v in stored["visit"][hit])

    def release(self, visit: int, source_id: np.ndarray) -> None:
        """Forget that ``visit`` stores ``source_id`` (it is retracted or replaced)."""
        if len(source_id) == 0 or self._db is None:
            return
        blocks, entries = _blocks(source_id, np.full(len(source_id), visit, dtype=np.int64))
        keys = source_block_keys(blocks)
        found = {bytes(k): bytes(v) for k, v in self._txn.cursor(db=self._db).getmulti(keys)}
        for i, key in enumerate(keys):  # a retraction or replacement: rare, not a hot path
            raw = found.get(key)
            if raw is None:
                continue
            self._trimmer.note_access()
            old = np.frombuffer(raw, dtype=SOURCE_ENTRY_DTYPE).copy()
            mine = old["visit"] == visit
            old["bits"][mine] &= ~entries["bits"][i]
            old = old[old["bits"] != 0]
            if len(old):
                self._txn.put(key, old.tobytes(), db=self._db)
            else:
                self._txn.delete(key, db=self._db)

    def rebuild(self, stored: Iterator[tuple[np.ndarray, np.ndarray]]) -> int:
        """Replace the index by one of ``stored`` ((sourceIds, visits) of every stored
        observation); returns how many sourceIds are shared by several visits (stored before
        the index existed: they cannot be refused any more)."""
        if self._db is None:
            raise ValueError("the source_ids sub-database is absent (a read-only open)")
        ids, visits = [], []
        for sid, vis in stored:
            ids.append(sid)
            visits.append(vis)
        self._txn.drop(self._db, delete=False)
        source_id = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        visit = np.concatenate(visits) if visits else np.zeros(0, np.int64)
        blocks, entries = _blocks(source_id, visit)
        bounds = _group(blocks)
        raw = entries.tobytes()
        size = SOURCE_ENTRY_DTYPE.itemsize
        keys = source_block_keys(blocks[bounds[:-1]])
        values = [raw[lo * size:hi * size] for lo, hi in zip(bounds[:-1], bounds[1:],
                                                              strict=True)]
        self._txn.cursor(db=self._db).putmulti(zip(keys, values, strict=True), append=True)
        # ids marked by several records of one block are shared by several visits
        per_block = np.bitwise_or.reduceat(entries["bits"], bounds[:-1]) if len(entries) else \
            np.zeros(0, np.uint64)
        return int(_popcount(entries["bits"]).sum() - _popcount(per_block).sum())
