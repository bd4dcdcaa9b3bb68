"""Consumers in a group applying shard events (schema version 3) to their own state
directories: ``streamstars run --group G --state DIR``, ``streamstars snapshot OUT --state A
--state B``.  Real tansu broker, real consumer processes, SIGKILL."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from consumer_helpers import (
    SNAPSHOT_IGNORE,
    GroupConsumer,
    applications,
    assert_same_catalogs,
    backfill_catalogs,
    group_survey,
    run_cli,
    shard_config_file,
    snapshot_state,
    snapshot_states,
    wait_until,
)
from crash_hooks import hooks_env
from kafka_broker import TansuBroker, write_kafka_config

from streamstars.consumers.partitioner import shard_partition
from streamstars.consumers.publisher import ShardRouting, publish_repo
from streamstars.footprint import ShardSpec
from streamstars.simulate import SimulatedSurvey
from streamstars.state import StateDirectory

#: shards of ~0.9 deg: every visit of the 1-degree simulated field touches several
NSIDE = 64
N_VISITS = 6


@pytest.fixture(scope="module")
def survey(tmp_path_factory: pytest.TempPathFactory) -> SimulatedSurvey:
    return group_survey(tmp_path_factory, N_VISITS)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shard_config_file(tmp_path_factory, NSIDE)


@pytest.fixture(scope="module")
def backfill_snapshot(survey: SimulatedSurvey, config_file: Path,
                      tmp_path_factory: pytest.TempPathFactory) -> Path:
    return backfill_catalogs(survey, config_file, tmp_path_factory)


def _publish(broker: TansuBroker, survey: SimulatedSurvey, topic: str) -> dict[int, list[int]]:
    """Publish the survey by shard on the 2-partition ``topic``; visit -> footprint."""
    summary = publish_repo(survey.out_dir, broker.bootstrap, topic,
                           routing=ShardRouting(ShardSpec.of_config(_config()), partitions=2))
    assert len(summary.published) == N_VISITS
    return {v: list(f.shards) for v, f in summary.footprints.items()}


def _config() -> Any:
    from streamstars.config import BuildStarsConfig

    return BuildStarsConfig(shardNside=NSIDE)


def _start_pair(broker: TansuBroker, survey: SimulatedSurvey, config_file: Path, tmp: Path,
                topic: str, a_env: dict[str, str], b_env: dict[str, str],
                extra: tuple[str, ...] = ()) -> tuple[GroupConsumer, GroupConsumer]:
    """Two consumers of one group on an empty 2-partition topic, each assigned one partition
    before anything is published (so no rebalance moves a partition mid-stream); ``extra``:
    more ``streamstars run`` arguments for both."""
    broker.create_topic(topic, partitions=2)
    broker.create_topic(f"{topic}.dead-letters", partitions=1)
    a = GroupConsumer(broker, topic, f"g-{topic}", tmp / "A", survey, config_file, tmp,
                      "--exit-when-idle", "12", *extra, env=a_env)
    b = GroupConsumer(broker, topic, f"g-{topic}", tmp / "B", survey, config_file, tmp,
                      "--exit-when-idle", "12", *extra, env=b_env)
    wait_until(lambda: a.assigned() and b.assigned(), 60, "both consumers assigned")
    # the first consumer may have been given both partitions before the other joined: let
    # the group settle (a join completes within ~session.timeout.ms with tansu)
    wait_until(lambda: a.settled() and b.settled(), 60, "one partition each")
    return a, b


def test_two_consumers_share_the_partitions_and_their_states_make_the_backfill(
        broker: TansuBroker, survey: SimulatedSurvey, config_file: Path,
        backfill_snapshot: Path, tmp_path: Path) -> None:
    """Two consumers in one group: every (visit, shard) applied by the group, never twice in
    one state, in one transaction of the shard with its partition's offset;
    ``snapshot --state A --state B`` equals the backfill."""
    topic = "group-pair"
    a_log, b_log = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a, b = _start_pair(broker, survey, config_file, tmp_path, topic, hooks_env(a_log),
                       hooks_env(b_log))
    footprints = _publish(broker, survey, topic)
    assert a.wait(180) == 0, a.text()
    assert b.wait(180) == 0, b.text()

    expected = {(v, s) for v, shards in footprints.items() for s in shards}
    by_partition = {shard_partition(NSIDE, s, 2) for _, s in expected}
    assert by_partition == {0, 1}, "the survey's shards use both partitions"
    union: set[tuple[int, int]] = set()
    for consumer, log in ((a, a_log), (b, b_log)):
        # a partition may move once after publication (the group settling): it is then
        # replayed by its new owner, but within one state nothing is ever applied twice
        applied = Counter((r["visit"], r["shard"]) for r in applications(log)
                          if r["status"] == "applied")
        assert not applied or max(applied.values()) == 1, applied
        union |= set(applied)
        with StateDirectory.open(consumer.state, readonly=True) as state:
            offsets = state.shard_offsets(topic)
            for _, pixel in state.shards():
                partition = shard_partition(NSIDE, pixel, 2)
                assert set(offsets[pixel]) == {partition}
                with state.open_shard(pixel).read() as tx:
                    for record in tx.visits.records():
                        assert pixel in footprints[record.visit]
                        # the visit's offset was written in the shard's own transaction
                        assert record.kafka is not None and record.kafka[:2] == [topic,
                                                                                  partition]
    assert union == expected  # every (visit, shard) applied by the group

    assert_same_catalogs(snapshot_states(tmp_path / "snap", a.state, b.state),
                         backfill_snapshot)


def test_two_consumers_complete_one_shared_snapshot_equal_to_the_backfill(
        broker: TansuBroker, survey: SimulatedSurvey, config_file: Path,
        backfill_snapshot: Path, tmp_path: Path) -> None:
    """Two consumers with one shared ``--snapshot-dir SHARED --snapshot-shared`` drain the
    backlog: each writes the partitions of its own shards into SHARED (periodically and at
    exit) and completes ``SHARED/snapshot``, which equals ``backfill`` + ``snapshot`` of the
    repository in its data; every shard has one entry, written by the consumer whose state
    holds it at the partition's end; ``snapshot OUT --from-partitions SHARED`` writes the same
    snapshot."""
    from streamstars.io.snapshot_files import compare_snapshots
    from streamstars.shared_snapshot import read_entries

    topic = "group-shared"
    shared = tmp_path / "shared"
    a, b = _start_pair(broker, survey, config_file, tmp_path, topic, {}, {},
                       ("--snapshot-dir", str(shared), "--snapshot-shared",
                        "--snapshot-every-visits", "3", "--snapshot-on-exit"))
    footprints = _publish(broker, survey, topic)
    assert a.wait(180) == 0, a.text()
    assert b.wait(180) == 0, b.text()

    completed = shared / "snapshot"
    # the partition counts say what was new since the previous completion, not what exists
    ignore = {"ignore_metadata_keys": SNAPSHOT_IGNORE,
              "ignore_manifest_keys": ("shards", "partitions")}
    diffs = compare_snapshots(completed, backfill_snapshot, **ignore)  # type: ignore[arg-type]
    assert not diffs, diffs[:3]
    entries = read_entries(shared)
    assert {int(name.split("/")[1]) for name in entries} == \
        {s for shards in footprints.values() for s in shards}
    manifest = json.loads((completed / "SNAPSHOT.json").read_text())
    assert {n: e["token"] for n, e in manifest["shards"].items()} == \
        {n: e.token for n, e in entries.items()}, "completed from the newest entries"
    with StateDirectory.open(a.state, readonly=True) as sa, \
            StateDirectory.open(b.state, readonly=True) as sb:
        holders = {p: state for state in (sa, sb) for _, p in state.shards()
                   if p not in state.revoked_shards()}
        for name, entry in entries.items():
            pixel = int(name.split("/")[1])
            with holders[pixel].open_shard(pixel).read() as tx:
                mine = {f"{t}/{p}": o for t, p, o in tx.offsets.items()}
            assert entry.offsets == mine, name  # at the partition's end
    assert "shared snapshot" in a.text() and "shared snapshot" in b.text()
    assert not [p.name for p in shared.iterdir() if p.name.startswith(".")], "leftovers"

    done = run_cli("snapshot", str(tmp_path / "cli"), "--from-partitions", str(shared))
    assert done.returncode == 0, done.stderr
    diffs = compare_snapshots(tmp_path / "cli", backfill_snapshot, **ignore)  # type: ignore[arg-type]
    assert not diffs, diffs[:3]


def test_a_killed_consumers_partitions_are_replayed_by_the_survivor(
        broker: TansuBroker, survey: SimulatedSurvey, config_file: Path,
        backfill_snapshot: Path, tmp_path: Path) -> None:
    """A is SIGKILLed mid-stream; B is assigned A's partition (rebalance) and replays it from
    its beginning into its own shards: B's state alone makes the backfill's catalogs, and so
    do A's stale state and B's together (each shard from the copy at the highest offset)."""
    topic = "group-kill"
    a_log, b_log = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a, b = _start_pair(broker, survey, config_file, tmp_path, topic,
                       hooks_env(a_log, kill="before_apply:5"), hooks_env(b_log))
    footprints = _publish(broker, survey, topic)
    assert a.wait(120) == -signal.SIGKILL, a.text()
    assert b.wait(240) == 0, b.text()
    assert b.text().count("assigned ") >= 2, b.text()  # the rebalance after A's death

    with StateDirectory.open(a.state, readonly=True) as state:
        (a_partition,) = {shard_partition(NSIDE, p, 2) for _, p in state.shards()}
    expected = {(v, s) for v, shards in footprints.items() for s in shards}
    replayed = {(r["visit"], r["shard"]) for r in applications(b_log)
                if r["status"] == "applied"}
    assert replayed == expected  # B applied every shard event, A's partition from its start
    a_applied = {(r["visit"], r["shard"]) for r in applications(a_log)
                 if r.get("status") == "applied"}
    assert a_applied and all(shard_partition(NSIDE, s, 2) == a_partition
                             for _, s in a_applied)

    assert_same_catalogs(snapshot_state(b.state, tmp_path / "snap-b"), backfill_snapshot)
    assert_same_catalogs(snapshot_states(tmp_path / "snap-ab", a.state, b.state),
                         backfill_snapshot)


def test_a_footprint_missing_a_shard_is_dead_lettered(
        broker: TansuBroker, survey: SimulatedSurvey, config_file: Path,
        tmp_path: Path) -> None:
    """An event whose ``shards`` lack a shard its visit's rows route to is dead-lettered as
    ``footprint_missed_shard`` naming the shard, and applied nowhere; the events of another
    visit behind it are applied."""
    topic, dlq = "group-missed", "group-missed.dead-letters"
    broker.create_topic(topic, partitions=1)
    broker.create_topic(dlq, partitions=1)
    from streamstars.consumers.publisher import events_for_inventory
    from streamstars.io.discover import discover_repo
    from streamstars.shards import home_shard

    footprints = _publish(broker, survey, "group-missed-footprints")
    inventory = discover_repo(survey.out_dir)
    events, _ = events_for_inventory(inventory)
    bad, good = events[0], events[1]
    meta = inventory.visits[bad.visit].metadata
    home = home_shard(meta.telra, meta.teldec, NSIDE)  # always stores the visit
    cut = [s for s in footprints[bad.visit] if s != home]
    messages = [(e.key, e.to_json()) for e in
                [bad.for_shard(NSIDE, s, cut) for s in cut]
                + [good.for_shard(NSIDE, s, footprints[good.visit])
                   for s in footprints[good.visit]]]
    broker.produce(topic, messages)
    consumer = GroupConsumer(broker, topic, "g-missed", tmp_path / "state", survey,
                             config_file, tmp_path, "--exit-when-idle", "3")
    assert consumer.wait(180) == 0, consumer.text()
    letters = [json.loads(m.value()) for m in broker.consume_all(dlq, len(cut) + 1, timeout=20)]
    assert len(letters) == len(cut)
    missing = f"{NSIDE}/{home}"
    assert all(r["error"]["reason"] == "footprint_missed_shard" and
               f"footprint missed shard {missing}" in r["error"]["message"] for r in letters)
    with StateDirectory.open(consumer.state, readonly=True) as state:
        assert sorted(state.applied_visits()) == [good.visit]
        for _, pixel in state.shards():
            with state.open_shard(pixel).read() as tx:
                assert [r.visit for r in tx.visits.records()] == [good.visit]
        # the dead letters advanced the partition's watermark past them
        assert state.stored_offsets(topic) == {0: len(messages)}


def _static_group_settles(broker: TansuBroker, topic: str) -> str | None:
    """Whether the broker keeps a group of two static members (``group.instance.id``)
    stable: two bare librdkafka consumers join; None when each is assigned a partition and
    nothing is revoked for 10 s after, else what happened instead."""
    from confluent_kafka import Consumer
    from kafka_broker import FAST_CONSUMER_CONFIG

    events: list[tuple[str, str]] = []
    consumers = []
    for name in ("probe-a", "probe-b"):
        c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": f"probe-{topic}",
                      "group.instance.id": name, "enable.auto.commit": False,
                      **FAST_CONSUMER_CONFIG})
        c.subscribe([topic],
                    on_assign=lambda _c, ps, n=name: events.append((n, "assign")),  # type: ignore[misc]
                    on_revoke=lambda _c, ps, n=name: events.append((n, "revoke")))  # type: ignore[misc]
        consumers.append(c)
    try:
        deadline, settled_at = time.monotonic() + 40, None
        while time.monotonic() < deadline:
            for c in consumers:
                c.poll(0.05)
            owners = {n for n, _ in events}
            if settled_at is None and owners == {"probe-a", "probe-b"}:
                settled_at, seen = time.monotonic(), len(events)
            if settled_at is not None and time.monotonic() - settled_at > 10:
                return None if len(events) == seen else f"rebalances go on: {events}"
        return f"never settled: {events}"
    finally:
        for c in consumers:
            c.close()


def test_a_static_member_stopped_and_restarted_resumes_where_it_stopped(
        broker: TansuBroker, survey: SimulatedSurvey, config_file: Path,
        backfill_snapshot: Path, tmp_path: Path) -> None:
    """``--group-instance-id X``: SIGTERM mid-backlog, restarted with the same id and state:
    each partition resumes at the state's watermark (not its start), the rest of the backlog
    is applied, nothing is applied twice in the state, and it makes the backfill."""
    topic = "group-static"
    broker.create_topic(topic, partitions=2)
    broker.create_topic(f"{topic}.dead-letters", partitions=1)
    log = tmp_path / "x.jsonl"
    footprints = _publish(broker, survey, topic)
    expected = {(v, s) for v, shards in footprints.items() for s in shards}
    first = GroupConsumer(broker, topic, "g-static", tmp_path / "X", survey, config_file,
                          tmp_path, "--group-instance-id", "X", env=hooks_env(log))
    wait_until(lambda: len(applications(log)) >= 3, 120, "a few shard events applied")
    first.proc.send_signal(signal.SIGTERM)
    assert first.wait(60) == 0, first.text()
    before = [(r["visit"], r["shard"]) for r in applications(log) if r["status"] == "applied"]
    assert 3 <= len(before) < len(expected), "stopped mid-backlog"
    with StateDirectory.open(first.state, readonly=True) as state:
        watermarks = state.stored_offsets(topic)
    assert watermarks and any(o > 0 for o in watermarks.values())

    second = GroupConsumer(broker, topic, "g-static", tmp_path / "X", survey, config_file,
                           tmp_path, "--group-instance-id", "X", "--exit-when-idle", "8",
                           env=hooks_env(log))
    assert second.wait(240) == 0, second.text()
    text = second.text()
    for partition, offset in watermarks.items():
        assert f"assigned {topic}[{partition}]: starting at offset {offset} (from the LMDB " \
               f"store)" in text, text
    applied = Counter((r["visit"], r["shard"]) for r in applications(log)
                      if r["status"] == "applied")
    assert set(applied) == expected and max(applied.values()) == 1, applied
    assert_same_catalogs(snapshot_state(second.state, tmp_path / "snap"), backfill_snapshot)


def test_a_static_member_restarted_keeps_its_partitions_and_the_other_is_not_rebalanced(
        broker: TansuBroker, survey: SimulatedSurvey, config_file: Path,
        tmp_path: Path) -> None:
    """Two static members A and B; B stopped (SIGTERM) and restarted with its id within
    ``session.timeout.ms``: B gets its own partition back at its watermark, and A's partition
    is never revoked (no rebalance moves it)."""
    topic = "group-static-pair"
    broker.create_topic(topic, partitions=2)
    broker.create_topic(f"{topic}.dead-letters", partitions=1)
    problem = _static_group_settles(broker, topic)
    if problem is not None:
        pytest.skip("the broker (tansu; verified with 0.6.0) cannot keep a group of two "
                    "static members (group.instance.id) stable: after each JoinGroup the "
                    "Heartbeat and SyncGroup answer REBALANCE_IN_PROGRESS, so the group "
                    "rebalances every few seconds (librdkafka debug=cgrp; one static member "
                    "is stable) -- " f"{problem[:300]}")
    extra = {"session.timeout.ms": "30000"}  # B comes back well within it
    a = GroupConsumer(broker, topic, "g-static-pair", tmp_path / "A", survey, config_file,
                      tmp_path, "--group-instance-id", "A", "--kafka-config",
                      str(write_kafka_config(tmp_path / "a.properties", extra)))
    b_args = ("--group-instance-id", "B", "--kafka-config",
              str(write_kafka_config(tmp_path / "b.properties", extra)))
    b = GroupConsumer(broker, topic, "g-static-pair", tmp_path / "B", survey, config_file,
                      tmp_path, *b_args)
    try:
        wait_until(lambda: a.settled() and b.settled(), 90, "one partition each")
        _publish(broker, survey, topic)
        a_revocations = a.text().count("partitions revoked")
        b.proc.send_signal(signal.SIGTERM)
        assert b.wait(60) == 0, b.text()
        b2 = GroupConsumer(broker, topic, "g-static-pair", tmp_path / "B", survey,
                           config_file, tmp_path, *b_args, "--exit-when-idle", "8")
        assert b2.wait(240) == 0, b2.text()
        b_partition = [line for line in b.text().splitlines() if "assigned " in line][-1]
        mine = b_partition.split("assigned ", 1)[1].split(":", 1)[0]  # "topic[p]"
        assert f"assigned {mine}: starting at offset" in b2.text(), b2.text()
        assert a.text().count("partitions revoked") == a_revocations, a.text()
    finally:
        a.kill()
        b.kill()
