"""``streamstars publish --butler --watch`` and ``streamstars run --butler``: a real sqlite
Butler repository, a real Kafka-protocol broker (tansu), the publisher and the consumer as
real processes.

Datasets ingested after the publisher started are published once each: new datasets in a RUN
of the chain (seen through ``ingest_date``), and datasets that were ingested long before but
only become current when the chain is redefined (seen through the (visit, UUID) diff) --
including a re-processed visit, published as ``replace``.  A restarted publisher publishes
nothing again.  The consumer resolves the events through the Butler: its catalogs equal a
``backfill --butler`` of the final chain.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from consumer_helpers import assert_same_catalogs
from kafka_broker import TansuBroker, write_kafka_config

pytest.importorskip("lsst.daf.butler", reason="the streamstars[butler] extra is not installed")

from streamstars.butler.repo import open_butler  # noqa: E402
from streamstars.butler.simulate import create_repo, ingest_survey, insert_visits  # noqa: E402
from streamstars.cli import main  # noqa: E402
from streamstars.events import parse_event  # noqa: E402
from streamstars.simulate import SimulatedSurvey, simulate_survey  # noqa: E402
from streamstars.state import StateDirectory  # noqa: E402

CHAIN = "SimCam/nightly"


class Proc:
    """A ``streamstars`` subprocess writing its log to a file."""

    def __init__(self, log: Path, *args: str) -> None:
        self.log_path = log
        self.log = open(log, "w")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "streamstars.cli", *args],
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ})

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            self.log.close()

    def text(self) -> str:
        return self.log_path.read_text()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, proc: Proc) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.proc.poll() is not None:
            raise AssertionError(f"process exited while waiting for {what}:\n{proc.text()}")
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}:\n{proc.text()}")


def reprocessed(path: Path, out: Path) -> Path:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    name = "apFlux_12_0_instFlux"
    index = table.schema.get_field_index(name)
    pq.write_table(table.set_column(index, name, pc.multiply(table.column(name), 1.07)), out)
    return out


def redefine(root: Path, runs: list[str]) -> None:
    open_butler(root, writeable=True).butler.collections.redefine_chain(CHAIN, runs)


def test_watch_publishes_new_and_rechained_datasets_once(broker: TansuBroker,
                                                         tmp_path: Path) -> None:
    from lsst.daf.butler import CollectionType

    sim: SimulatedSurvey = simulate_survey(tmp_path / "sim", n_visits=8, seed=41,
                                           sources_per_visit=1200, write_refcat=False)
    v = sim.visits
    root = tmp_path / "repo"
    repo = create_repo(root)
    insert_visits(repo, "SimCam", sim.visit_table_path)
    # before the publisher starts: the metadata, the first night's four visits, and two RUNs
    # that are not in the chain yet (visits 7-8, and visit 3 re-processed)
    ingest_survey(repo, sim, "SimCam/runs/meta", visits=[])
    ingest_survey(repo, sim, "SimCam/runs/night1", visits=v[:4], with_visit_tables=False)
    ingest_survey(repo, sim, "SimCam/runs/late", visits=v[6:], with_visit_tables=False)
    ingest_survey(repo, sim, "SimCam/runs/reproc", visits=[v[2]], with_visit_tables=False,
                  source_paths=[reprocessed(sim.source_paths[2], tmp_path / "v3.parquet")])
    repo.butler.collections.register(CHAIN, CollectionType.CHAINED)
    redefine(root, ["SimCam/runs/night1", "SimCam/runs/meta"])

    topic = "butler-visits"
    broker.create_topic(topic, partitions=1)
    kafka_config = write_kafka_config(tmp_path / "kafka.properties")
    state_file = tmp_path / "watch.json"
    publish_args = ["publish", "--butler", str(root), "--collections", CHAIN,
                    "--bootstrap-servers", broker.bootstrap, "--topic", topic,
                    "--kafka-config", str(kafka_config), "--watch", "--poll-seconds", "0.2",
                    "--watch-state", str(state_file), "--overlap-seconds", "1",
                    "--full-every", "0"]
    published: list = []

    def count(n: int) -> Callable[[], bool]:
        def check() -> bool:
            published[:] = broker.consume_all(topic, n, timeout=10.0)
            return len(published) >= n
        return check

    publisher = Proc(tmp_path / "publish-1.log", *publish_args)
    try:
        wait_for(count(4), 60, "the first night's 4 visits", publisher)
        # new datasets in a RUN of the chain: found by ingest_date
        ingest_survey(open_butler(root, writeable=True), sim, "SimCam/runs/night1",
                      visits=v[4:6], with_visit_tables=False)
        wait_for(count(6), 30, "visits 5-6", publisher)
        # datasets ingested before the publisher started, made current by re-chaining
        time.sleep(1.5)  # well past the ingest_date overlap: only the (visit, UUID) diff sees them
        redefine(root, ["SimCam/runs/reproc", "SimCam/runs/night1", "SimCam/runs/late",
                        "SimCam/runs/meta"])
        wait_for(count(9), 30, "visits 7-8 and the re-processed visit 3", publisher)
        time.sleep(1.5)  # several more polls: nothing more
        assert len(broker.consume_all(topic, 10, timeout=6.0)) == 9
    finally:
        assert publisher.stop() == 0, publisher.text()

    events = [parse_event(m.value(), m.key()) for m in published]
    assert Counter((e.visit, e.action) for e in events) == Counter(
        [(visit, "apply") for visit in v] + [(v[2], "replace")])
    assert all(e.schema_version == 2 and e.butler_collections == (CHAIN,) for e in events)
    assert all(set(e.butler_datasets or {}) == {"sourceTable_visit", "visitTable",
                                                "ccdVisitTable"} for e in events)
    assert [e.visit for e in events][:4] == v[:4]

    # a restarted publisher publishes nothing again (several polls, incl. its full diff)
    mtime = state_file.stat().st_mtime_ns
    publisher = Proc(tmp_path / "publish-2.log", *publish_args)
    try:
        wait_for(lambda: state_file.stat().st_mtime_ns != mtime, 60, "a poll", publisher)
        time.sleep(1.0)
    finally:
        assert publisher.stop() == 0, publisher.text()
    assert len(broker.consume_all(topic, 10, timeout=6.0)) == 9

    # the consumer resolves the events through the Butler: same catalogs as backfill --butler
    state, snap = tmp_path / "state", tmp_path / "snap"
    consumer = Proc(tmp_path / "run.log", "run", "--butler", str(root), "--bootstrap-servers",
                    broker.bootstrap, "--topic", topic, "--group", "g-butler", "--state",
                    str(state), "--kafka-config", str(kafka_config), "--snapshot-dir",
                    str(snap), "--snapshot-on-exit")

    def all_applied() -> bool:
        if not (state / "manifest.json").exists():
            return False
        with StateDirectory.open(state, readonly=True) as store:
            return store.stored_offsets(topic).get(0) == 9

    try:
        wait_for(all_applied, 90, "the 9 events applied", consumer)
    finally:
        assert consumer.stop() == 0, consumer.text()
    log = consumer.text()
    assert "dead letter (" not in log and "dead-lettering" not in log, log
    assert f"replace visit {v[2]}: replaced" in log
    reference = tmp_path / "ref-snap"
    assert main(["backfill", "--butler", str(root), "--collections", CHAIN, "--state",
                 str(tmp_path / "ref-state"), "--no-progress"]) == 0
    assert main(["snapshot", str(reference), "--state", str(tmp_path / "ref-state")]) == 0
    assert_same_catalogs(snap, reference)


def test_publish_once_from_a_butler(broker: TansuBroker, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    from streamstars.butler.simulate import write_survey_repo

    sim = simulate_survey(tmp_path / "sim", n_visits=3, seed=2, sources_per_visit=300,
                          write_refcat=False)
    written = write_survey_repo(sim, tmp_path / "repo")
    topic = "butler-once"
    broker.create_topic(topic, partitions=1)
    assert main(["publish", "--butler", str(written.repo), "--collections", written.collection,
                 "--bootstrap-servers", broker.bootstrap, "--topic", topic]) == 0
    assert "published 3 visit event(s)" in capsys.readouterr().out
    events = [parse_event(m.value(), m.key()) for m in broker.consume_all(topic, 3)]
    assert sorted(e.visit for e in events) == sim.visits
    assert {e.action for e in events} == {"apply"}
    # --watch without a state file is a usage error naming the option
    assert main(["publish", "--butler", str(written.repo), "--collections", written.collection,
                 "--bootstrap-servers", broker.bootstrap, "--topic", topic, "--watch"]) == 2
    assert "--watch-state" in capsys.readouterr().err


def test_consumer_skips_visits_already_applied_from_the_same_datasets(
        broker: TansuBroker, tmp_path: Path) -> None:
    """Events naming exactly the datasets a visit was applied from are skipped without reading
    a file (a backfill followed by a watcher that publishes everything again costs nothing)."""
    from streamstars.butler.discover import butler_inventory
    from streamstars.butler.simulate import write_survey_repo

    sim = simulate_survey(tmp_path / "sim", n_visits=4, seed=9, sources_per_visit=800,
                          write_refcat=False)
    written = write_survey_repo(sim, tmp_path / "repo")
    state = tmp_path / "state"
    assert main(["backfill", "--butler", str(written.repo), "--collections", written.collection,
                 "--state", str(state), "--no-progress"]) == 0
    topic = "butler-replay"
    broker.create_topic(topic, partitions=1)
    assert main(["publish", "--butler", str(written.repo), "--collections", written.collection,
                 "--bootstrap-servers", broker.bootstrap, "--topic", topic]) == 0
    # garbage under the datasets' URIs: reading any of them would dead-letter its event
    for entry in butler_inventory(open_butler(written.repo), [written.collection]).visits.values():
        entry.source_paths[0].unlink()
        entry.source_paths[0].write_bytes(b"not parquet")
    consumer = Proc(tmp_path / "run.log", "run", "--butler", str(written.repo),
                    "--bootstrap-servers", broker.bootstrap, "--topic", topic, "--group",
                    "g-replay", "--state", str(state), "--kafka-config",
                    str(write_kafka_config(tmp_path / "kafka.properties")))

    def consumed() -> bool:
        with StateDirectory.open(state, readonly=True) as store:
            return store.stored_offsets(topic).get(0) == 4

    try:
        wait_for(consumed, 60, "the 4 events consumed", consumer)
    finally:
        assert consumer.stop() == 0, consumer.text()
    log = consumer.text()
    assert "dead letter (" not in log and "dead-lettering" not in log, log
    assert sum(f"apply visit {v}: skipped" in log for v in sim.visits) == 4, log


def test_publish_from_a_butler_by_shard(broker: TansuBroker, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """``publish --butler ... --partitions P --shard-nside N`` (once, then ``--watch``): one
    version-3 event per (visit, shard of its footprint) -- the footprint from the detector
    corners of the ccdVisitTable found through the registry, the same as from the files --
    keyed by shard, on partition murmur2(key) % P; the watcher remembers the shards."""
    import json

    from streamstars.butler.simulate import write_survey_repo
    from streamstars.consumers.partitioner import kafka_partition
    from streamstars.footprint import FootprintFinder, ShardSpec
    from streamstars.io.discover import discover_repo

    sim = simulate_survey(tmp_path / "sim", n_visits=3, seed=2, sources_per_visit=300,
                          write_refcat=False)
    written = write_survey_repo(sim, tmp_path / "repo")
    finder = FootprintFinder(ShardSpec(128, 9.0))
    expected = {v: finder.of_entry(e) for v, e in discover_repo(sim.out_dir).visits.items()}
    assert {f.method for f in expected.values()} == {"corners"}
    n_events = sum(len(f.shards) for f in expected.values())
    assert n_events > 3
    base = ["publish", "--butler", str(written.repo), "--collections", written.collection,
            "--bootstrap-servers", broker.bootstrap, "--partitions", "3", "--shard-nside",
            "128", "--shard-margin", "9"]

    def check(topic: str) -> None:
        messages = broker.consume_all(topic, n_events, timeout=30)
        assert len(messages) == n_events
        assert not broker.consume_all(topic, n_events + 1, timeout=3)[n_events:]
        events = [(m, parse_event(m.value(), m.key())) for m in messages]
        assert all(e.schema_version == 3 and e.butler_datasets and e.shard_nside == 128 and
                   m.key() == f"128/{e.shard}".encode() and
                   m.partition() == kafka_partition(m.key(), 3) for m, e in events)
        for visit, footprint in expected.items():
            mine = [e for _, e in events if e.visit == visit]
            assert sorted(e.shard for e in mine) == list(footprint.shards)
            assert all(e.shards == footprint.shards for e in mine)

    assert main([*base, "--topic", "butler-by-shard"]) == 0
    assert "published 3 visit event(s) routed by shard" in capsys.readouterr().out
    check("butler-by-shard")

    state_file = tmp_path / "watch.json"
    watch = [*base, "--topic", "butler-watch-by-shard", "--watch", "--watch-state",
             str(state_file), "--poll-seconds", "0.05", "--max-polls", "2"]
    assert main(watch) == 0
    assert main(watch) == 0  # a restarted watcher publishes nothing again
    check("butler-watch-by-shard")
    state = json.loads(state_file.read_text())
    assert state["routing"] == {"schema_version": 3, "shardNside": 128, "shardMargin": 9.0}
    assert {int(v): s for v, s in state["shards"].items()} == \
        {v: list(f.shards) for v, f in expected.items()}
