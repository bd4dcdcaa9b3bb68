"""Shards follow partitions: consumers of a group back their shards up
(``streamstars run --shard-backups DIR --backup-every-visits N``) and restore a partition's
shards from the newest backups when it is assigned to them.  Real tansu broker, real consumer
processes, SIGKILL, real backup files (flipped bytes, missing manifests)."""

from __future__ import annotations

import json
import re
import shutil
import signal
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from consumer_helpers import (
    GroupConsumer,
    applications,
    assert_same_catalogs,
    backfill_catalogs,
    group_survey,
    http_get,
    run_cli,
    shard_config_file,
    shard_tables,
    snapshot_state,
    snapshot_states,
    wait_until,
)
from crash_hooks import hooks_env
from kafka_broker import TansuBroker

from streamstars.config import BuildStarsConfig
from streamstars.consumers.partitioner import shard_partition
from streamstars.consumers.publisher import ShardRouting, publish_repo
from streamstars.footprint import ShardSpec
from streamstars.simulate import SimulatedSurvey
from streamstars.state import StateDirectory
from streamstars.state.shard_copies import BACKUP_MANIFEST, list_shard_backups

#: shards of ~0.9 deg: every visit of the 1-degree field touches several (6 shards, 3 on
#: each of 2 partitions, 42 shard events for 12 visits)
NSIDE = 64
ORDER = 6
N_VISITS = 12

#: (visit, shard) -> (partition, offset) of its event
Events = dict[tuple[int, int], tuple[int, int]]


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


def _publish(broker: TansuBroker, survey: SimulatedSurvey, topic: str,
             partitions: int = 2) -> Events:
    """Publish the survey by shard on ``topic`` (created with ``partitions``); returns where
    each shard event landed."""
    broker.create_topic(topic, partitions=partitions)
    broker.create_topic(f"{topic}.dead-letters", partitions=1)
    routing = ShardRouting(ShardSpec.of_config(BuildStarsConfig(shardNside=NSIDE)), partitions)
    summary = publish_repo(survey.out_dir, broker.bootstrap, topic, routing=routing)
    assert len(summary.published) == N_VISITS
    total = sum(len(f.shards) for f in summary.footprints.values())
    events: Events = {}
    for msg in broker.consume_all(topic, total, timeout=30):
        shard = int(msg.key().decode().split("/")[1])
        events[(json.loads(msg.value())["visit"], shard)] = (msg.partition(), msg.offset())
    assert len(events) == total
    assert {shard_partition(NSIDE, s, partitions) for _, s in events} == set(range(partitions))
    return events


def _lineage(records: Iterable[dict[str, Any]], events: Events) -> dict[int, set[int]]:
    """Follow one state directory's shards through its consumer's application log (restores
    and applications, in order): a shard restored from a backup ending at offset ``b`` holds
    exactly the events of the shard below ``b``; each application must add a visit the shard
    does not hold yet (never applied twice) and find every earlier event of its shard held
    (nothing skipped).  Returns shard -> the visits its copy holds at the end."""
    of_shard: dict[int, list[tuple[int, int]]] = {}
    for (visit, shard), (_, offset) in events.items():
        of_shard.setdefault(shard, []).append((offset, visit))
    held: dict[int, set[int]] = {}
    for r in records:
        if "restored" in r and r["source"] == "backup":
            held[r["restored"]] = {v for o, v in of_shard[r["restored"]] if o < r["offset"]}
        elif r.get("status") == "applied":
            shard, visit, offset = r["shard"], r["visit"], r["offset"] - 1
            have = held.setdefault(shard, set())
            assert visit not in have, f"visit {visit} applied twice to shard {shard}"
            missing = {v for o, v in of_shard[shard] if o < offset} - have
            assert not missing, f"shard {shard}: visit {visit} applied without {missing}"
            have.add(visit)
    return held


def _check_states(states: dict[str, tuple[Path, Path]], events: Events) -> None:
    """Each state's shards hold what its application log says (:func:`_lineage`); the copy of
    each shard at the highest offset holds every visit of the shard exactly once."""
    expected: dict[int, set[int]] = {}
    for visit, shard in events:
        expected.setdefault(shard, set()).add(visit)
    best: dict[int, tuple[int, set[int]]] = {}
    for name, (state, app_log) in states.items():
        held = _lineage(applications(app_log), events)
        with StateDirectory.open(state, readonly=True) as directory:
            for _, pixel in directory.shards():
                store = directory.open_shard(pixel)
                visits = set(store.applied_visits())
                assert visits == held.get(pixel, set()), (name, pixel)
                offset = max(store.stored_offsets(_topic_of(store)).values(), default=0)
                if offset >= best.get(pixel, (-1, set()))[0]:
                    best[pixel] = (offset, visits)
    assert {p: v for p, (_, v) in best.items()} == expected


def _topic_of(store: Any) -> str:
    with store.read() as tx:
        topics = {t for t, _, _ in tx.offsets.items()}
    assert len(topics) == 1
    return str(topics.pop())


def _restores(app_log: Path, source: str) -> list[dict[str, Any]]:
    return [r for r in applications(app_log) if r.get("source") == source]


def _metric(port: int, name: str) -> float:
    status, body = http_get(port, "/metrics")
    assert status == 200
    found = re.search(rf"^{re.escape(name)} (\S+)$", body, re.MULTILINE)
    assert found is not None, f"{name} not in /metrics"
    return float(found.group(1))


def _metrics_port(consumer: GroupConsumer) -> int:
    wait_until(lambda: "metrics on http://" in consumer.text(), 60, "the metrics server")
    found = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", consumer.text())
    assert found is not None
    return int(found.group(1))


# ------------------------------------------------------------------ the test
def test_three_consumers_a_killed_c_joining_restore_from_backups_and_make_the_backfill(
        broker: TansuBroker, survey: SimulatedSurvey, config_file: Path,
        backfill_snapshot: Path, tmp_path: Path) -> None:
    """A and B share a 2-partition topic with a backlog, backing their shards up every 2
    visits into one directory; A is SIGKILLed mid-backlog after some of its shards were
    backed up; C joins with an empty state.  The partitions end with B and C, whose shards
    were restored from the backups (never from a partition's start when a backup existed):
    the snapshot of B, C and A's stale state equals the backfill, and along each shard's
    history every visit was applied exactly once (restored copies included)."""
    topic, group = "backups-three", "g-backups-three"
    backups = tmp_path / "backups"
    common = ("--shard-backups", str(backups), "--backup-every-visits", "2",
              "--exit-when-idle", "12")
    logs = {name: tmp_path / f"{name}.jsonl" for name in "ABC"}
    broker.create_topic(topic, partitions=2)
    a = GroupConsumer(broker, topic, group, tmp_path / "A", survey, config_file, tmp_path,
                      *common, env=hooks_env(logs["A"], kill="before_apply:12"))
    b = GroupConsumer(broker, topic, group, tmp_path / "B", survey, config_file, tmp_path,
                      *common, env=hooks_env(logs["B"]))
    wait_until(lambda: a.settled() and b.settled(), 90, "one partition each")
    events = _publish(broker, survey, topic)
    assert a.wait(180) == -signal.SIGKILL, a.text()
    assert "backed up shard" in a.text(), a.text()  # before its death
    c = GroupConsumer(broker, topic, group, tmp_path / "C", survey, config_file, tmp_path,
                      *common, env=hooks_env(logs["C"]))
    assert b.wait(300) == 0, b.text()
    assert c.wait(300) == 0, c.text()

    restored = _restores(logs["C"], "backup")
    assert restored, c.text()  # C took a partition over from the backups
    assert "restored from the backup" in c.text()
    assert not _restores(logs["C"], "replay"), c.text()  # every listed shard had a backup
    indexes = sorted((backups / "partitions" / topic).glob("*.json"))
    assert [p.name for p in indexes] == ["0.json", "1.json"]
    _check_states({n: (tmp_path / n, logs[n]) for n in "ABC"}, events)
    assert_same_catalogs(snapshot_states(tmp_path / "snap", b.state, c.state, a.state),
                         backfill_snapshot)


# ------------------------------------------------------------------ restore vs replay
@pytest.fixture(scope="module")
def source(broker: TansuBroker, survey: SimulatedSurvey, config_file: Path,
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One topic consumed twice, at the same time: by X, backing its shards up every 3 visits
    (its last backup of a shard is usually before the shard's last event), and by R, a
    consumer without backups (every shard built from the partition's start)."""
    tmp = tmp_path_factory.mktemp("source")
    topic = "backups-source"
    events = _publish(broker, survey, topic)
    x = GroupConsumer(broker, topic, "g-source-x", tmp / "X", survey, config_file, tmp,
                      "--shard-backups", str(tmp / "backups"), "--backup-every-visits", "3",
                      "--exit-when-idle", "4")
    r = GroupConsumer(broker, topic, "g-source-r", tmp / "R", survey, config_file, tmp,
                      "--exit-when-idle", "4")
    assert x.wait(300) == 0, x.text()
    assert r.wait(300) == 0, r.text()
    return {"topic": topic, "events": events, "backups": tmp / "backups", "replayed": tmp / "R"}


def _backed_up_shards(backups: Path, topic: str) -> dict[int, int]:
    """shard -> offset the partition indexes list for it."""
    out: dict[int, int] = {}
    for index in (backups / "partitions" / topic).glob("*.json"):
        out.update({int(k): v for k, v in json.loads(index.read_text())["shards"].items()})
    return out


def test_a_partition_restored_from_backups_and_one_replayed_give_the_same_shards(
        broker: TansuBroker, survey: SimulatedSurvey, config_file: Path,
        backfill_snapshot: Path, source: dict[str, Any], tmp_path: Path) -> None:
    """Y, with an empty state and X's backups, restores every shard from a backup and
    applies only the events after it; its shards are R's (built by a full replay), table for
    table, and make the backfill's catalogs."""
    backups = tmp_path / "backups"
    shutil.copytree(source["backups"], backups)
    listed = _backed_up_shards(backups, source["topic"])
    assert sorted(listed) == sorted({s for _, s in source["events"]})
    log = tmp_path / "y.jsonl"
    y = GroupConsumer(broker, source["topic"], "g-restore-y", tmp_path / "Y", survey,
                      config_file, tmp_path, "--shard-backups", str(backups),
                      "--exit-when-idle", "4", env=hooks_env(log))
    assert y.wait(300) == 0, y.text()
    restored = {r["restored"]: r["offset"] for r in _restores(log, "backup")}
    assert restored == listed, y.text()  # the newest backup of every shard
    applied = [r for r in applications(log) if r.get("status") == "applied"]
    assert len(applied) < len(source["events"])  # not replayed from the partitions' starts
    assert all(r["offset"] > restored[r["shard"]] for r in applied)
    _check_states({"Y": (tmp_path / "Y", log)}, source["events"])
    assert shard_tables(tmp_path / "Y") == shard_tables(source["replayed"])
    assert_same_catalogs(snapshot_state(tmp_path / "Y", tmp_path / "snap"), backfill_snapshot)


def test_corrupt_and_partial_backups_are_rejected_and_the_shards_replayed(
        broker: TansuBroker, survey: SimulatedSurvey, config_file: Path,
        source: dict[str, Any], tmp_path: Path) -> None:
    """Every backup of one shard corrupted (bytes of data.mdb flipped) and the newest backup
    of another partial (its manifest removed): W rejects them (logged, counted in
    ``streamstars_shard_backup_rejected_total``), replays the first shard from its partition's
    start and restores the second from its older backup; its shards are R's, table for
    table."""
    backups = tmp_path / "backups"
    shutil.copytree(source["backups"], backups)
    candidates = {pixel: list_shard_backups(backups, ORDER, pixel)
                  for pixel in _backed_up_shards(backups, source["topic"])}
    partial = next(p for p, found in sorted(candidates.items()) if len(found) >= 2)
    corrupt = next(p for p in sorted(candidates) if p != partial)
    for backup in candidates[corrupt]:
        data = backup.path / "data.mdb"
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 3] ^= 0x5A
        data.write_bytes(bytes(raw))
    (candidates[partial][0].path / BACKUP_MANIFEST).unlink()

    log = tmp_path / "w.jsonl"
    w = GroupConsumer(broker, source["topic"], "g-restore-w", tmp_path / "W", survey,
                      config_file, tmp_path, "--shard-backups", str(backups),
                      "--exit-when-idle", "6", "--metrics-port", "0", env=hooks_env(log))
    port = _metrics_port(w)
    wait_until(lambda: w.text().count("assigned ") >= 2, 120, "both partitions assigned")
    rejected = _metric(port, "streamstars_shard_backup_rejected_total")
    assert w.wait(300) == 0, w.text()
    assert rejected == len(candidates[corrupt]) + 1
    text = w.text()
    assert text.count("is corrupt: the sha256") == len(candidates[corrupt]), text
    assert "is partial (no manifest.json" in text, text
    assert [r["restored"] for r in _restores(log, "replay")] == [corrupt]
    older = {r["restored"]: r["offset"] for r in _restores(log, "backup")}[partial]
    assert older == candidates[partial][1].offset
    _check_states({"W": (tmp_path / "W", log)}, source["events"])
    assert shard_tables(tmp_path / "W") == shard_tables(source["replayed"])


# ------------------------------------------------------------------ faults
def test_an_unusable_backup_directory_is_logged_and_retried_while_applying_goes_on(
        broker: TansuBroker, survey: SimulatedSurvey, config_file: Path,
        backfill_snapshot: Path, tmp_path: Path) -> None:
    """The backup directory cannot be written (a file stands in its place: the tests run as
    root, whom chmod does not stop): each failure is logged naming the directory and counted,
    every event is applied all the same; once the directory is usable the next retry writes
    the backups and the partition index."""
    topic = "backups-unusable"
    events = _publish(broker, survey, topic, partitions=1)
    backups = tmp_path / "backups"
    backups.write_text("not a directory\n")
    log = tmp_path / "u.jsonl"
    u = GroupConsumer(broker, topic, "g-unusable", tmp_path / "U", survey, config_file,
                      tmp_path, "--shard-backups", str(backups), "--backup-every-visits", "1",
                      "--metrics-port", "0", env=hooks_env(log))
    try:
        port = _metrics_port(u)
        wait_until(lambda: len([r for r in applications(log) if r.get("status") == "applied"])
                   == len(events), 240, "every event applied")
        wait_until(lambda: "shard backup failed" in u.text(), 60, "a failed backup")
        assert f"cannot write the backup of shard {ORDER}/" in u.text()
        assert f" to {backups}/shards/{ORDER}/" in u.text(), u.text()
        assert _metric(port, "streamstars_shard_backup_failures_total") >= 1
        assert _metric(port, "streamstars_shard_backups_total") == 0
        assert _metric(port, "streamstars_shard_backup_age_seconds") == -1

        backups.unlink()
        backups.mkdir()
        index = backups / "partitions" / topic / "0.json"
        wait_until(index.exists, 60, "the partition index")
        shards = {s for _, s in events}
        assert _metric(port, "streamstars_shard_backups_total") == len(shards)
        assert _metric(port, "streamstars_shard_backup_age_seconds") >= 0
        listed = json.loads(index.read_text())
        assert listed["complete_through"] == len(events)
        assert set(map(int, listed["shards"])) == shards
        u.proc.send_signal(signal.SIGTERM)
        assert u.wait(60) == 0, u.text()
    finally:
        u.kill()
    assert_same_catalogs(snapshot_state(u.state, tmp_path / "snap"), backfill_snapshot)


def test_shard_backups_refuse_other_uri_schemes(tmp_path: Path) -> None:
    done = run_cli("run", "--bootstrap-servers", "127.0.0.1:1", "--topic", "t", "--state",
                   str(tmp_path / "s"), "--data-root", str(tmp_path), "--shard-backups",
                   "s3://bucket/backups")
    assert done.returncode == 2
    assert "the scheme s3:// is not supported" in done.stderr
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------ cooperative-sticky
def test_cooperative_sticky_moves_one_partition_and_its_shards_follow(
        broker: TansuBroker, survey: SimulatedSurvey, config_file: Path,
        backfill_snapshot: Path, tmp_path: Path) -> None:
    """``--assignment-strategy cooperative-sticky``: A consumes both partitions of a backlog,
    backing its shards up; B joins: exactly one partition is revoked from A (the other is
    never interrupted) and B restores its shards from A's backups.  A and B make the
    backfill, every visit applied once along each shard's history."""
    topic, group = "backups-coop", "g-backups-coop"
    backups = tmp_path / "backups"
    common = ("--shard-backups", str(backups), "--backup-every-visits", "2",
              "--assignment-strategy", "cooperative-sticky", "--exit-when-idle", "10")
    logs = {name: tmp_path / f"{name}.jsonl" for name in "AB"}
    events = _publish(broker, survey, topic)
    a = GroupConsumer(broker, topic, group, tmp_path / "A", survey, config_file, tmp_path,
                      *common, env=hooks_env(logs["A"]))
    wait_until(lambda: (backups / "partitions" / topic).is_dir(), 120, "A's first backups")
    b = GroupConsumer(broker, topic, group, tmp_path / "B", survey, config_file, tmp_path,
                      *common, env=hooks_env(logs["B"]))
    assert a.wait(300) == 0, a.text()
    assert b.wait(300) == 0, b.text()

    running = a.text().split("s: exiting", 1)[0]  # (leaving the group revokes the rest)
    revoked = re.findall(r"partitions revoked: \[(\d+)\]", running)
    assert len(revoked) == 1, a.text()  # one partition, incrementally
    (moved,) = revoked
    kept = {"0": "1", "1": "0"}[moved]
    assert running.count(f"assigned {topic}[{kept}]") == 1, a.text()
    assert f"assigned {topic}[{moved}]: starting at offset" in b.text(), b.text()
    assert _restores(logs["B"], "backup"), b.text()
    _check_states({n: (tmp_path / n, logs[n]) for n in "AB"}, events)
    assert_same_catalogs(snapshot_states(tmp_path / "snap", a.state, b.state),
                         backfill_snapshot)
