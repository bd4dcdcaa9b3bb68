"""``streamstars backfill``: apply every visit of a repository, resumably.

Visits are applied in visit order with the very same per-visit step as the Kafka consumer
(:mod:`streamstars.ingest`).  Reading and selecting the next visits runs in a small thread pool
while the current one is applied (pyarrow and numpy release the GIL), so the single LMDB writer
is kept busy.  A visit already applied from the same files (same paths, sizes and mtimes) is
skipped without reading; one whose files changed is read and hashed: same content -> skipped,
different content -> a failure unless ``replace``.  A visit from a Butler repository
(:mod:`streamstars.butler`) is skipped when the UUIDs of its datasets are those it was applied
from.  A configured reference catalog is validated
(:func:`streamstars.references.attach_references`) before any visit is read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from streamstars.errors import DiskFullError, MissingMetadataError, StreamstarsError
from streamstars.ingest import (
    ApplyResult,
    PreparedVisit,
    VisitInput,
    apply_prepared,
    file_signature,
    prepare_visit,
)
from streamstars.io.discover import DiscoveredVisit, RepoInventory, discover_repo
from streamstars.references import CONFIGURED, ReferenceChoice, resolve_references
from streamstars.state import StarStore

log = logging.getLogger(__name__)


@dataclass
class VisitFailure:
    """One visit that could not be applied and why."""

    visit: int
    error: str


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

    @property
    def ok(self) -> bool:
        """True when no visit failed and every file of the repository could be used."""
        return not self.failed and not self.problems


def _unchanged(store: StarStore, visit: DiscoveredVisit) -> bool:
    record = store.visit_record(visit.visit)
    if record is None:
        return False
    if visit.dataset_ids:  # Butler datasets are immutable: same UUIDs, same content
        return record.dataset_ids == sorted(visit.dataset_ids)
    if record.files is None:
        return False
    try:
        return bool(record.files == file_signature(visit.source_paths))
    except OSError:
        return False


#: Reads and selects one visit (in a prefetch thread, no store writes).
PrepareVisit = Callable[[StarStore, DiscoveredVisit], PreparedVisit]


def _prepare(store: StarStore, visit: DiscoveredVisit) -> PreparedVisit:
    if visit.metadata is None:
        reason = visit.metadata_error or "no visitSummary / visitTable row names this visit"
        raise MissingMetadataError(f"visit {visit.visit}: no visit metadata ({reason}); "
                                   "add its visitSummary or visitTable/ccdVisitTable")
    return prepare_visit(VisitInput(visit.visit, visit.source_paths, visit.metadata,
                                    visit.dataset_ids), store.config)


def backfill(repo: str | Path, store: StarStore, *, replace: bool = False,
             prefetch: int = 2, progress: bool = True,
             inventory: RepoInventory | None = None,
             on_result: Callable[[ApplyResult], None] | None = None,
             references: ReferenceChoice = CONFIGURED,
             prepare: PrepareVisit | None = None) -> BackfillReport:
    """Apply every visit found in ``repo`` to ``store``; never stops at a bad visit.

    ``references``: the reference catalog visits cache stars from, as
    :func:`streamstars.references.attach_references` returned it for ``store`` (default: the
    store's configured catalog, opened and checked before any visit is read).
    ``inventory`` replaces the directory discovery of ``repo`` (a Butler repository's visits,
    :func:`streamstars.butler.discover.butler_inventory`) and ``prepare`` the reading of a
    visit (:func:`streamstars.butler.read.prepare_butler_visit` reads through dataset URIs).

    Raises:
        RefcatError, StateError: the configured reference catalog is unusable or differs from
            the one the store caches (before any visit is read).
        DiskFullError: the store's disk is nearly full (the visits applied so far stay; run
            again once space is freed).
        KeyboardInterrupt: Ctrl-C; the visit being applied is rolled back (its transaction is
            aborted), the visits applied before it stay, the visits read ahead are dropped.
    """
    start = time.perf_counter()
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
    with (ThreadPoolExecutor(max_workers=max(1, prefetch)) as pool,
          tqdm(total=len(visits), initial=len(visits) - len(todo), unit="visit",
               desc="backfill", dynamic_ncols=True, disable=not progress) as bar):
        for visit, future in _prefetched(pool, store, todo, prefetch, prepare or _prepare):
            try:
                prepared = future.result()
                result = apply_prepared(store, prepared, replace=replace, references=source)
            except KeyboardInterrupt:
                pool.shutdown(wait=False, cancel_futures=True)  # do not read further visits
                raise
            except DiskFullError:
                raise  # every later visit would fail the same way; resumable once freed
            except StreamstarsError as exc:
                report.failed.append(VisitFailure(visit.visit, str(exc)))
                log.error("visit %d failed: %s", visit.visit, exc)
            else:
                if result.status == "skipped":
                    report.skipped += 1
                elif result.status == "replaced":
                    report.replaced += 1
                else:
                    report.applied += 1
                report.sources_read += result.n_sources
                report.observations_selected += result.n_selected
                report.apply_seconds.append((visit.visit, result.seconds))
                for reason, count in result.dropped.items():
                    report.dropped[reason] = report.dropped.get(reason, 0) + count
                if on_result is not None:
                    on_result(result)
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(visits_s=f"{bar.n / elapsed:.1f}",
                            sources_s=f"{report.sources_read / elapsed:,.0f}",
                            failed=len(report.failed))
            bar.update(1)
    report.seconds = time.perf_counter() - start
    return report


def _prefetched(pool: ThreadPoolExecutor, store: StarStore, visits: list[DiscoveredVisit],
                depth: int, prepare: PrepareVisit,
                ) -> Iterator[tuple[DiscoveredVisit, Future[PreparedVisit]]]:
    """Yield (visit, future) in order, keeping ``depth`` visits being prepared ahead."""
    queue: list[tuple[DiscoveredVisit, Future[PreparedVisit]]] = []
    it = iter(visits)
    for visit in it:
        queue.append((visit, pool.submit(prepare, store, visit)))
        if len(queue) > depth:
            yield queue.pop(0)
    while queue:
        yield queue.pop(0)
