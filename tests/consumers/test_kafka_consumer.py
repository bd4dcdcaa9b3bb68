"""The nightly consumer against a real Kafka-protocol broker (tansu on 127.0.0.1).

Every consumer runs as a real process (``python -m streamstars.cli run``); crash tests kill it
with SIGKILL.  Catalogs are compared with ``compare_snapshots`` against ``backfill`` of the
same files (timestamps and the Kafka-offset provenance ignored).
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from consumer_helpers import (
    ConsumerProcess,
    applied_visits,
    assert_same_catalogs,
    consumer_args,
    http_get,
    run_cli,
    snapshot_state,
    wait_until,
)
from crash_hooks import hooks_env
from kafka_broker import TansuBroker, free_port

from streamstars.events import VisitEvent, path_to_uri

N_VISITS = 8
SOURCES_PER_VISIT = 2000


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def survey(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A small simulated survey under ``<data>/repo`` (``<data>`` is the data root)."""
    from streamstars.simulate import simulate_survey

    data = tmp_path_factory.mktemp("data")
    return simulate_survey(data / "repo", n_visits=N_VISITS, seed=11,
                           sources_per_visit=SOURCES_PER_VISIT, write_refcat=False)


def _backfill_snapshot(repo: Path, tmp: Path, name: str) -> Path:
    state, out = tmp / f"{name}-state", tmp / f"{name}-snap"
    done = run_cli("backfill", str(repo), "--state", str(state), "--no-progress")
    assert done.returncode in (0, 1), done.stderr
    return snapshot_state(state, out)


@pytest.fixture(scope="module")
def backfill_snapshot(survey: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Snapshot of ``backfill`` over the survey repository: the expected catalogs."""
    return _backfill_snapshot(survey.out_dir, tmp_path_factory.mktemp("backfill"), "ref")


class Consumer(ConsumerProcess):
    """A ``streamstars run`` subprocess."""

    def __init__(self, broker: TansuBroker, topic: str, state: Path, data_root: Path,
                 tmp: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        super().__init__([*consumer_args(broker, topic, state, data_root, tmp), *extra],
                         tmp / f"consumer-{time.monotonic_ns()}.log", env)


def _publish_cli(broker: TansuBroker, repo: Path, topic: str) -> None:
    done = run_cli("publish", str(repo), "--bootstrap-servers", broker.bootstrap, "--topic", topic)
    assert done.returncode == 0, done.stderr
    assert f"published {N_VISITS} visit event(s)" in done.stdout


def _repo_events(repo: Path) -> dict[int, VisitEvent]:
    from streamstars.consumers.publisher import events_for_inventory
    from streamstars.io.discover import discover_repo

    events, skipped = events_for_inventory(discover_repo(repo))
    assert not skipped
    return {e.visit: e for e in events}


def _topic_with_every_visit(broker: TansuBroker, repo: Path, topic: str) -> None:
    """A one-partition topic holding the event of every visit of ``repo``."""
    broker.create_topic(topic, partitions=1)
    events = list(_repo_events(repo).values())
    broker.produce(topic, [(e.key, e.to_json()) for e in events])


# ------------------------------------------------------------------------------ tests
def test_publish_consume_equals_backfill_metrics_and_sigterm(
    broker: TansuBroker, survey: Any, backfill_snapshot: Path, tmp_path: Path
) -> None:
    """Publish the survey, consume, snapshot on exit: same catalogs as backfill; SIGTERM."""
    topic = "visits-e2e"
    broker.create_topic(topic, partitions=2)
    _publish_cli(broker, survey.out_dir, topic)
    state, snap, port = tmp_path / "state", tmp_path / "snap", free_port()
    consumer = Consumer(broker, topic, state, survey.out_dir.parent, tmp_path,
                        "--metrics-port", str(port), "--snapshot-dir", str(snap),
                        "--snapshot-every-visits", "100", "--snapshot-on-exit")
    try:
        wait_until(lambda: len(applied_visits(state)) == N_VISITS, 60, "all visits applied")
        assert http_get(port, "/healthz")[0] == 200
        wait_until(lambda: http_get(port, "/readyz")[0] == 200, 10, "readyz")
        wait_until(lambda: f'streamstars_visits_applied_total{{action="apply"}} {N_VISITS}.0'
                   in http_get(port, "/metrics")[1], 10, "applied metric")
        metrics = http_get(port, "/metrics")[1]
        for name in ("streamstars_sources_read_total", "streamstars_observations_selected_total",
                     "streamstars_visit_apply_seconds_bucket", "streamstars_consumer_lag",
                     "streamstars_snapshot_age_seconds", "streamstars_stars",
                     "streamstars_margin_violations", "streamstars_visits_skipped_total",
                     "streamstars_visits_dead_lettered_total",
                     "streamstars_snapshot_seconds"):
            assert name in metrics, name
        sources = sum(survey.n_sources_per_visit)
        assert f"streamstars_sources_read_total {float(sources)}" in metrics
        # the backlog was there before the consumer: visits were read while others applied
        read_ahead = [line for line in metrics.splitlines()
                      if line.startswith('streamstars_visits_read_ahead_total{outcome="used"}')]
        assert read_ahead and float(read_ahead[0].split()[-1]) >= 1, metrics
    finally:
        consumer.proc.send_signal(signal.SIGTERM)
    assert consumer.wait(60) == 0, consumer.text()
    log = consumer.text()
    assert "SIGTERM received" in log and "stopped after" in log
    assert_same_catalogs(snap, backfill_snapshot)
    assert_same_catalogs(snapshot_state(state, tmp_path / "snap2"), backfill_snapshot)


KILL_PLAN: list[str] = [
    "before_apply:1",
    "during_apply:1:20",
    "lmdb_commit:1",
    "after_lmdb_commit:1",
    "after_kafka_commit:1",
    "lmdb_commit:2",
    "during_apply:2:5",
    "after_lmdb_commit:2",
    "external",
    "lmdb_commit:1",
    "external",
    "after_lmdb_commit:1",
    "during_apply:1:1",
    "external",
]


def test_sigkill_crash_loop_exactly_once(
    broker: TansuBroker, survey: Any, backfill_snapshot: Path, tmp_path: Path
) -> None:
    """>= 10 SIGKILLs at named points (in the LMDB commit, between LMDB and Kafka commits,
    ...) and at random moments; restart each time; catalogs equal backfill, one application
    per visit."""
    rng = random.Random(4)
    topic = "visits-crash"
    broker.create_topic(topic, partitions=2)
    events = _repo_events(survey.out_dir)
    # Every visit three times (duplicates exercise the commit points after the visits exist).
    messages = [(e.key, e.to_json()) for _ in range(3) for e in events.values()]
    broker.produce(topic, messages)
    state, app_log = tmp_path / "state", tmp_path / "applications.jsonl"
    kills = 0
    killed_at: list[str] = []
    for plan in KILL_PLAN:
        env = hooks_env(app_log, kill=None if plan == "external" else plan)
        consumer = Consumer(broker, topic, state, survey.out_dir.parent, tmp_path,
                            "--exit-when-idle", "2", env=env)
        if plan == "external":
            time.sleep(rng.uniform(1.0, 2.5))
            if consumer.proc.poll() is None:
                consumer.kill()
                kills += 1
                with open(app_log, "a") as fh:
                    fh.write(json.dumps({"kill": "external", "visit": None}) + "\n")
            continue
        code = consumer.wait(60)
        if code == -signal.SIGKILL:
            kills += 1
            killed_at.append(plan)
        else:
            assert code == 0, consumer.text()
    print(f"{kills} SIGKILLs; self-kills at {killed_at}")
    assert kills >= 10, f"only {kills} kills happened"
    # Drain what is left, cleanly.
    final = Consumer(broker, topic, state, survey.out_dir.parent, tmp_path,
                     "--exit-when-idle", "2",
                     env=hooks_env(app_log))
    assert final.wait(90) == 0, final.text()

    assert sorted(applied_visits(state)) == sorted(events)
    assert_same_catalogs(snapshot_state(state, tmp_path / "snap"), backfill_snapshot)

    lines = [json.loads(line) for line in app_log.read_text().splitlines()]
    applications = Counter(r["visit"] for r in lines if r.get("status") == "applied")
    assert max(applications.values()) == 1, applications
    # A visit whose LMDB commit completed just before a kill has no log line: only visits
    # in flight at a kill may lack one.
    missing = set(events) - set(applications)
    in_flight = {r["visit"] for r in lines if "kill" in r}
    external = sum(1 for r in lines if r.get("kill") == "external")
    assert len(missing - in_flight) <= external, (missing, in_flight)


def _write_event(event: VisitEvent, **changes: Any) -> bytes:
    data = event.to_dict()
    data.update(changes)
    return json.dumps(data).encode()


def test_bad_events_dead_letters_and_event_semantics(
    broker: TansuBroker, survey: Any, tmp_path: Path
) -> None:
    """Malformed event, missing file, corrupt parquet, path outside the data roots: dead
    letters, the rest goes on; duplicates, out-of-order, replace and retract are applied."""
    import pyarrow.parquet as pq

    topic, dlq = "visits-bad", "visits-bad.dead-letters"
    broker.create_topic(topic, partitions=1)
    broker.create_topic(dlq, partitions=1)
    repo = survey.out_dir
    events = _repo_events(repo)
    visits = sorted(events)
    data_root = tmp_path / "data"
    shutil.copytree(repo, data_root / "repo")
    local = {v: _repo_events(data_root / "repo")[v] for v in visits}
    # Corrupt parquet: a truncated copy of a source table.
    bad_dir = data_root / "bad"
    bad_dir.mkdir()
    src0 = Path(survey.source_paths[0])
    corrupt = bad_dir / "sourceTable_visit_corrupt.parquet"
    corrupt.write_bytes(src0.read_bytes()[: src0.stat().st_size // 2])
    # Outside the data root.
    outside = tmp_path / "outside.parquet"
    shutil.copy(src0, outside)
    # Replacement data for the visit to replace: drop every other row.
    v_replace, v_retract = visits[1], visits[2]
    replace_path = data_root / "replace" / f"sourceTable_visit_{v_replace}.parquet"
    replace_path.parent.mkdir()
    orig = data_root / "repo" / Path(local[v_replace].source_uris[0][len("file://"):]).name
    table = pq.read_table(orig)
    pq.write_table(table.take(list(range(0, table.num_rows, 2))), replace_path)

    first = local[visits[0]]
    messages: list[tuple[bytes | None, bytes | None]] = [
        (b"1", b"{this is not json"),
        (first.key, _write_event(first, source_uris=[str(outside)])),
        (first.key, _write_event(first, source_uris=[str(data_root / "repo" / "nope.parquet")])),
        (first.key, _write_event(first, source_uris=[path_to_uri(corrupt)])),
        (first.key, _write_event(first, source_uris=["s3://bucket/x.parquet"])),
    ]
    # Out of order (reverse), with duplicates.
    for v in reversed(visits):
        messages.append((local[v].key, local[v].to_json()))
    messages.append((local[visits[3]].key, local[visits[3]].to_json()))
    messages.append((local[visits[0]].key, local[visits[0]].to_json()))
    # Replace one visit with new data, retract another (twice: second is a no-op).
    messages.append((local[v_replace].key,
                     _write_event(local[v_replace], action="replace",
                                  source_uris=[path_to_uri(replace_path)])))
    retract = json.dumps({"schema_version": 1, "action": "retract", "visit": v_retract}).encode()
    messages += [(str(v_retract).encode(), retract), (str(v_retract).encode(), retract)]
    broker.produce(topic, messages)

    state = tmp_path / "state"
    consumer = Consumer(broker, topic, state, data_root, tmp_path, "--exit-when-idle", "2",
                        "--retry-max-seconds", "1.5", "--dead-letter-topic", dlq)
    assert consumer.wait(120) == 0, consumer.text()
    log = consumer.text()
    assert "transient error" in log  # the missing file was retried before dead-lettering

    applied = applied_visits(state)
    assert sorted(applied) == sorted(v for v in visits if v != v_retract)

    letters = [json.loads(m.value()) for m in broker.consume_all(dlq, 5, timeout=20)]
    reasons = sorted(r["error"]["reason"] for r in letters)
    assert reasons == sorted(["malformed_event", "forbidden_path", "transient_exhausted",
                              "invalid_input", "forbidden_path"]), letters
    assert all(r["source"]["topic"] == topic and r["dead_lettered_at"] for r in letters)
    assert letters[0]["event_text"] == "{this is not json"
    assert letters[1]["visit"] == visits[0] and "outside the data roots" in \
        letters[1]["error"]["message"]

    # Expected: backfill of the final set of files (replaced visit with its new table).
    expected_repo = tmp_path / "expected"
    shutil.copytree(data_root / "repo", expected_repo)
    (expected_repo / orig.name).unlink()
    shutil.copy(replace_path, expected_repo / replace_path.name)
    retracted = Path(local[v_retract].source_uris[0][len("file://"):]).name
    (expected_repo / retracted).unlink()
    expected = _backfill_snapshot(expected_repo, tmp_path, "expected")
    assert_same_catalogs(snapshot_state(state, tmp_path / "snap"), expected)


def test_broker_restart_consumer_reconnects(
    broker: TansuBroker, survey: Any, backfill_snapshot: Path, tmp_path: Path
) -> None:
    """The broker restarts (losing its in-memory topics) while the consumer runs."""
    topic = "visits-restart"
    broker.create_topic(topic, partitions=1)
    events = list(_repo_events(survey.out_dir).values())
    broker.produce(topic, [(e.key, e.to_json()) for e in events[:4]])
    state = tmp_path / "state"
    consumer = Consumer(broker, topic, state, survey.out_dir.parent, tmp_path)
    try:
        wait_until(lambda: len(applied_visits(state)) == 4, 60, "first half applied")
        broker.restart(down_seconds=1.0)
        broker.create_topic(topic, partitions=1)
        broker.produce(topic, [(e.key, e.to_json()) for e in events])
        wait_until(lambda: len(applied_visits(state)) == N_VISITS, 90,
                   "second half applied after restart")
    finally:
        consumer.proc.send_signal(signal.SIGTERM)
    assert consumer.wait(60) == 0, consumer.text()
    assert_same_catalogs(snapshot_state(state, tmp_path / "snap"), backfill_snapshot)


def test_replay_from_offset_skips_duplicates(
    broker: TansuBroker, survey: Any, tmp_path: Path
) -> None:
    """``--seek-offset`` replays a partition; visits already stored are counted no-ops."""
    topic = "visits-replay"
    _topic_with_every_visit(broker, survey.out_dir, topic)
    state = tmp_path / "state"
    first = Consumer(broker, topic, state, survey.out_dir.parent, tmp_path,
                     "--exit-when-idle", "1.5")
    assert first.wait(60) == 0, first.text()
    assert len(applied_visits(state)) == N_VISITS
    replay = Consumer(broker, topic, state, survey.out_dir.parent, tmp_path,
                      "--exit-when-idle", "1.5", "--seek-offset", "0:2")
    assert replay.wait(60) == 0, replay.text()
    log = replay.text()
    assert "replay: visits-replay[0] from offset 2" in log
    assert log.count(": skipped (") == N_VISITS - 2 and ": applied (" not in log


def test_full_disk_stops_the_consumer_without_committing(
    broker: TansuBroker, survey: Any, backfill_snapshot: Path, tmp_path: Path
) -> None:
    """Below ``STREAMSTARS_MIN_FREE_DISK_MB`` free on the store's disk the consumer stops with
    exit code 3 before writing anything (writers write through the map, where a full disk
    would be a SIGBUS); once space is freed it consumes every visit from the start."""
    topic = "visits-diskfull"
    _topic_with_every_visit(broker, survey.out_dir, topic)
    state = tmp_path / "state"
    full = Consumer(broker, topic, state, survey.out_dir.parent, tmp_path,
                    "--exit-when-idle", "1.5", env={"STREAMSTARS_MIN_FREE_DISK_MB": str(1 << 40)})
    assert full.wait(60) == 3, full.text()
    assert "nearly full" in full.text()
    assert applied_visits(state) == {}
    freed = Consumer(broker, topic, state, survey.out_dir.parent, tmp_path,
                     "--exit-when-idle", "1.5")
    assert freed.wait(90) == 0, freed.text()
    assert len(applied_visits(state)) == N_VISITS
    assert_same_catalogs(snapshot_state(state, tmp_path / "snap"), backfill_snapshot)


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_warm_query_cache_when_idle_after_applying(broker: TansuBroker, survey: Any,
                                                   tmp_path: Path) -> None:
    """``run --warm-query-cache``: once no message arrived for a second after applying, the
    consumer derives the queries' density cuts (log line, metrics); the first cone afterwards
    derives nothing."""
    from streamstars.queries import cone_query
    from streamstars.state import StateDirectory

    topic = "visits-warm"
    _topic_with_every_visit(broker, survey.out_dir, topic)
    state, port = tmp_path / "state", free_port()
    consumer = Consumer(broker, topic, state, survey.out_dir.parent, tmp_path,
                        "--metrics-port", str(port), "--warm-query-cache")
    try:
        wait_until(lambda: len(applied_visits(state)) == N_VISITS, 60, "all visits applied")
        wait_until(lambda: "query cache warmed: " in consumer.text(), 60, "warm-up logged")
        metrics = http_get(port, "/metrics")[1]
    finally:
        consumer.proc.send_signal(signal.SIGTERM)
    assert consumer.wait(60) == 0, consumer.text()
    assert _metric(metrics, "streamstars_query_cache_warm_pixels_total") > 0, metrics
    assert _metric(metrics, "streamstars_query_cache_warm_seconds_total") > 0, metrics
    with StateDirectory.open(state, readonly=True) as opened:
        result = cone_query(opened, 150.0, 2.0, 600.0)
    assert len(result.stars.star_id) > 0
    assert result.density_pixels_derived == 0 and result.density_pixels_cached > 0
