"""``streamstars publish --partitions P`` / ``--shard-nside N``: one schema-version-3 event per
(visit, shard of its footprint), keyed by the shard, on partition murmur2(key) % P; a real
Kafka-protocol broker (tansu)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from kafka_broker import TansuBroker, write_kafka_config

from streamstars import sky
from streamstars.cli import main
from streamstars.config import BuildStarsConfig
from streamstars.consumers.partitioner import kafka_partition
from streamstars.consumers.publisher import (
    ShardRouting,
    publish_repo,
    topic_partitions,
    watch_repo,
)
from streamstars.events import VisitEvent, parse_message
from streamstars.footprint import (
    ShardSpec,
    observation_vectors,
    read_source_positions,
)
from streamstars.ingest import VisitInput, prepare_visit
from streamstars.io.discover import discover_repo
from streamstars.shards import route
from streamstars.simulate import SimulatedSurvey, simulate_survey

#: fine shards, so that every visit of the small simulated field touches several
NSIDE = 128
MARGIN = 9.0


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TansuBroker]:
    with TansuBroker.start(log_path=tmp_path_factory.mktemp("tansu") / "tansu.log") as b:
        yield b


@pytest.fixture(scope="module")
def survey(tmp_path_factory: pytest.TempPathFactory) -> SimulatedSurvey:
    # RA 0: the field straddles RA 0/360
    return simulate_survey(tmp_path_factory.mktemp("sim"), n_visits=5, seed=17,
                           sources_per_visit=1500, ra_center=0.0, dec_center=-20.0,
                           write_refcat=False)


def _routed_shards(survey: SimulatedSurvey) -> dict[int, set[int]]:
    """visit -> the shards route() gives its *selected* rows (what a consumer stores)."""
    config = BuildStarsConfig(shardNside=NSIDE)
    out = {}
    for visit, entry in discover_repo(survey.out_dir).visits.items():
        prepared = prepare_visit(VisitInput(visit, entry.source_paths, entry.metadata), config)
        obs = prepared.observations
        out[visit] = set(route(observation_vectors(obs["ra"], obs["dec"]), NSIDE,
                               config.shardMargin).shards.tolist())
    return out


def _near_shards(survey: SimulatedSurvey, radius_arcsec: float) -> dict[int, set[int]]:
    """visit -> the shards within about ``radius_arcsec`` of any of its rows: the rows are
    gathered in pixels of nside 4096 (~50") and the shards overlapping a disc of the radius
    plus that pixel's size around each one are taken (a superset, at most ~40" looser; routing
    every row with a 300" margin costs half a minute)."""
    fine = 4096
    reach = sky.chord_from_arcsec(radius_arcsec + np.degrees(sky.max_pixel_radius(fine)) * 3600)
    out = {}
    for visit, entry in discover_repo(survey.out_dir).visits.items():
        ra, dec = read_source_positions(entry.source_paths)
        centres = sky.pixel_vectors(np.unique(sky.pixels_of(sky.unit_vectors(ra, dec), fine)),
                                    fine)
        out[visit] = set(sky.pixels_in_discs(centres, np.full(len(centres), reach),
                                             NSIDE).tolist())
    return out


def _events(broker: TansuBroker, topic: str, n: int) -> list[tuple[Any, VisitEvent]]:
    messages = broker.consume_all(topic, n, timeout=30)
    assert len(messages) == n
    assert not broker.consume_all(topic, n + 1, timeout=3)[n:], "more events than expected"
    return [(m, parse_message(m.value(), m.key())) for m in messages]


def test_publish_routes_every_visit_to_its_shards(broker: TansuBroker, survey: SimulatedSurvey,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    topic = "by-shard"
    assert main(["publish", str(survey.out_dir), "--bootstrap-servers", broker.bootstrap,
                 "--topic", topic, "--partitions", "4", "--shard-nside", str(NSIDE)]) == 0
    out = capsys.readouterr().out
    # the topic was created with 4 partitions
    from confluent_kafka.admin import AdminClient

    assert topic_partitions(AdminClient({"bootstrap.servers": broker.bootstrap}), topic) == 4
    summary = publish_repo(survey.out_dir, broker.bootstrap, "by-shard-count",
                           routing=ShardRouting(ShardSpec(NSIDE, MARGIN), partitions=4))
    assert f"published 5 visit event(s) to {topic} as {summary.events} shard event(s) on 4 " \
           "partition(s)" in out
    assert {f.method for f in summary.footprints.values()} == {"corners"}

    events = _events(broker, topic, summary.events)
    routed = _routed_shards(survey)
    near = _near_shards(survey, BuildStarsConfig(shardNside=NSIDE).shardMargin + 300.0)
    by_visit: dict[int, list[VisitEvent]] = defaultdict(list)
    order: dict[int, list[int]] = defaultdict(list)  # per partition: (shard, visit) in order
    for message, event in events:
        assert event.schema_version == 3 and event.shard_nside == NSIDE
        assert message.key() == f"{NSIDE}/{event.shard}".encode()
        assert message.partition() == kafka_partition(message.key(), 4)
        assert json.loads(message.value())["shard"] == {"nside": NSIDE, "pixel": event.shard}
        by_visit[event.visit].append(event)
        order[message.partition()].append(event.visit)
    assert sorted(by_visit) == survey.visits
    spread = set()
    for visit, visit_events in by_visit.items():
        shards = visit_events[0].shards
        # one event per shard of the footprint, each naming the whole footprint
        assert sorted(e.shard for e in visit_events) == list(shards)
        assert all(e.shards == shards for e in visit_events)
        assert routed[visit] <= set(shards), f"visit {visit}: {routed[visit] - set(shards)}"
        # and not much larger: within the slack and the gaps between sources of the rows
        assert set(shards) <= near[visit], f"visit {visit}: {set(shards) - near[visit]}"
        assert {e.action for e in visit_events} == {"apply"}
        assert list(shards) == list(summary.footprints[visit].shards)
        spread |= {kafka_partition(f"{NSIDE}/{s}".encode(), 4) for s in shards}
    assert len(spread) > 1  # the shards of the survey use several partitions
    for visits in order.values():  # a partition holds its shards' events in visit order
        assert visits == sorted(visits)


def test_an_existing_topic_keeps_its_partitions(broker: TansuBroker, survey: SimulatedSurvey,
                                                caplog: pytest.LogCaptureFixture,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    topic = "three"
    broker.create_topic(topic, partitions=3)
    with caplog.at_level(logging.INFO, logger="streamstars.publish"):
        summary = publish_repo(survey.out_dir, broker.bootstrap, topic,
                               routing=ShardRouting(ShardSpec(NSIDE, MARGIN), partitions=8))
    assert summary.partitions == 3
    assert "topic three already exists with 3 partition(s): it keeps them (--partitions 8 " \
           "ignored" in caplog.text
    for message, event in _events(broker, topic, summary.events):
        assert message.partition() == kafka_partition(event.key, 3)
    # an absent topic without --partitions is a usage error naming the option
    assert main(["publish", str(survey.out_dir), "--bootstrap-servers", broker.bootstrap,
                 "--topic", "absent", "--shard-nside", "64"]) == 2
    assert "topic absent does not exist: give --partitions P" in capsys.readouterr().err
    # shard settings given twice, or refused by the configuration's rules
    config = survey.out_dir.parent / "shards.toml"
    config.write_text("shardNside = 64\n")
    for extra, needle in ((["--shard-nside", "64", "--config", str(config)], "not both"),
                          (["--shard-nside", "48"], "shardNside"),
                          (["--shard-nside", "4096"], "shardNside (4096) must be at most")):
        assert main(["publish", str(survey.out_dir), "--bootstrap-servers", broker.bootstrap,
                     "--topic", topic, *extra]) == 2
        assert needle in capsys.readouterr().err


def test_shard_settings_from_the_config_file(broker: TansuBroker, survey: SimulatedSurvey,
                                             tmp_path: Path) -> None:
    config = tmp_path / "shards.toml"
    config.write_text("shardNside = 64\nshardMargin = 12.0\n")
    topic = "from-config"
    assert main(["publish", str(survey.out_dir), "--bootstrap-servers", broker.bootstrap,
                 "--topic", topic, "--config", str(config), "--partitions", "2"]) == 0
    expected = publish_repo(survey.out_dir, broker.bootstrap, "from-config-count",
                            routing=ShardRouting(ShardSpec(64, 12.0), partitions=2))
    events = _events(broker, topic, expected.events)
    assert {e.shard_nside for _, e in events} == {64}
    assert {e.visit: e.shards for _, e in events} == \
        {v: f.shards for v, f in expected.footprints.items()}


def test_without_shard_options_events_are_written_as_before(
        broker: TansuBroker, survey: SimulatedSurvey, tmp_path: Path) -> None:
    """No --partitions / --shard-*: one version-1 event per visit keyed by visit, also with
    --config (which still only gives referenceCCD)."""
    config = tmp_path / "c.toml"
    config.write_text("referenceCCD = 4\n")
    topic = "unsharded"
    broker.create_topic(topic, partitions=2)
    assert main(["publish", str(survey.out_dir), "--bootstrap-servers", broker.bootstrap,
                 "--topic", topic, "--config", str(config)]) == 0
    events = _events(broker, topic, len(survey.visits))
    assert sorted(e.visit for _, e in events) == survey.visits
    assert all(e.schema_version == 1 and e.shard is None and m.key() == str(e.visit).encode()
               for m, e in events)


def test_librdkafka_murmur2_partitioner_agrees(broker: TansuBroker) -> None:
    """A Java-compatible producer left to partition by key puts every shard key where the
    publisher does."""
    from confluent_kafka import Producer

    topic = "agree"
    broker.create_topic(topic, partitions=7)
    producer = Producer({"bootstrap.servers": broker.bootstrap, "partitioner": "murmur2"})
    landed: dict[bytes, int] = {}
    for pixel in range(0, 12 * 32 * 32, 97):
        producer.produce(topic, key=f"32/{pixel}".encode(), value=b"x",
                         on_delivery=lambda err, msg: landed.__setitem__(msg.key(),
                                                                         msg.partition()))
    assert producer.flush(15) == 0
    assert len(landed) == len(range(0, 12 * 32 * 32, 97))
    assert all(partition == kafka_partition(key, 7) for key, partition in landed.items())
    assert len(set(landed.values())) == 7


def test_watch_publishes_each_new_visit_once_by_shard(broker: TansuBroker,
                                                      survey: SimulatedSurvey,
                                                      tmp_path: Path) -> None:
    """New visits are published once, by shard; a restarted watcher publishes nothing twice; a
    changed visit is replaced on its new footprint and on the shards it left.  (An older
    ccdVisitTable without corners: the footprints come from the source coordinates.)"""
    repo = tmp_path / "repo"
    repo.mkdir()
    for path in (survey.visit_table_path, *survey.source_paths[:2]):
        shutil.copy(path, repo)
    ccd = pq.read_table(survey.ccd_visit_table_path)
    pq.write_table(ccd.drop_columns([c for c in ccd.column_names if c.endswith(("ra", "dec"))
                                     and c[:3] in ("llc", "ulc", "urc", "lrc")]),
                   repo / "ccdVisitTable.parquet")
    state_file = tmp_path / "watch.json"
    topic = "watched"
    routing = ShardRouting(ShardSpec(NSIDE, MARGIN), partitions=2)
    sent: list[list[int]] = []

    def watch(polls: int) -> None:
        watch_repo(repo, broker.bootstrap, topic, state_file, poll_seconds=0.05,
                   max_polls=polls, on_publish=sent.append, routing=routing)

    watch(2)
    assert sent == [survey.visits[:2]]
    for path in survey.source_paths[2:]:
        shutil.copy(path, repo)
    watch(3)  # a restarted watcher publishes the new visits only
    watch(3)  # and then nothing
    assert [v for batch in sent for v in batch] == survey.visits
    state = json.loads(state_file.read_text())
    assert state["format"] == 1 and sorted(map(int, state["published"])) == survey.visits
    assert state["routing"] == {"schema_version": 3, "shardNside": NSIDE, "shardMargin": MARGIN}
    n_events = sum(len(shards) for shards in state["shards"].values())
    events = _events(broker, topic, n_events)
    shards_of = {v: sorted(e.shard for _, e in events if e.visit == v) for v in survey.visits}
    assert shards_of == {int(k): v for k, v in state["shards"].items()}
    assert all(m.partition() == kafka_partition(e.key, 2) for m, e in events)

    # a visit's file changes so that it loses its southern half: the replace goes to its new
    # footprint and to the shards it left, which must drop its old observations
    visit, path = survey.visits[0], repo / survey.source_paths[0].name
    table = pq.read_table(path)
    dec = table.column("dec").to_numpy()
    kept = table.filter(pc.greater(table.column("dec"), float(np.median(dec))))
    pq.write_table(kept, path)
    watch(3)
    assert sent[-1] == [visit]
    # (the partitions are read in no particular order between them: pick the replaces out)
    every = _events(broker, topic, n_events + len(shards_of[visit]))
    replaced = [(m, e) for m, e in every if e.action == "replace"]
    assert len(replaced) == len(shards_of[visit]) and {e.visit for _, e in replaced} == {visit}
    assert sorted(e.shard for _, e in replaced) == shards_of[visit]  # the old shards too
    new = publish_repo(repo, broker.bootstrap, "watched-count", routing=routing)
    assert new.footprints[visit].method == "sources"
    assert set(new.footprints[visit].shards) < set(shards_of[visit])
    assert all(e.shards == tuple(shards_of[visit]) for _, e in replaced)


def test_the_consumer_applies_shard_events_and_version_1_events_behind_them(
        broker: TansuBroker, survey: SimulatedSurvey, tmp_path: Path) -> None:
    """``streamstars run`` applies every version-3 event to its shard (no dead letter; before
    issue 10's consumer side they were dead-lettered as ``needs_sharded_consumer``), and the
    version-1 events of the same visits behind them are skipped as already applied."""
    topic, dlq = "sharded-to-run", "sharded-to-run.dead-letters"
    broker.create_topic(dlq, partitions=1)
    summary = publish_repo(survey.out_dir, broker.bootstrap, topic,
                           routing=ShardRouting(ShardSpec(NSIDE, MARGIN), partitions=3))
    assert summary.events > len(survey.visits)
    # then the same visits as version-1 events, keyed by visit, on the same topic
    assert len(publish_repo(survey.out_dir, broker.bootstrap, topic).published) == 5
    state, config = tmp_path / "state", tmp_path / "config.toml"
    config.write_text(f"shardNside = {NSIDE}\nshardMargin = {MARGIN}\n")
    done = subprocess.run(
        [sys.executable, "-m", "streamstars.cli", "run", "--bootstrap-servers",
         broker.bootstrap, "--topic", topic, "--state", str(state), "--group", "g-old",
         "--config", str(config), "--data-root", str(survey.out_dir), "--kafka-config",
         str(write_kafka_config(tmp_path / "kafka.properties")), "--dead-letter-topic", dlq,
         "--exit-when-idle", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert broker.consume_all(dlq, 1, timeout=5) == []
    # each visit read and selected once for all its shard events (then once more for its
    # version-1 event, which names no shard)
    assert f"reused for {summary.events - 5} other shard event(s)" in done.stderr, done.stderr
    from streamstars.state import StateDirectory

    with StateDirectory.open(state, readonly=True) as directory:
        assert sorted(directory.applied_visits()) == survey.visits
        assert {p for _, p in directory.shards()} == \
            {s for f in summary.footprints.values() for s in f.shards}
