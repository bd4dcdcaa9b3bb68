"""``streamstars backfill --workers N``: the shards of a state directory written by N processes.

Each worker process *owns* the shards ``s`` with ``shard_owner(s, N) == w`` (a fixed mix of
the pixel number, :func:`streamstars.shards.shard_owner`) and is the only process writing
them; it also *reads* a share of the visits (the i-th visit to apply goes to worker ``i % N``):
a reader thread reads, selects and routes each visit
(:func:`streamstars.ingest.route_visit`) and sends each shard's rows to that shard's owner
(pickled numpy columns through a multiprocessing queue; the cost is measured and reported in
``BackfillReport.transfer``), and the visit's header (hash, shards, counts — no rows) to
this process, the *driver*.

The driver is the only writer of the state's index and runs the same protocol as a visit
applied in one process (:mod:`streamstars.ingest`): it plans the visit against its index
record (:func:`~streamstars.ingest.plan_visit`: skip, conflict, apply, replace, complete),
records the intent, tells the owners to commit (each shard in its own transaction), and once
every owner reported, marks the visit applied.  A shard refusing the visit (its sourceIds
stored for another visit there) makes the driver retract it from every shard and forget it,
as in one process.  The visits are applied in no fixed order across shards; the association
is independent of the order, so the catalogs are the same for any N.

Faults: a bad visit fails alone; a full disk in any worker stops the backfill
(``DiskFullError``); a worker that dies (killed, crashed) stops it with a ``StateError``
naming the worker; Ctrl-C stops the workers.  In every case the visits whose shards were
not all committed keep their index record ``applying`` and the next backfill completes them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import pickle
import queue
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from streamstars.backfill import BackfillReport, TransferStats, VisitFailure
from streamstars.config import config_from_json, to_dict
from streamstars.errors import (
    DiskFullError,
    PermanentInputError,
    ShardError,
    StateError,
    StreamstarsError,
    VisitConflictError,
)
from streamstars.ingest import (
    ApplyResult,
    VisitHeader,
    VisitPlan,
    apply_to_store,
    begin_visit,
    finish_visit,
    merge_stats,
    plan_visit,
    retract_from_store,
    route_visit,
    shard_committed,
)
from streamstars.io.discover import DiscoveredVisit
from streamstars.references import open_reference_source
from streamstars.shards import shard_owner
from streamstars.state import StateDirectory

log = logging.getLogger(__name__)

#: How often the driver looks at its workers while waiting for a message [s].
_POLL_SECONDS = 0.5


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs (picklable: workers are spawned)."""

    state: str
    config_json: str
    workers: int
    butler: str | None
    prepare: Callable[..., Any]


@dataclass
class _InFlight:
    """A visit the driver has handed to a reader and not finished yet."""

    visit: DiscoveredVisit
    started: float
    header: VisitHeader | None = None
    plan: VisitPlan | None = None
    waiting: set[tuple[str, int]] = field(default_factory=set)
    results: list[dict[str, Any]] = field(default_factory=list)
    refused: str | None = None
    undoing: bool = False


def backfill_parallel(state: StateDirectory, todo: list[DiscoveredVisit],
                      report: BackfillReport, *,
                      workers: int, replace: bool, prepare: Callable[..., Any],
                      butler: str | None, progress: bool, total: int,
                      on_result: Callable[[ApplyResult], None] | None = None) -> None:
    """Apply ``todo`` to ``state`` with ``workers`` processes, adding outcomes to ``report``
    (a :class:`streamstars.backfill.BackfillReport`; its ``transfer`` gets the routing cost).

    Raises:
        DiskFullError: a worker found the disk nearly full.
        StateError: a worker died or could not use the state.
        KeyboardInterrupt: Ctrl-C (the workers are stopped).
    """
    start = time.perf_counter()
    with tqdm(total=total, initial=total - len(todo), unit="visit", desc="backfill",
              dynamic_ncols=True, disable=not progress) as bar:
        if not todo:
            return
        driver = _Driver(state, todo, report, workers=workers, replace=replace,
                         spec=WorkerSpec(str(state.path), json.dumps(to_dict(state.config)),
                                         workers, butler, prepare),
                         bar=bar, start=start, on_result=on_result)
        # the workers commit a visit's shards at different moments: a snapshot waits for
        # the end of a parallel backfill (docs/operations.md)
        with state.visit_boundary(exclusive=True):
            driver.run()


class _Driver:
    """The parent process: dispatches visits to readers, keeps the index, counts."""

    def __init__(self, state: StateDirectory, todo: list[DiscoveredVisit],
                 report: BackfillReport, *,
                 workers: int, replace: bool, spec: WorkerSpec, bar: tqdm[Any], start: float,
                 on_result: Callable[[ApplyResult], None] | None) -> None:
        self.state, self.todo, self.report = state, todo, report
        self.n, self.replace, self.bar, self.start = workers, replace, bar, start
        self.on_result = on_result
        self.max_in_flight = 2 * workers + 2
        ctx = multiprocessing.get_context("spawn")
        self.results: Queue[Any] = ctx.Queue()
        self.tasks: list[Queue[Any]] = [ctx.Queue() for _ in range(workers)]
        self.inboxes: list[Queue[Any]] = [ctx.Queue() for _ in range(workers)]
        self.procs: list[BaseProcess] = [
            ctx.Process(target=worker_main, name=f"streamstars-backfill-{w}",
                        args=(spec, w, self.tasks[w], self.inboxes, self.results), daemon=True)
            for w in range(workers)]
        self.in_flight: dict[int, _InFlight] = {}
        self.stopped: set[int] = set()
        self.transfer = report.transfer = TransferStats()

    def owner(self, shard: int) -> int:
        return int(shard_owner(shard, self.n)[0])

    def run(self) -> None:
        for proc in self.procs:
            proc.start()
        try:
            next_task = 0
            while next_task < len(self.todo) or self.in_flight:
                while next_task < len(self.todo) and len(self.in_flight) < self.max_in_flight:
                    visit = self.todo[next_task]
                    self.in_flight[visit.visit] = _InFlight(visit, time.perf_counter())
                    self.tasks[next_task % self.n].put(visit)
                    next_task += 1
                self.handle(self.receive())
            self.shutdown()
        except BaseException:
            self.terminate()
            raise

    def receive(self) -> tuple[Any, ...]:
        while True:
            try:
                return tuple(self.results.get(timeout=_POLL_SECONDS))
            except queue.Empty:
                for w, proc in enumerate(self.procs):
                    if proc.exitcode is not None and w not in self.stopped:
                        try:  # its last words may just be arriving
                            return tuple(self.results.get(timeout=_POLL_SECONDS))
                        except queue.Empty:
                            pass
                        raise StateError(
                            f"backfill worker {w} stopped (exit code {proc.exitcode}) while "
                            f"visits were being applied; nothing is lost: run the backfill "
                            "again to complete them") from None

    def handle(self, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "prepared":
            self.prepared(msg[1])
        elif kind == "failed":
            self.fail(msg[1], msg[2])
        elif kind == "done":
            self.shard_done(msg[1], msg[2], msg[3], msg[4])
        elif kind == "refused":
            flight = self.in_flight[msg[1]]
            flight.waiting.discard(("apply", msg[2]))
            flight.refused = msg[3]
            self.maybe_finish(flight)
        elif kind == "fatal":
            error = {"disk": DiskFullError, "shard": ShardError}.get(msg[1], StateError)
            raise error(msg[2])
        elif kind == "crash":
            raise StateError(f"backfill worker {msg[1]} failed: {msg[2]}")
        elif kind == "stats":
            self.transfer.add(msg[2])
            self.stopped.add(msg[1])

    def prepared(self, header: VisitHeader) -> None:
        flight = self.in_flight[header.visit]
        flight.header = header
        try:
            plan = plan_visit(self.state.index.get(header.visit), header, replace=self.replace)
        except VisitConflictError as exc:
            self.drop(header)
            self.fail(header.visit, str(exc))
            return
        flight.plan = plan
        if plan.status == "skipped" and not plan.follow_files:
            self.drop(header)
            finish_visit(self.state, plan, None)
            self.complete(flight)
            return
        begin_visit(self.state, plan)
        for shard in plan.retract_from:
            flight.waiting.add(("retract", shard))
            self.inboxes[self.owner(shard)].put(("retract", header.visit, shard))
        for shard in plan.shards:
            flight.waiting.add(("apply", shard))
            self.inboxes[self.owner(shard)].put(("apply", header.visit, shard,
                                                 plan.shard_replace))

    def drop(self, header: VisitHeader) -> None:
        """The routed rows of a visit that is not applied are forgotten by their owners."""
        for shard in header.shards:
            self.inboxes[self.owner(shard)].put(("drop", header.visit, shard))

    def shard_done(self, visit: int, what: str, shard: int, summary: dict[str, Any]) -> None:
        flight = self.in_flight[visit]
        flight.waiting.discard((what, shard))
        if what == "apply":
            flight.results.append(summary)
        self.maybe_finish(flight)

    def maybe_finish(self, flight: _InFlight) -> None:
        if flight.waiting:
            return
        assert flight.plan is not None and flight.header is not None
        visit = flight.visit.visit
        if flight.undoing:
            self.state.index.write(lambda tx: tx.delete(visit))
            self.fail(visit, flight.refused or "refused")
            return
        if flight.refused is not None:
            # undo: the visit leaves every shard it may have reached, then the index
            flight.undoing = True
            for shard in sorted({*flight.plan.shards, *flight.plan.retract_from}):
                flight.waiting.add(("retract", shard))
                self.inboxes[self.owner(shard)].put(("retract", visit, shard))
            return
        finish_visit(self.state, flight.plan, None)
        self.complete(flight)

    def complete(self, flight: _InFlight) -> None:
        assert flight.plan is not None and flight.header is not None
        header = flight.header
        result = ApplyResult(
            header.visit, flight.plan.status, header.n_sources, header.n_selected,
            time.perf_counter() - flight.started,
            merge_stats([r["association"] for r in flight.results]),
            sum(r["reference_seconds"] for r in flight.results),
            sum(r["reference_pixels"] for r in flight.results),
            sum(r["reference_stars"] for r in flight.results),
            dict(header.dropped) if flight.plan.status != "skipped" else {})
        del self.in_flight[header.visit]
        self.report.count(result)
        if self.on_result is not None:
            self.on_result(result)
        self.progress()

    def fail(self, visit: int, error: str) -> None:
        self.in_flight.pop(visit, None)
        self.report.failed.append(VisitFailure(visit, error))
        log.error("visit %d failed: %s", visit, error)
        self.progress()

    def progress(self) -> None:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix(visits_s=f"{(self.bar.n + 1) / elapsed:.1f}",
                             sources_s=f"{self.report.sources_read / elapsed:,.0f}",
                             failed=len(self.report.failed))
        self.bar.update(1)

    def shutdown(self) -> None:
        """Every visit is done: stop the workers, collecting their transfer counts."""
        for w in range(self.n):
            self.tasks[w].put(None)
            self.inboxes[w].put(("stop",))
        while len(self.stopped) < self.n:
            self.handle(self.receive())
        for proc in self.procs:
            proc.join(timeout=30)
        self.terminate()

    def terminate(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            proc.join(timeout=10)
        for q in (self.results, *self.tasks, *self.inboxes):
            q.cancel_join_thread()
            q.close()


# ---------------------------------------------------------------------------------------------
# worker processes
# ---------------------------------------------------------------------------------------------
def worker_main(spec: WorkerSpec, w: int, tasks: Queue[Any], inboxes: list[Queue[Any]],
                results: Queue[Any]) -> None:
    """A worker process: a reader thread (read, select, route, send) and the owner loop
    (apply the rows of its shards when the driver says so)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver stops the workers on Ctrl-C
    stats = TransferStats()
    try:
        config = config_from_json(spec.config_json)
        with StateDirectory.open(Path(spec.state), config, writer_lock=False) as state:
            references = open_reference_source(config.fgcmLoadReferenceCatalog, spec.butler)
            reader = threading.Thread(
                target=_read_loop, name=f"reader-{w}", daemon=True,
                args=(spec, w, state, tasks, inboxes, results, stats))
            reader.start()
            _owner_loop(state, references, w, inboxes[w], results, stats)
            reader.join()
    except BaseException:  # noqa: BLE001 - reported to the driver, which stops
        results.put(("crash", w, traceback.format_exc(limit=8)))
        return
    stats.cpu_seconds = stats.max_worker_cpu_seconds = time.process_time()
    results.put(("stats", w, dataclasses.asdict(stats)))


def _read_loop(spec: WorkerSpec, w: int, state: StateDirectory, tasks: Queue[Any],
               inboxes: list[Queue[Any]], results: Queue[Any], stats: TransferStats) -> None:
    config = state.config
    while True:
        visit = tasks.get()
        if visit is None:
            return
        try:
            t0 = time.perf_counter()
            prepared = spec.prepare(config, visit)
            t1 = time.perf_counter()
            routed = route_visit(prepared, state.shard_nside, state.shard_margin)
            t2 = time.perf_counter()
            stats.prepare_seconds += t1 - t0
            stats.route_seconds += t2 - t1
            owners = shard_owner(np.asarray(routed.shards, dtype=np.int64), spec.workers)
            for shard, owner in zip(routed.shards, owners.tolist(), strict=True):
                t3 = time.perf_counter()
                data = pickle.dumps(routed.part(shard), protocol=pickle.HIGHEST_PROTOCOL)
                stats.pickle_seconds += time.perf_counter() - t3
                stats.parts += 1
                stats.bytes += len(data)
                inboxes[owner].put(("part", visit.visit, shard, data))
            results.put(("prepared", routed.header()))
        except StreamstarsError as exc:
            results.put(("failed", visit.visit, str(exc)))
        except BaseException:  # noqa: BLE001 - reported to the driver, which stops
            results.put(("crash", w, traceback.format_exc(limit=8)))
            return


def _owner_loop(state: StateDirectory, references: Any, w: int, inbox: Queue[Any],
                results: Queue[Any], stats: TransferStats) -> None:
    parts: dict[tuple[int, int], bytes] = {}
    waiting: dict[tuple[int, int], bool] = {}  # (visit, shard) -> replace, in arrival order
    while True:
        msg = inbox.get()
        kind = msg[0]
        if kind == "stop":
            return
        if kind == "part":
            parts[(msg[1], msg[2])] = msg[3]
        elif kind == "drop":
            parts.pop((msg[1], msg[2]), None)
        elif kind == "retract":
            _retract(state, msg[1], msg[2], results)
        elif kind == "apply":
            waiting[(msg[1], msg[2])] = msg[3]
        for key in [k for k in waiting if k in parts]:
            _apply(state, references, key, waiting.pop(key), parts.pop(key), results, stats)


def _apply(state: StateDirectory, references: Any, key: tuple[int, int], replace: bool,
           data: bytes, results: Queue[Any], stats: TransferStats) -> None:
    visit, shard = key
    t0 = time.perf_counter()
    part = pickle.loads(data)
    t1 = time.perf_counter()
    stats.unpickle_seconds += t1 - t0
    try:
        state.keep_open([shard])
        result = apply_to_store(state.shard_for_write(shard), part, replace=replace,
                                 kafka_offset=None, references=references)
        shard_committed()
    except DiskFullError as exc:
        results.put(("fatal", "disk", str(exc)))
        return
    except ShardError as exc:
        results.put(("fatal", "shard", str(exc)))
        return
    except (PermanentInputError, StateError) as exc:  # the visit fails, as in one process
        results.put(("refused", visit, shard, str(exc)))
        return
    stats.apply_seconds += time.perf_counter() - t1
    results.put(("done", visit, "apply", shard, {
        "association": result.association, "reference_seconds": result.reference_seconds,
        "reference_pixels": result.reference_pixels,
        "reference_stars": result.reference_stars}))


def _retract(state: StateDirectory, visit: int, shard: int, results: Queue[Any]) -> None:
    try:
        if state.has_shard(shard):
            state.keep_open([shard])
            retract_from_store(state.shard_for_write(shard), visit, None)
            shard_committed()
    except DiskFullError as exc:
        results.put(("fatal", "disk", str(exc)))
        return
    except StateError as exc:
        results.put(("fatal", "shard" if isinstance(exc, ShardError) else "state", str(exc)))
        return
    results.put(("done", visit, "retract", shard, {}))
