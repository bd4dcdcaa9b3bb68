"""The index of stored sourceIds: a visit whose sourceIds are already stored for another visit
is refused (sourceIds are unique per instrument; reused ones would give two stars one
``fgcm_id`` and merge observations of different visits in the association's bookkeeping).

Layout (sub-database ``source_ids``): the sourceIds of the stored observations are grouped in
blocks of 64 consecutive ids; the key of a block is ``(sourceId ^ 2**63) >> 6`` (big-endian,
so LMDB's order is the ids' order) and its value lists ``(bits, visit)`` records, ``bits``
(uint64) marking which of the block's 64 ids that visit stores.  Pipeline sourceIds pack the
visit and detector in their high bits and count the sources of a detector in the low ones, so
a visit's selected sources fill a few hundred to a few thousand blocks, each holding one
record: a visit's check and insertion is one ``getmulti`` and one ``putmulti`` over its blocks
(numpy builds the blocks; no loop over sources).  Ids scattered at random would cost one block
per id — correct, only slower.

Stores written before the index existed get it built once, from their observations, the first
time a writer applies or retracts a visit (:func:`ensure_source_index`); sourceIds such a store
already shares between visits are reported then (they cannot be refused any more: retract one
of the visits).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import lmdb
import numpy as np

from streamstars.associate import STORED_OBSERVATION_DTYPES
from streamstars.errors import SourceIdReuseError
from streamstars.state.codec import decode_columns
from streamstars.state.store import (
    DB_META,
    DB_OBSERVATIONS,
    DB_SOURCE_IDS,
    META_SOURCE_INDEX,
    StarStore,
)

log = logging.getLogger(__name__)

BLOCK_BITS = 6
ENTRY_DTYPE = np.dtype([("bits", "<u8"), ("visit", "<i8")])
_SIGN = np.uint64(1 << 63)
_LOW = np.uint64((1 << BLOCK_BITS) - 1)


def _blocks(source_id: np.ndarray, visit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique (block, visit) records: (block keys (uint64), entries (ENTRY_DTYPE))."""
    u = np.asarray(source_id, dtype=np.int64).view(np.uint64) ^ _SIGN
    block = u >> np.uint64(BLOCK_BITS)
    bit = np.left_shift(np.uint64(1), u & _LOW)
    visit = np.asarray(visit, dtype=np.int64)
    order = np.lexsort((visit, block))
    block, bit, visit = block[order], bit[order], visit[order]
    starts = np.flatnonzero(np.r_[True, (block[1:] != block[:-1]) | (visit[1:] != visit[:-1])])
    entries = np.zeros(len(starts), dtype=ENTRY_DTYPE)
    if len(starts):
        entries["bits"] = np.bitwise_or.reduceat(bit, starts)
        entries["visit"] = visit[starts]
    return block[starts], entries


def _group(block: np.ndarray) -> np.ndarray:
    """Start of each run of equal blocks (and the end)."""
    return np.flatnonzero(np.r_[True, block[1:] != block[:-1], True])


def _keys(blocks: np.ndarray) -> list[bytes]:
    raw = np.asarray(blocks, dtype=">u8").tobytes()
    return [raw[i:i + 8] for i in range(0, len(raw), 8)]


def _popcount(bits: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 (numpy >= 1.26 has no bitwise_count everywhere)."""
    raw = np.ascontiguousarray(bits, dtype="<u8").view(np.uint8).reshape(-1, 8)
    return np.unpackbits(raw, axis=1).sum(axis=1)


def claim_source_ids(store: StarStore, txn: lmdb.Transaction, visit: int,
                     source_id: np.ndarray) -> None:
    """Record that ``visit`` stores ``source_id`` (unique within the visit).

    Raises:
        SourceIdReuseError: some of the ids are stored for another visit; nothing is written
            (the caller's transaction is aborted by the error).
    """
    if len(source_id) == 0:
        return
    blocks, entries = _blocks(source_id, np.full(len(source_id), visit, dtype=np.int64))
    keys = _keys(blocks)
    cursor = txn.cursor(db=store.dbs[DB_SOURCE_IDS])
    values = _entry_bytes(entries)
    found = {bytes(k): bytes(v) for k, v in cursor.getmulti(keys)}
    # blocks already holding ids (of neighbouring sourceIds, or reused ones): merged one by
    # one; with pipeline sourceIds a new visit rarely shares a block with another
    clashes: dict[int, list[tuple[int, int]]] = {}
    for i in (np.flatnonzero([k in found for k in keys]) if found else ()):
        old = np.frombuffer(found[keys[i]], dtype=ENTRY_DTYPE).copy()
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
    cursor.putmulti(zip(keys, values, strict=True))


def _entry_bytes(entries: np.ndarray) -> list[bytes]:
    raw = entries.tobytes()
    size = ENTRY_DTYPE.itemsize
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
    u = ((block << BLOCK_BITS) | low) ^ (1 << 63)
    return u - (1 << 64) if u >= 1 << 63 else u


def release_source_ids(store: StarStore, txn: lmdb.Transaction, visit: int,
                       source_id: np.ndarray) -> None:
    """Forget that ``visit`` stores ``source_id`` (it is retracted or replaced)."""
    if len(source_id) == 0 or DB_SOURCE_IDS not in store.dbs:
        return
    blocks, entries = _blocks(source_id, np.full(len(source_id), visit, dtype=np.int64))
    keys = _keys(blocks)
    handle = store.dbs[DB_SOURCE_IDS]
    found = {bytes(k): bytes(v) for k, v in txn.cursor(db=handle).getmulti(keys)}
    for i, key in enumerate(keys):  # a retraction or replacement: rare, not a hot path
        raw = found.get(key)
        if raw is None:
            continue
        old = np.frombuffer(raw, dtype=ENTRY_DTYPE).copy()
        mine = old["visit"] == visit
        old["bits"][mine] &= ~entries["bits"][i]
        old = old[old["bits"] != 0]
        if len(old):
            txn.put(key, old.tobytes(), db=handle)
        else:
            txn.delete(key, db=handle)


def _stored_ids(store: StarStore, txn: lmdb.Transaction
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    wanted = frozenset({"source_id", "visit"})
    for _, value in txn.cursor(db=store.dbs[DB_OBSERVATIONS]):
        store.note_access()
        cols = decode_columns(bytes(value), STORED_OBSERVATION_DTYPES, wanted)
        yield cols["source_id"], cols["visit"]


def build_source_index(store: StarStore, txn: lmdb.Transaction) -> int:
    """(Re)build the index from every stored observation; returns how many sourceIds are
    shared by several visits (stored before the index existed: logged, not refused)."""
    ids, visits = [], []
    for sid, vis in _stored_ids(store, txn):
        ids.append(sid)
        visits.append(vis)
    handle = store.dbs[DB_SOURCE_IDS]
    txn.drop(handle, delete=False)
    source_id = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    visit = np.concatenate(visits) if visits else np.zeros(0, np.int64)
    blocks, entries = _blocks(source_id, visit)
    bounds = _group(blocks)
    raw = entries.tobytes()
    size = ENTRY_DTYPE.itemsize
    keys = _keys(blocks[bounds[:-1]])
    values = [raw[lo * size:hi * size] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    txn.cursor(db=handle).putmulti(zip(keys, values, strict=True), append=True)
    # ids marked by several records of one block are shared by several visits
    per_block = np.bitwise_or.reduceat(entries["bits"], bounds[:-1]) if len(entries) else \
        np.zeros(0, np.uint64)
    shared = int(_popcount(entries["bits"]).sum() - _popcount(per_block).sum())
    return shared


def ensure_source_index(store: StarStore) -> None:
    """Build the sourceId index of a store written before it existed (once per store; a
    no-op for stores that have it, checked once per open store)."""
    if store.source_index_checked or store.readonly:
        return
    if store.get_meta(META_SOURCE_INDEX) is None:
        def body(txn: lmdb.Transaction) -> int:
            shared = build_source_index(store, txn)
            txn.put(META_SOURCE_INDEX, b"1", db=store.dbs[DB_META])
            return shared

        shared = store.write(body)
        log.warning("built the sourceId index of %s (a store written by an older streamstars)%s",
                    store.path,
                    f"; {shared} sourceIds are stored for more than one visit: retract the "
                    "wrong visits" if shared else "")
    store.source_index_checked = True
