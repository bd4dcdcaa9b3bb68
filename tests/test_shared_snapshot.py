"""The snapshot shared by the consumers of a group (streamstars/shared_snapshot.py): shard
partitions written by several state directories into one directory, never replaced by a copy
at lower offsets, and completed into a snapshot equal to ``streamstars snapshot --state``.

Real LMDB state directories fed with shard events (``apply_shard_event``, as a consumer in a
group applies them, with real Kafka offsets recorded per shard) from a simulated survey."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from consumer_helpers import run_cli

from streamstars.config import BuildStarsConfig
from streamstars.ingest import (
    KafkaOffset,
    VisitInput,
    apply_shard_event,
    prepare_visit,
    route_visit,
)
from streamstars.io.discover import discover_repo
from streamstars.io.snapshot_files import compare_snapshots
from streamstars.sharded_snapshot import write_state_snapshot
from streamstars.shared_snapshot import (
    SharedEntry,
    complete_shared_snapshot,
    entry_path,
    publish_partitions,
    read_entries,
    supersedes,
)
from streamstars.simulate import simulate_survey
from streamstars.state import StateDirectory

NSIDE = 64
TOPIC = "visits"
#: provenance and manifest entries that differ between a snapshot of a state and one completed
#: from partitions (its "partitions" count what is new since the previous completion)
IGNORE = ("created",)
IGNORE_MANIFEST = ("shards", "partitions")


@pytest.fixture(scope="module")
def events(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[object, int, list[int]]]:
    """(prepared visit, shard, footprint) of every shard event of an 8-visit survey, in
    publication order (one partition: the event's index is its offset)."""
    repo = tmp_path_factory.mktemp("data") / "repo"
    simulate_survey(repo, n_visits=8, seed=5, sources_per_visit=1000, write_refcat=False)
    config = BuildStarsConfig(shardNside=NSIDE)
    out = []
    for v in sorted(discover_repo(repo).visits.values(), key=lambda v: v.visit):
        prepared = prepare_visit(VisitInput(v.visit, v.source_paths, v.metadata), config)
        shards = sorted(route_visit(prepared, NSIDE, config.shardMargin).shards)
        out += [(prepared, s, shards) for s in shards]
    return out


def _state(path: Path, events: list[tuple[object, int, list[int]]], upto: int) -> Path:
    """A state directory that applied the first ``upto`` events (offsets 0..upto-1)."""
    with StateDirectory.open(path, BuildStarsConfig(shardNside=NSIDE)) as state:
        for offset, (prepared, shard, footprint) in enumerate(events[:upto]):
            apply_shard_event(state, prepared, shard, footprint, replace=False,  # type: ignore[arg-type]
                              kafka_offset=KafkaOffset(TOPIC, 0, offset + 1))
    return path


def _publish(state: Path, shared: Path):  # type: ignore[no-untyped-def]
    with StateDirectory.open(state, readonly=True) as directory:
        return publish_partitions(directory, shared, provenance={"kafka_topic": TOPIC})


def _tokens(shared: Path) -> dict[str, str]:
    return {name: e.token for name, e in read_entries(shared).items()}


def test_a_stale_copy_never_replaces_a_newer_partition(
        events: list[tuple[object, int, list[int]]], tmp_path: Path) -> None:
    """A (every event) writes first; B, a copy behind A on the shards the last visit touched
    (as a consumer that lost the partition), writes nothing over them; the completion is A's
    snapshot.  B caught up to A's offsets replaces nothing either (same events, same data);
    B past A replaces A's entries."""
    n = len(events)
    last_visit_shards = {s for p, s, _ in events if p is events[-1][0]}  # type: ignore[attr-defined]
    upto = n - len(last_visit_shards)
    a = _state(tmp_path / "A", events, n)
    b = _state(tmp_path / "B", events, upto)
    shared = tmp_path / "shared"

    first = _publish(a, shared)
    assert first.written and not first.behind and first.unchanged == 0
    tokens = _tokens(shared)
    assert len(tokens) == len(first.written)
    stale = _publish(b, shared)
    assert not stale.written, "no shard of the stale state may replace A's copies"
    order = 6  # log2(NSIDE)
    behind = {f"{order}/{s}" for s in last_visit_shards}
    assert set(stale.behind) == behind  # behind on the last visit's shards
    assert stale.unchanged == len(tokens) - len(behind)  # the others: same offsets
    assert _tokens(shared) == tokens, "an entry was replaced"

    snap = complete_shared_snapshot(shared, tmp_path / "completed")
    assert snap is not None and snap.written == len([e for e in read_entries(shared).values()
                                                     if e.raw["partition"]])
    with StateDirectory.open(a, readonly=True) as directory:
        write_state_snapshot(directory, tmp_path / "expected")
    assert not compare_snapshots(tmp_path / "completed", tmp_path / "expected",
                                 ignore_metadata_keys=IGNORE + ("kafka_topic",),
                                 ignore_manifest_keys=IGNORE_MANIFEST)
    # nothing changed: a second completion writes nothing
    assert complete_shared_snapshot(shared, tmp_path / "completed") is None

    # B catches up to A exactly: its copies are at the same offsets, nothing is replaced
    with StateDirectory.open(b) as state:
        for offset in range(upto, n):
            prepared, shard, footprint = events[offset]
            apply_shard_event(state, prepared, shard, footprint, replace=False,  # type: ignore[arg-type]
                              kafka_offset=KafkaOffset(TOPIC, 0, offset + 1))
    same = _publish(b, shared)
    assert not same.written and same.unchanged == len(tokens)
    assert _tokens(shared) == tokens


def test_a_copy_further_on_replaces_the_entry_and_the_old_files_go(
        events: list[tuple[object, int, list[int]]], tmp_path: Path) -> None:
    """B behind A writes first; A, further on, replaces B's entries of the shards it is ahead
    on (new tokens, the old tokens' files removed); the completion reuses the partitions it
    already had and equals A's snapshot."""
    n = len(events)
    last = {s for p, s, _ in events if p is events[-1][0]}  # type: ignore[attr-defined]
    a = _state(tmp_path / "A", events, n)
    b = _state(tmp_path / "B", events, n - len(last))
    shared = tmp_path / "shared"
    _publish(b, shared)
    before = _tokens(shared)
    assert complete_shared_snapshot(shared) is not None
    ahead = _publish(a, shared)
    assert {name.split("/")[1] for name in ahead.written} == {str(s) for s in last}
    after = _tokens(shared)
    for name, token in after.items():
        assert (token != before.get(name)) == (name in ahead.written)
        where = entry_path(shared, *map(int, name.split("/")))
        files = sorted(p.name for p in where.parent.glob(f"{where.stem}.*"))
        entry = json.loads(where.read_text())
        assert files == sorted([where.name, f"{where.stem}.{token}.visits.json"]
                               + ([f"{where.stem}.{token}.parquet"] if entry["partition"]
                                  else [])), files
    completed = complete_shared_snapshot(shared)
    assert completed is not None and completed.written >= 1 and completed.reused >= 1
    with StateDirectory.open(a, readonly=True) as directory:
        write_state_snapshot(directory, tmp_path / "expected")
    assert not compare_snapshots(shared / "snapshot", tmp_path / "expected",
                                 ignore_metadata_keys=IGNORE + ("kafka_topic",),
                                 ignore_manifest_keys=IGNORE_MANIFEST)
    # the operator's command: the same snapshot into another directory
    done = run_cli("snapshot", str(tmp_path / "cli"), "--from-partitions", str(shared))
    assert done.returncode == 0, done.stderr
    assert not compare_snapshots(tmp_path / "cli", shared / "snapshot",
                                 ignore_metadata_keys=IGNORE,
                                 ignore_manifest_keys=("partitions",))


def test_supersedes() -> None:
    """The replacement rule: further on every partition and past on one; same offsets only
    with other settings; without offsets, another generation."""
    def entry(offsets: dict[str, int], generation: list[object] | None = None,
              key: str = "k") -> SharedEntry:
        return SharedEntry(6, 1, "t", offsets, generation or ["i", 1], key)

    assert supersedes({"t/0": 5}, ["i", 2], "k", None)
    assert supersedes({"t/0": 6}, ["j", 9], "k", entry({"t/0": 5}))
    assert not supersedes({"t/0": 4}, ["j", 99], "k", entry({"t/0": 5}))  # stale
    assert not supersedes({"t/0": 5}, ["j", 99], "k", entry({"t/0": 5}))  # same events
    assert supersedes({"t/0": 5}, ["j", 99], "k2", entry({"t/0": 5}))  # new settings
    # past on one partition, behind on another: diverging copies, never replaced
    assert not supersedes({"t/0": 9, "t/1": 1}, ["j", 1], "k", entry({"t/0": 5, "t/1": 2}))
    assert not supersedes({}, ["j", 1], "k", entry({"t/0": 5}))
    assert supersedes({}, ["i", 2], "k", entry({}))
    assert not supersedes({}, ["i", 1], "k", entry({}))


def test_the_cli_refuses_mixed_sources_and_an_empty_shared_directory(tmp_path: Path) -> None:
    done = run_cli("snapshot", str(tmp_path / "out"), "--from-partitions", str(tmp_path / "s"),
                   "--state", str(tmp_path / "state"))
    assert done.returncode == 2 and "takes no --state" in done.stderr
    done = run_cli("snapshot", str(tmp_path / "out"), "--from-partitions", str(tmp_path / "s"))
    assert done.returncode == 2 and "holds no shard partitions" in done.stderr
    done = run_cli("snapshot", str(tmp_path / "out"))
    assert done.returncode == 2 and "--from-partitions" in done.stderr
    assert not (tmp_path / "out").exists()
