"""The snapshot of a sharded state: one HATS partition per shard, flat files streamed from them.

Each shard derives the stars it owns from its own store alone
(:func:`streamstars.snapshot.derive_catalogs` with a :class:`ShardOwnership`), checks its
margin (:mod:`streamstars.margins`) and writes its partition of the HATS catalog
``OUT/fgcm_stars/`` (:func:`streamstars.io.hats.write_partition`); shards run in parallel in
``workers`` processes, one shard at a time each, so the memory of a worker is set by the
largest shard.  The flat files (legacy FITS and production parquet) are then streamed from
the partitions in ``fgcm_id`` order (:func:`streamstars.io.flat_stream.finish_partitioned_snapshot`)
and the whole directory is swapped into place atomically.

**Incremental**: ``SNAPSHOT.json`` records, per shard, its *generation* — the store's
``instance`` (drawn when the environment was created) and the LMDB transaction id its read
transaction saw — and a digest of what shapes a partition (the configuration, the margin,
the streamstars version).  When ``OUT`` already holds such a snapshot, a shard whose
generation and digest are unchanged is not recomputed: its partition is hard-linked
(:func:`streamstars.io.hats.reuse_partition`), its margin check carried over; the flat files
are streamed again from all the partitions.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import multiprocessing
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamstars import __version__
from streamstars.config import BuildStarsConfig, check_snapshot_config, to_dict
from streamstars.errors import ConfigError
from streamstars.ingest import crash_point
from streamstars.io.flat_stream import finish_partitioned_snapshot
from streamstars.io.hats import (
    CATALOG_DIR,
    PartitionFile,
    reuse_partition,
    write_partition,
)
from streamstars.io.snapshot_files import MANIFEST_NAME, stage_snapshot
from streamstars.margins import MarginViolation
from streamstars.snapshot import (
    ShardOwnership,
    SnapshotSummary,
    derive_catalogs,
    kafka_offsets,
    visit_catalog,
)
from streamstars.state import StarStore, StateDirectory, Transaction, VisitRecord
from streamstars.state.directory import merge_visit_records
from streamstars.state.schema import META_INSTANCE

log = logging.getLogger(__name__)

#: crash tests only: the process SIGKILLs itself right after writing its N-th partition
ENV_KILL_AFTER_PARTITIONS = "STREAMSTARS_TEST_KILL_AFTER_PARTITIONS"



@dataclass(frozen=True)
class ShardRef:
    """A shard of a state directory: its nest pixel at ``order`` and its store's directory."""

    order: int
    pixel: int
    path: Path

    @property
    def name(self) -> str:
        """``order/pixel``, the shard's key in ``SNAPSHOT.json``."""
        return f"{self.order}/{self.pixel}"


@dataclass(frozen=True)
class _ShardJob:
    shard: ShardRef
    config: BuildStarsConfig
    margin_arcsec: float
    catalog_dir: Path
    reuse_key: str
    previous: dict[str, Any] | None  # this shard's entry of the previous SNAPSHOT.json
    previous_catalog_dir: Path | None


@dataclass
class _ShardOutcome:
    shard: ShardRef
    generation: list[Any]
    partition: PartitionFile | None
    records: list[VisitRecord]
    violations: list[MarginViolation]
    reference_filters: tuple[str, ...]
    refcat: str | None  # provenance JSON of the reference catalog (None: none matched)

    def manifest_entry(self) -> dict[str, Any]:
        part = self.partition
        return {"generation": self.generation,
                "stars": part.n_stars if part else 0,
                "observations": part.n_observations if part else 0,
                "reference_filters": list(self.reference_filters),
                "refcat": self.refcat,
                "margin_violations": [v.to_dict() for v in self.violations]}


@dataclass
class ShardedSnapshotSummary(SnapshotSummary):
    """What a sharded snapshot wrote: a snapshot's summary, plus its partitions written and
    reused and the margin violations found."""

    written: int = 0
    reused: int = 0
    violations: list[MarginViolation] = field(default_factory=list)


def _generation(tx: Transaction) -> list[Any]:
    instance = tx.meta.get(META_INSTANCE)
    return [instance.decode() if instance is not None else str(tx.path), tx.id()]


def _reference_filters(tx: Transaction, config: BuildStarsConfig
                       ) -> tuple[tuple[str, ...], str | None]:
    """FILTERNAMES and refcat provenance of a shard, as its matching would give them."""
    stored = tx.meta.refcat()
    cfg = config.fgcmLoadReferenceCatalog
    if stored is None or not (cfg.path or cfg.collections):
        return (), None
    return tuple(str(f) for f in stored["filters"]), json.dumps(stored, sort_keys=True)


def _snapshot_shard(job: _ShardJob, store: StarStore | None = None) -> _ShardOutcome:
    """One shard: reuse its previous partition when nothing changed, else derive and write it
    (``store``: the shard's open store; None in a worker process: it is opened here)."""
    if store is None:
        with StarStore.open(job.shard.path, readonly=True) as own, \
                own.read(buffers=True) as tx:
            return _snapshot_read_shard(job, own, tx)
    with store.read(buffers=True) as tx:
        return _snapshot_read_shard(job, store, tx)


def _snapshot_read_shard(job: _ShardJob, store: StarStore, tx: Transaction) -> _ShardOutcome:
    shard = job.shard
    generation = _generation(tx)
    reused = _reused(job, tx, generation)
    if reused is not None:
        return reused
    derived = derive_catalogs(store, tx, job.config,
                              ShardOwnership(shard.order, shard.pixel, job.margin_arcsec))
    catalogs = derived.catalogs
    part = write_partition(job.catalog_dir, shard.order, shard.pixel, catalogs.stars,
                           catalogs.observations, catalogs.reference,
                           catalogs.reference_filters)
    crash_point(ENV_KILL_AFTER_PARTITIONS)
    return _ShardOutcome(shard, generation, part, derived.records, derived.violations,
                         tuple(catalogs.reference_filters), catalogs.metadata.get("refcat"))


def _reused(job: _ShardJob, tx: Transaction, generation: list[Any]) -> _ShardOutcome | None:
    """The shard's outcome from the previous snapshot when its store has not been written
    since and the settings are the same (None otherwise, or when the previous partition is
    not there any more)."""
    previous = job.previous
    if (previous is None or job.previous_catalog_dir is None
            or previous.get("generation") != generation
            or previous.get("reuse_key") != job.reuse_key):
        return None
    shard = job.shard
    try:
        part = (reuse_partition(job.previous_catalog_dir, job.catalog_dir, shard.order,
                                shard.pixel) if previous.get("stars") else None)
    except (OSError, ValueError) as exc:
        log.warning("shard %s: its previous partition cannot be reused (%s); recomputing",
                    shard.name, exc)
        return None
    filters, refcat = _reference_filters(tx, job.config)
    violations = [MarginViolation(**v) for v in previous.get("margin_violations", [])]
    return _ShardOutcome(shard, generation, part, tx.visits.records(), violations, filters,
                         refcat)


def _reuse_key(config: BuildStarsConfig, margin_arcsec: float) -> str:
    """Digest of what shapes a partition besides the shard's data."""
    text = json.dumps({"config": to_dict(config), "shardMargin": margin_arcsec,
                       "streamstars_version": __version__}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _previous_shards(out_dir: Path) -> dict[str, dict[str, Any]]:
    """The shard entries of the snapshot now in ``out_dir`` (empty when there is none)."""
    try:
        manifest = json.loads((out_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return {}
    shards = manifest.get("shards")
    if not isinstance(shards, dict):
        return {}
    return {name: dict(entry, reuse_key=manifest.get("reuse_key"))
            for name, entry in shards.items() if isinstance(entry, dict)}


def _run(jobs: list[_ShardJob], workers: int,
         open_store: Callable[[ShardRef], StarStore] | None) -> list[_ShardOutcome]:
    if workers <= 1 or len(jobs) <= 1:
        return [_snapshot_shard(job, open_store(job.shard) if open_store else None)
                for job in jobs]
    # spawn: a worker must not inherit this process's LMDB environments or pyarrow threads
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=min(workers, len(jobs)),
                                                mp_context=context) as pool:
        return list(pool.map(_snapshot_shard, jobs))


def _one_value(outcomes: list[_ShardOutcome], what: str, values: list[Any]) -> Any:
    distinct = {json.dumps(v, sort_keys=True) for v in values if v}
    if len(distinct) > 1:
        raise ValueError(f"the shards disagree on their {what}: {sorted(distinct)}; "
                         "run `streamstars refresh-refs` on the state directory")
    return next((v for v in values if v), values[0] if values else None)


def write_sharded_snapshot(shards: Sequence[ShardRef] | Callable[[], Sequence[ShardRef]],
                           out_dir: str | Path, *,
                           config: BuildStarsConfig, margin_arcsec: float,
                           store_config: BuildStarsConfig | None = None,
                           formats: Sequence[str] = ("fits", "parquet"), workers: int = 1,
                           extra_metadata: dict[str, str] | None = None,
                           open_store: Callable[[ShardRef], StarStore] | None = None,
                           boundary: AbstractContextManager[Any] | None = None
                           ) -> ShardedSnapshotSummary:
    """Write the snapshot of the shards' stores to ``out_dir`` (see the module docstring).

    Args:
        shards: the shards with data (or what lists them, called under ``boundary``).
        out_dir: the snapshot directory (replaced atomically; a previous snapshot of the same
            shards in it is reused where nothing changed).
        config: the settings to snapshot with (the state's, or one that differs from
            ``store_config`` in snapshot-time settings only).
        margin_arcsec: the state's ``shardMargin``.
        store_config: the state's configuration (checked against ``config``).
        formats: ``fits`` and/or ``parquet`` flat files.
        workers: processes deriving shards in parallel.
        extra_metadata: provenance entries added to every file.
        open_store: how this process opens a shard's store (a state directory's own stores:
            LMDB allows one environment per path and process); else
            ``StarStore.open(shard.path, readonly=True)``.  Worker processes open their own.
        boundary: held while the shards are read (a state directory's visit boundary: no
            visit is applied meanwhile, so each visit is seen in all of its shards or in
            none); released before the flat files are streamed.

    Returns:
        The summary, with every margin violation (each also logged as a warning).

    Raises:
        ConfigError: ``config`` changes a setting that shapes stored data.
        SnapshotDirectoryError, SnapshotWriteError: as for any snapshot.
    """
    start = time.perf_counter()
    if store_config is not None:
        check_snapshot_config(store_config, config)
    reuse_key = _reuse_key(config, margin_arcsec)
    with stage_snapshot(out_dir) as staging:
        previous = _previous_shards(staging.target) if staging.target_existed else {}
        previous_catalog = staging.target / CATALOG_DIR if previous else None
        with boundary or nullcontext():
            listed = shards() if callable(shards) else shards
            jobs = [_ShardJob(s, config, margin_arcsec, staging.path / CATALOG_DIR, reuse_key,
                              previous.get(s.name), previous_catalog)
                    for s in sorted(listed, key=lambda s: (s.order, s.pixel))]
            outcomes = _run(jobs, workers, open_store)
        records = merge_visit_records([o.records for o in outcomes])
        filters = tuple(_one_value(outcomes, "reference filters",
                                   [list(o.reference_filters) for o in outcomes]) or ())
        refcat = _one_value(outcomes, "reference catalogs", [o.refcat for o in outcomes])
        metadata = {
            "streamstars_version": __version__,
            "visits": json.dumps([r.visit for r in records]),
            "kafka_offsets": json.dumps(kafka_offsets(records), sort_keys=True),
            "config": json.dumps(to_dict(config), sort_keys=True),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **({"refcat": refcat} if refcat else {}),
            **(extra_metadata or {}),
        }
        partitions = [o.partition for o in outcomes if o.partition is not None]
        violations = [v for o in outcomes for v in o.violations]
        files = finish_partitioned_snapshot(
            staging, partitions, visits=visit_catalog(records), metadata=metadata,
            reference_filters=filters, formats=formats,
            extra={"reuse_key": reuse_key,
                   "shards": {o.shard.name: o.manifest_entry() for o in outcomes},
                   "margin_violations": len(violations)})
    for violation in violations:
        log.warning("margin check: %s", violation.describe())
    written = sum(1 for p in partitions if not p.reused)
    return ShardedSnapshotSummary(
        Path(out_dir), len(records), sum(p.n_stars for p in partitions),
        sum(p.n_observations for p in partitions), time.perf_counter() - start, files,
        written, len(partitions) - written, violations)


def write_state_snapshot(state: StateDirectory, out_dir: str | Path, *,
                         formats: Sequence[str] = ("fits", "parquet"),
                         config: BuildStarsConfig | None = None, workers: int = 1,
                         extra_metadata: dict[str, str] | None = None
                         ) -> ShardedSnapshotSummary:
    """Write the snapshot of a state directory (every shard with data) to ``out_dir``.

    The shards are read under the state's visit boundary
    (:meth:`~streamstars.state.StateDirectory.visit_boundary`): a writer (another process, or
    the consumer's other thread) waits while the shards are derived, so each visit is
    published in all of its shards or in none; it goes on while the flat files are streamed.
    Shards marked revoked (a consumer in a group lost their partition: the copies here are
    stale) are left out.

    Args:
        state: the state directory (read-only is enough).
        out_dir: as for :func:`write_sharded_snapshot`.
        formats: ``fits`` and/or ``parquet``.
        config: snapshot-time settings to use instead of the state's (``snapshot --config``).
        workers: processes deriving shards in parallel.
        extra_metadata: provenance entries added to every file.

    Raises:
        ShardError: a shard the index knows to hold data is missing.
        ConfigError, SnapshotDirectoryError, SnapshotWriteError: see
            :func:`write_sharded_snapshot`.
    """
    return write_states_snapshot([state], out_dir, formats=formats, config=config,
                                 workers=workers, extra_metadata=extra_metadata)


@dataclass(frozen=True)
class ShardCopy:
    """One state directory's copy of a shard and the Kafka offsets its store records."""

    state: StateDirectory
    pixel: int
    offsets: dict[tuple[str, int], int]
    revoked: bool

    @property
    def position(self) -> int:
        """How far the copy went: the sum of its next offsets (a shard's events are on one
        partition, so this is that partition's next offset)."""
        return sum(self.offsets.values())

    def covers(self, other: ShardCopy) -> bool:
        """Whether this copy is at or past ``other`` on every partition ``other`` recorded."""
        return all(self.offsets.get(k, -1) >= v for k, v in other.offsets.items())


def choose_shard_copies(states: Sequence[StateDirectory]) -> dict[int, ShardCopy]:
    """For every shard held by ``states``, the copy to publish: the one with the highest
    partition offset (ties: a copy not marked revoked, then the first state given).  One
    state alone: its revoked shards are left out (it no longer owns them).  A chosen copy
    that is not at or past another on some partition is logged (copies from diverging
    histories)."""
    copies: dict[int, list[ShardCopy]] = {}
    for state in states:
        revoked = state.revoked_shards()
        for _, pixel in state.shards():
            with state.open_shard(pixel).read() as tx:
                offsets = {(t, p): o for t, p, o in tx.offsets.items()}
            copies.setdefault(pixel, []).append(
                ShardCopy(state, pixel, offsets, pixel in revoked))
    chosen: dict[int, ShardCopy] = {}
    for pixel, candidates in sorted(copies.items()):
        if len(states) == 1:
            candidates = [c for c in candidates if not c.revoked]
            if not candidates:
                continue
        best = max(candidates, key=lambda c: (c.position, not c.revoked))  # first on ties
        behind = [c for c in candidates if not best.covers(c)]
        if behind:
            log.warning("shard %d: the copy of %s (offsets %s) is not past %s on every "
                        "partition; it is published (the highest offset)", pixel,
                        best.state.path, best.offsets,
                        ", ".join(f"{c.state.path} {c.offsets}" for c in behind))
        chosen[pixel] = best
    return chosen


def write_states_snapshot(states: Sequence[StateDirectory], out_dir: str | Path, *,
                          formats: Sequence[str] = ("fits", "parquet"),
                          config: BuildStarsConfig | None = None, workers: int = 1,
                          extra_metadata: dict[str, str] | None = None
                          ) -> ShardedSnapshotSummary:
    """Write the snapshot of the shards of several state directories (consumers of one group,
    each holding the shards of its partitions): each shard from the copy
    :func:`choose_shard_copies` picks, read under every state's visit boundary.

    Raises:
        ConfigError: the states were built with configurations that shape stored data
            differently (or other shard settings).
        ShardError, SnapshotDirectoryError, SnapshotWriteError: see
            :func:`write_state_snapshot`.
    """
    if not states:
        raise ConfigError("a snapshot needs at least one state directory")
    first = states[0]
    for other in states[1:]:
        mine, theirs = (first.manifest["association_fingerprint"],
                        other.manifest["association_fingerprint"])
        if mine != theirs:
            keys = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise ConfigError(f"the state directories {first.path} and {other.path} were built "
                              f"with configurations that differ in {keys}: their shards "
                              "cannot make one catalog")
    owner: dict[int, StateDirectory] = {}

    def open_store(ref: ShardRef) -> StarStore:
        state = owner[ref.pixel]
        state.keep_open([ref.pixel])  # stores of shards already derived may be closed
        return state.open_shard(ref.pixel)

    def listed() -> list[ShardRef]:  # under the boundaries: no visit is being applied
        for state in states:
            state.check_shards_present()
        chosen = choose_shard_copies(states)
        owner.update({pixel: copy.state for pixel, copy in chosen.items()})
        return [ShardRef(first.shard_order, pixel, copy.state.shard_path(pixel))
                for pixel, copy in sorted(chosen.items())]

    @contextmanager
    def boundaries() -> Iterator[None]:
        with ExitStack() as stack:
            for state in states:
                stack.enter_context(state.visit_boundary(exclusive=False))
            yield

    return write_sharded_snapshot(
        listed, out_dir, config=config or first.config, margin_arcsec=first.shard_margin,
        store_config=first.config, formats=formats, workers=workers,
        extra_metadata=extra_metadata, open_store=open_store, boundary=boundaries())


__all__ = ["ShardCopy", "ShardRef", "ShardedSnapshotSummary", "choose_shard_copies",
           "write_sharded_snapshot", "write_state_snapshot", "write_states_snapshot"]
