"""``streamstars backfill``: apply every visit of a repository, resumably.

Visits are applied in visit order with the very same per-visit step as the Kafka consumer
(:mod:`streamstars.ingest`).  Reading, selecting (and, for a state directory, routing to the
sky shards) the next visits runs in a small thread pool while the current one is applied
(pyarrow and numpy release the GIL), so the writer is kept busy.  With ``workers`` > 1 (a
state directory only) the visits are read and the shards written by that many processes
(:mod:`streamstars.parallel_backfill`); this process keeps the index, the progress bar and the
summary.  A visit already applied from the same files (same paths, sizes and mtimes) is
skipped without reading; one whose files changed is read and hashed: same content -> skipped,
different content -> a failure unless ``replace``.  A visit from a Butler repository
(:mod:`streamstars.butler`) is skipped when the UUIDs of its datasets are those it was applied
from.  A configured reference catalog is validated
(:func:`streamstars.references.attach_references`) before any visit is read.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from streamstars.config import BuildStarsConfig
from streamstars.errors import (
    ConfigError,
    DiskFullError,
    MissingMetadataError,
    ShardError,
    StreamstarsError,
)
from streamstars.ingest import (
    ApplyResult,
    PreparedVisit,
    RoutedVisit,
    Target,
    VisitInput,
    apply_prepared,
    apply_routed,
    file_signature,
    prepare_visit,
    route_visit,
)
from streamstars.io.discover import DiscoveredVisit, RepoInventory, discover_repo
from streamstars.references import CONFIGURED, ReferenceChoice, resolve_references
from streamstars.state import StateDirectory

log = logging.getLogger(__name__)


@dataclass
class VisitFailure:
    """One visit that could not be applied and why."""

    visit: int
    error: str


@dataclass
class TransferStats:
    """A parallel backfill's work outside the transactions, summed over its worker processes
    [s, bytes]: reading and selecting, routing, and sending each shard's rows to its owner
    (pickled, through a multiprocessing queue); and the CPU time of the worker processes
    (all their threads), summed and of the busiest one (``max_`` fields take the maximum)."""

    parts: int = 0
    bytes: int = 0
    pickle_seconds: float = 0.0
    unpickle_seconds: float = 0.0
    route_seconds: float = 0.0
    prepare_seconds: float = 0.0
    apply_seconds: float = 0.0
    cpu_seconds: float = 0.0
    max_worker_cpu_seconds: float = 0.0

    def add(self, other: dict[str, float]) -> None:
        """Add one worker's counts."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            given = type(value)(other.get(f.name, 0))
            setattr(self, f.name, max(value, given) if f.name.startswith("max_")
                    else value + given)


@dataclass
class BackfillReport:
    """Summary of a backfill run."""

    applied: int = 0
    replaced: int = 0
    skipped: int = 0
    failed: list[VisitFailure] = field(default_factory=list)
    sources_read: int = 0
    observations_selected: int = 0
    seconds: float = 0.0
    apply_seconds: list[tuple[int, float]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    without_sources: list[int] = field(default_factory=list)
    #: rows dropped for unusable coordinates by the visits applied or replaced, by reason
    dropped: dict[str, int] = field(default_factory=dict)
    #: a parallel backfill's costs outside the transactions (None with one process)
    transfer: TransferStats | None = None

    @property
    def ok(self) -> bool:
        """True when no visit failed and every file of the repository could be used."""
        return not self.failed and not self.problems

    def count(self, result: ApplyResult) -> None:
        """Add the outcome of one visit."""
        if result.status == "skipped":
            self.skipped += 1
        elif result.status == "replaced":
            self.replaced += 1
        else:
            self.applied += 1
        self.sources_read += result.n_sources
        self.observations_selected += result.n_selected
        self.apply_seconds.append((result.visit, result.seconds))
        for reason, count in result.dropped.items():
            self.dropped[reason] = self.dropped.get(reason, 0) + count


def _unchanged(target: Target, visit: DiscoveredVisit) -> bool:
    """Whether ``visit`` is applied from the same files (Butler: the same datasets): skipped
    without reading.  In a state directory only a visit completely applied counts (an
    interrupted one is read and completed)."""
    record = target.visit_record(visit.visit)
    if record is None or getattr(record, "status", "applied") != "applied":
        return False
    if visit.dataset_ids:  # Butler datasets are immutable: same UUIDs, same content
        return record.dataset_ids == sorted(visit.dataset_ids)
    if record.files is None:
        return False
    try:
        return bool(record.files == file_signature(visit.source_paths))
    except OSError:
        return False


#: Reads and selects one visit with a configuration (in a prefetch thread or a worker
#: process, no store access).
PrepareVisit = Callable[[BuildStarsConfig, DiscoveredVisit], PreparedVisit]


def prepare_discovered(config: BuildStarsConfig, visit: DiscoveredVisit) -> PreparedVisit:
    """Read and select a visit found in a repository directory (:func:`prepare_visit`).

    Raises:
        MissingMetadataError: no metadata names the visit; and see :func:`prepare_visit`.
    """
    if visit.metadata is None:
        reason = visit.metadata_error or "no visitSummary / visitTable row names this visit"
        raise MissingMetadataError(f"visit {visit.visit}: no visit metadata ({reason}); "
                                   "add its visitSummary or visitTable/ccdVisitTable")
    return prepare_visit(VisitInput(visit.visit, visit.source_paths, visit.metadata,
                                    visit.dataset_ids), config)


def backfill(repo: str | Path, store: Target, *, replace: bool = False,
             prefetch: int = 2, progress: bool = True,
             inventory: RepoInventory | None = None,
             on_result: Callable[[ApplyResult], None] | None = None,
             references: ReferenceChoice = CONFIGURED,
             prepare: PrepareVisit | None = None, workers: int = 1,
             butler: str | None = None) -> BackfillReport:
    """Apply every visit found in ``repo`` to ``store`` (a state directory, or one store);
    never stops at a bad visit.

    ``references``: the reference catalog visits cache stars from, as
    :func:`streamstars.references.attach_references` returned it for ``store`` (default: the
    store's configured catalog, opened and checked before any visit is read).
    ``inventory`` replaces the directory discovery of ``repo`` (a Butler repository's visits,
    :func:`streamstars.butler.discover.butler_inventory`) and ``prepare`` the reading of a
    visit (:func:`streamstars.butler.read.prepare_butler_visit` reads through dataset URIs;
    it must be a module-level function when ``workers`` > 1).  ``workers`` > 1: that many
    processes read the visits and write the shards of a state directory
    (:func:`streamstars.parallel_backfill.backfill_parallel`); ``butler`` is the command's
    Butler repository, for their reference catalog.

    Raises:
        RefcatError, StateError: the configured reference catalog is unusable or differs from
            the one the store caches (before any visit is read).
        DiskFullError: the store's disk is nearly full (the visits applied so far stay; run
            again once space is freed).
        ShardError: a shard of the state directory is missing or damaged (nothing of the
            visit needing it was written).
        ConfigError: ``workers`` < 1, or > 1 with a single store.
        KeyboardInterrupt: Ctrl-C; the visit being applied is rolled back (its transaction is
            aborted; in a state directory the shards it reached keep it and the next run
            completes it), the visits applied before it stay, the visits read ahead are
            dropped.
    """
    start = time.perf_counter()
    if workers < 1 or (workers > 1 and not isinstance(store, StateDirectory)):
        raise ConfigError(f"--workers must be at least 1 (and 1 for a single store), got "
                          f"{workers}")
    source = resolve_references(store, references)
    inventory = inventory or discover_repo(repo, reference_ccd=store.config.referenceCCD)
    report = BackfillReport(problems=list(inventory.problems))
    # visits named by a metadata table whose source tables are not (yet) in the repository;
    # a Butler visit always has its source dataset (read through its URI, maybe remote)
    report.without_sources = sorted(v for v, d in inventory.visits.items()
                                    if not (d.source_paths or d.dataset_ids))
    visits = [v for _, v in sorted(inventory.visits.items()) if v.source_paths or v.dataset_ids]
    todo = [v for v in visits if replace or not _unchanged(store, v)]
    report.skipped += len(visits) - len(todo)
    if workers > 1:
        from streamstars.parallel_backfill import backfill_parallel

        assert isinstance(store, StateDirectory)
        backfill_parallel(store, todo, report, workers=workers, replace=replace,
                          prepare=prepare or prepare_discovered, butler=butler,
                          progress=progress, total=len(visits), on_result=on_result)
        report.seconds = time.perf_counter() - start
        return report
    prepare_one = _preparer(store, prepare or prepare_discovered)
    with (ThreadPoolExecutor(max_workers=max(1, prefetch)) as pool,
          tqdm(total=len(visits), initial=len(visits) - len(todo), unit="visit",
               desc="backfill", dynamic_ncols=True, disable=not progress) as bar):
        for visit, future in _prefetched(pool, todo, prefetch, prepare_one):
            try:
                prepared = future.result()
                if isinstance(prepared, RoutedVisit):
                    assert isinstance(store, StateDirectory)
                    result = apply_routed(store, prepared, replace=replace, references=source)
                else:
                    result = apply_prepared(store, prepared, replace=replace, references=source)
            except KeyboardInterrupt:
                pool.shutdown(wait=False, cancel_futures=True)  # do not read further visits
                raise
            except (DiskFullError, ShardError):
                raise  # every later visit would fail the same way; resumable once fixed
            except StreamstarsError as exc:
                report.failed.append(VisitFailure(visit.visit, str(exc)))
                log.error("visit %d failed: %s", visit.visit, exc)
            else:
                report.count(result)
                if on_result is not None:
                    on_result(result)
            show_progress(bar, report, start)
    report.seconds = time.perf_counter() - start
    return report


def show_progress(bar: tqdm[object], report: BackfillReport, start: float) -> None:
    """One more visit done: the bar's rates (visits/s, sources/s) and failures."""
    elapsed = max(time.perf_counter() - start, 1e-9)
    bar.set_postfix(visits_s=f"{(bar.n + 1) / elapsed:.1f}",
                    sources_s=f"{report.sources_read / elapsed:,.0f}",
                    failed=len(report.failed))
    bar.update(1)


Prepared = PreparedVisit | RoutedVisit


def _preparer(target: Target, prepare: PrepareVisit) -> Callable[[DiscoveredVisit], Prepared]:
    """Read and select a visit; for a state directory also route it (in the prefetch thread,
    off the writer's path)."""
    config = target.config
    if not isinstance(target, StateDirectory):
        return lambda visit: prepare(config, visit)
    nside, margin = target.shard_nside, target.shard_margin
    return lambda visit: route_visit(prepare(config, visit), nside, margin)


def _prefetched(pool: ThreadPoolExecutor, visits: list[DiscoveredVisit], depth: int,
                prepare: Callable[[DiscoveredVisit], Prepared],
                ) -> Iterator[tuple[DiscoveredVisit, Future[Prepared]]]:
    """Yield (visit, future) in order, keeping ``depth`` visits being prepared ahead."""
    queue: list[tuple[DiscoveredVisit, Future[Prepared]]] = []
    it = iter(visits)
    for visit in it:
        queue.append((visit, pool.submit(prepare, visit)))
        if len(queue) > depth:
            yield queue.pop(0)
    while queue:
        yield queue.pop(0)
