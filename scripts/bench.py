#!/usr/bin/env python
"""streamstars benchmark: backfill throughput and latency, snapshot, memory, vs floor and batch.

Usage:
    python scripts/bench.py [--visits 200] [--sources-per-visit 50000] [--small-visits 20]
                            [--workdir bench-work] [--json results.json]

It simulates a survey once (reused when ``--workdir`` already holds one with the same
parameters), then runs each measurement in its own subprocess so peak RSS is per measurement:

* floor: the time merely to read the needed columns of every source table (pyarrow, column
  projection) — nothing can be faster than this;
* backfill of the first ``--small-visits`` visits and of all visits into fresh stores:
  wall time, sources read/s, selected observations/s, per-visit apply latency (first 10 and
  last 10 visits), peak RSS;
* snapshot of the full store: time and peak RSS;
* the batch reference of the tests (tests/batch_reference.py) on the same observations
  (read + select + one in-memory batch association): time and peak RSS.
Prints numbers and the target ratios; never asserts.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _inventory(repo: Path, n_visits: int):  # type: ignore[no-untyped-def]
    from streamstars.io.discover import discover_repo

    inventory = discover_repo(repo)
    keep = sorted(inventory.visits)[:n_visits]
    inventory.visits = {v: inventory.visits[v] for v in keep}
    return inventory


# --------------------------------------------------------------------------- measurements
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


def measure_backfill(repo: Path, n_visits: int, state: Path) -> dict[str, object]:
    """Backfill the first ``n_visits`` visits into a fresh store."""
    from streamstars.state.store import StarStore

    from streamstars.backfill import backfill
    from streamstars.config import BuildStarsConfig

    shutil.rmtree(state, ignore_errors=True)
    inventory = _inventory(repo, n_visits)
    with StarStore.open(state, BuildStarsConfig()) as store:
        report = backfill(repo, store, inventory=inventory, progress=False)
    latencies = [seconds for _, seconds in report.apply_seconds]
    return {
        "seconds": report.seconds,
        "visits": report.applied,
        "failed": len(report.failed),
        "sources": report.sources_read,
        "observations": report.observations_selected,
        "apply_first10_ms": 1e3 * sum(latencies[:10]) / max(len(latencies[:10]), 1),
        "apply_last10_ms": 1e3 * sum(latencies[-10:]) / max(len(latencies[-10:]), 1),
        "apply_median_ms": 1e3 * sorted(latencies)[len(latencies) // 2] if latencies else 0.0,
        "store_mb": sum(f.stat().st_size for f in state.iterdir()) / 1e6,
        "peak_rss_mb": _peak_rss_mb(),
    }


def measure_snapshot(state: Path, out: Path) -> dict[str, float]:
    """Snapshot a store (FITS + parquet)."""
    from streamstars.state.store import StarStore

    from streamstars.snapshot import write_store_snapshot

    with StarStore.open(state, readonly=True) as store:
        summary = write_store_snapshot(store, out)
    return {"seconds": summary.seconds, "stars": summary.n_stars,
            "observations": summary.n_observations, "peak_rss_mb": _peak_rss_mb()}


def measure_batch(repo: Path, n_visits: int) -> dict[str, float]:
    """The tests' batch reference on the same observations: read + select + associate."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    import numpy as np
    from batch_reference import batch_build  # type: ignore[import-not-found]

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


# --------------------------------------------------------------------------- driver
def _run(kind: str, *args: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, __file__, "_measure", kind, *args],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def ensure_survey(workdir: Path, visits: int, sources: int, seed: int) -> Path:
    """Simulate the survey unless the same one is already there."""
    from streamstars.simulate import simulate_survey

    repo = workdir / "repo"
    stamp = workdir / "survey.json"
    wanted = {"visits": visits, "sources_per_visit": sources, "seed": seed}
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return repo
    shutil.rmtree(repo, ignore_errors=True)
    start = time.perf_counter()
    simulate_survey(repo, n_visits=visits, seed=seed, sources_per_visit=sources)
    print(f"simulated {visits} visits x {sources} sources in {time.perf_counter() - start:.1f} s")
    stamp.write_text(json.dumps(wanted))
    return repo


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "_measure":
        kind, rest = sys.argv[2], sys.argv[3:]
        funcs = {"floor": lambda: measure_floor(Path(rest[0]), int(rest[1])),
                 "backfill": lambda: measure_backfill(Path(rest[0]), int(rest[1]),
                                                      Path(rest[2])),
                 "snapshot": lambda: measure_snapshot(Path(rest[0]), Path(rest[1])),
                 "batch": lambda: measure_batch(Path(rest[0]), int(rest[1]))}
        print(json.dumps(funcs[kind]()))
        return 0

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--visits", type=int, default=200)
    parser.add_argument("--small-visits", type=int, default=20)
    parser.add_argument("--sources-per-visit", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--workdir", default="bench-work")
    parser.add_argument("--skip-batch", action="store_true", help="skip the batch reference")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    repo = ensure_survey(workdir, args.visits, args.sources_per_visit, args.seed)
    n, small = str(args.visits), str(args.small_visits)
    results: dict[str, dict[str, object]] = {}
    results["floor"] = _run("floor", str(repo), n)
    results["backfill_small"] = _run("backfill", str(repo), small, str(workdir / "state-small"))
    results["backfill"] = _run("backfill", str(repo), n, str(workdir / "state"))
    results["snapshot"] = _run("snapshot", str(workdir / "state"), str(workdir / "snapshot"))
    if not args.skip_batch:
        results["batch"] = _run("batch", str(repo), n)
    report(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def report(results: dict[str, dict[str, object]], args: argparse.Namespace) -> None:
    """Print the numbers and the target ratios."""
    def f(section: str, key: str) -> float:
        return float(results[section][key])  # type: ignore[arg-type]

    back = results["backfill"]
    print(f"\n== streamstars benchmark: {args.visits} visits x ~{args.sources_per_visit} "
          "sources ==")
    print(f"floor (read needed columns) : {f('floor', 'seconds'):8.1f} s  "
          f"{f('floor', 'rows') / f('floor', 'seconds'):12,.0f} rows/s")
    print(f"backfill                    : {f('backfill', 'seconds'):8.1f} s  "
          f"{f('backfill', 'sources') / f('backfill', 'seconds'):12,.0f} sources/s  "
          f"{f('backfill', 'observations') / f('backfill', 'seconds'):10,.0f} selected obs/s")
    print(f"  visits applied / failed   : {back['visits']} / {back['failed']}")
    print(f"  apply latency first 10    : {f('backfill', 'apply_first10_ms'):8.1f} ms/visit")
    print(f"  apply latency last 10     : {f('backfill', 'apply_last10_ms'):8.1f} ms/visit")
    print(f"  store size                : {f('backfill', 'store_mb'):8.0f} MB")
    print(f"  peak RSS ({args.small_visits} / {args.visits} visits) : "
          f"{f('backfill_small', 'peak_rss_mb'):6.0f} / {f('backfill', 'peak_rss_mb'):6.0f} MB")
    print(f"snapshot                    : {f('snapshot', 'seconds'):8.1f} s  "
          f"{results['snapshot']['stars']:,} stars, {results['snapshot']['observations']:,} obs, "
          f"peak RSS {f('snapshot', 'peak_rss_mb'):.0f} MB")
    if "batch" in results:
        print(f"batch reference             : {f('batch', 'seconds'):8.1f} s  "
              f"(read+select {f('batch', 'read_select_seconds'):.1f} s), "
              f"{results['batch']['stars']:,} stars, peak RSS {f('batch', 'peak_rss_mb'):.0f} MB")
    print("\n-- targets --")
    print(f"backfill / floor            : {f('backfill', 'seconds') / f('floor', 'seconds'):6.2f}"
          "  (target <= 5)")
    print(f"latency last10 / first10    : "
          f"{f('backfill', 'apply_last10_ms') / f('backfill', 'apply_first10_ms'):6.2f}"
          "  (target <= 1.3)")
    print(f"peak RSS {args.visits} / {args.small_visits} visits   : "
          f"{f('backfill', 'peak_rss_mb') / f('backfill_small', 'peak_rss_mb'):6.2f}"
          f"  (target <= 1.2, and < 1024 MB: {f('backfill', 'peak_rss_mb'):.0f} MB)")
    if "batch" in results:
        ratio = f("backfill", "seconds") / f("batch", "seconds")
        print(f"backfill / batch reference  : {ratio:6.2f}  (target <= 1)")


if __name__ == "__main__":
    sys.exit(main())
