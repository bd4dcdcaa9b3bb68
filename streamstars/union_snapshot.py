"""INTERIM: a snapshot of a sharded state directory until the per-shard snapshot lands.

The per-shard snapshot (each shard deriving the stars its core owns, HATS partitions, flat
files streamed from them: docs/state.md, sub-task 9b) replaces this module.  Until then a
snapshot of a state directory is computed from ONE store holding every visit:

* a state with exactly one shard: that shard's store is everything a single store would hold
  (every observation's core is that shard, and no margin copy went elsewhere), so it is
  snapshotted as it is;
* otherwise the shards' stored observations are gathered per visit (deduplicated by sourceId:
  a margin row is stored in several shards), applied in visit order to a temporary store
  (the association is recomputed: it is independent of the visit order), the shards'
  reference-star caches copied into it, and that store is snapshotted.  Correct for any
  number of shards, but it costs an association of the whole survey: not for production.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from streamstars.columns import OBSERVATION_DTYPES, take
from streamstars.config import BuildStarsConfig
from streamstars.ingest import KafkaOffset, PreparedVisit, apply_prepared
from streamstars.snapshot import SnapshotSummary, write_store_snapshot
from streamstars.state import StarStore, StateDirectory, Transaction, VisitRecord
from streamstars.visit import VisitMetadata


def write_state_snapshot(state: StateDirectory, out_dir: str | Path,
                         formats: tuple[str, ...] = ("fits", "parquet"),
                         extra_metadata: dict[str, str] | None = None,
                         config: BuildStarsConfig | None = None) -> SnapshotSummary:
    """Write the snapshot of a state directory to ``out_dir`` (see the module docstring);
    the arguments are those of :func:`streamstars.snapshot.write_store_snapshot`."""
    shards = state.shards()
    if len(shards) == 1:
        return write_store_snapshot(state.open_shard(shards[0][1]), out_dir, formats=formats,
                                    extra_metadata=extra_metadata, config=config)
    with tempfile.TemporaryDirectory(prefix="streamstars-union-") as tmp:
        with StarStore.open(Path(tmp) / "store", state.config) as union:
            _gather(state, union)
            return write_store_snapshot(union, out_dir, formats=formats,
                                        extra_metadata=extra_metadata, config=config)


def _gather(state: StateDirectory, union: StarStore) -> None:
    """Apply every visit of ``state`` to ``union``, then copy the reference-star caches."""
    for record in state.visit_records():
        observations = []
        for shard in record.shards or []:
            if state.has_shard(shard):
                with state.open_shard(shard).read() as tx:
                    own = tx.visits.get(record.visit)
                    if own is not None:
                        observations.append(tx.observations.visit_rows(
                            own.band, own.pixels, own.visit))
        union_visit = _prepared(record, observations)
        kafka = record.kafka_position
        apply_prepared(union, union_visit, references=None,
                       kafka_offset=None if kafka is None else KafkaOffset(*kafka))
    identity = state.stored_refcat()
    if identity is None:
        return
    n_filters = len(identity.get("filters", []))

    def copy(tx: Transaction) -> None:
        for _, pixel in state.shards():
            with state.open_shard(pixel).read() as shard_tx:
                for ref_pixel, stars in shard_tx.refcache.items(n_filters):
                    tx.refcache.put(ref_pixel, stars, n_filters)
        tx.meta.set_refcat(identity)

    union.write(copy)


def _prepared(record: VisitRecord, parts: list[dict[str, np.ndarray]]) -> PreparedVisit:
    """The visit as it was prepared, from its shards' rows (margin copies dropped)."""
    columns = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}
    if columns:
        _, first = np.unique(columns["source_id"], return_index=True)
        columns = take(columns, first)
    else:
        columns = {k: np.zeros(0, dtype=dt) for k, dt in OBSERVATION_DTYPES.items()}
    return PreparedVisit(
        visit=record.visit, band=record.band,
        metadata=VisitMetadata.from_dict(record.metadata), observations=columns,
        n_sources=int(record.n_sources), delta_aper=float(record.delta_aper),
        delta_aper_detector={int(k): float(v)
                             for k, v in (record.delta_aper_detector or {}).items()},
        content_hash=record.content_hash, source_paths=list(record.source_paths or []),
        files=list(record.files or []), dropped=dict(record.dropped),
        dataset_ids=list(record.dataset_ids or []))
