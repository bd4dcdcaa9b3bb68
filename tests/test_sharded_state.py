"""The state directory of sky shards: layout, configuration, refusals, a visit applied,
replaced and retracted across shards, crashes between two shards' commits (real stores, real
processes, SIGKILL)."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from file_helpers import copy_state, tree_digest

from streamstars.cli import main
from streamstars.config import BuildStarsConfig, derived_shard_margin
from streamstars.errors import ConfigError, ShardError, StateError
from streamstars.ingest import (
    ENV_KILL_AFTER_SHARD_COMMITS,
    PreparedVisit,
    VisitInput,
    apply_prepared,
    content_hash,
    prepare_visit,
    retract_visit,
    route_visit,
)
from streamstars.io.discover import discover_repo
from streamstars.io.snapshot_files import compare_snapshots
from streamstars.sharded_snapshot import write_state_snapshot
from streamstars.shards import home_shard, observation_vectors, touches
from streamstars.simulate import simulate_survey
from streamstars.sky import pixels_of
from streamstars.state import StateDirectory

N_VISITS = 8
#: shards of 0.92 deg: the simulated 1-degree field spreads over several of them
NSIDE = 64
CONFIG = BuildStarsConfig(shardNside=NSIDE)
#: LMDB's lock files, which readers write too
LOCKS = ("lock.mdb",)


@pytest.fixture(scope="module")
def survey(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sharded") / "R"
    simulate_survey(out, n_visits=N_VISITS, seed=17, sources_per_visit=2500,
                    write_refcat=False)
    return out


@pytest.fixture(scope="module")
def prepared(survey: Path) -> list[PreparedVisit]:
    inventory = discover_repo(survey)
    return [prepare_visit(VisitInput(v, d.source_paths, d.metadata), CONFIG)  # type: ignore[arg-type]
            for v, d in sorted(inventory.visits.items())]


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "shards.toml"
    path.write_text(f"shardNside = {NSIDE}\n")
    return path


def cli(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``streamstars`` as a real process."""
    return subprocess.run([sys.executable, "-m", "streamstars.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def shard_contents(state: Path) -> dict[int, dict[str, object]]:
    """What each shard stores: its (visit, sourceId) pairs (sorted, with repetitions: a row
    stored twice shows) and its visit records."""
    out: dict[int, dict[str, object]] = {}
    with StateDirectory.open(state, readonly=True) as directory:
        for _, pixel in directory.shards():
            store = directory.open_shard(pixel)
            found: list[tuple[int, int]] = []
            with store.read() as txn:
                for record in txn.observations.scan():
                    cols = record.columns(frozenset({"visit", "source_id"}))
                    found.extend(zip(cols["visit"].tolist(), cols["source_id"].tolist(),
                                     strict=True))
                pairs = sorted(found)
                visits = {v: (r.n_selected, r.core_selected, tuple(r.shards or ()),
                              r.content_hash) for v, r in txn.visits.items()}
            out[pixel] = {"observations": pairs, "visits": visits}
    return out


def apply_all(state: Path, visits: list[PreparedVisit], order: list[int] | None = None) -> None:
    with StateDirectory.open(state, CONFIG) as directory:
        for i in order if order is not None else range(len(visits)):
            apply_prepared(directory, visits[i], references=None)


@pytest.fixture(scope="module")
def applied(prepared: list[PreparedVisit], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every visit applied in order, once for the module: a test that needs this state works
    on its own copy (:func:`copy_state`)."""
    state = tmp_path_factory.mktemp("applied") / "S"
    apply_all(state, prepared)
    return state


def snapshot(state: Path, out: Path) -> Path:
    with StateDirectory.open(state, readonly=True) as directory:
        write_state_snapshot(directory, out)
    return out


def assert_same_catalogs(a: Path, b: Path) -> None:
    # the shards' generations (their stores' instances) differ between two states
    diffs = compare_snapshots(a, b, ignore_metadata_keys={"created"},
                              ignore_manifest_keys=("shards",))
    assert not diffs, f"{len(diffs)} difference(s), first: {diffs[0][:2000]}"


# ---------------------------------------------------------------------------------------------
# layout and settings
# ---------------------------------------------------------------------------------------------
def test_layout_manifest_and_shard_identity(prepared: list[PreparedVisit],
                                            tmp_path: Path, applied: Path) -> None:
    state = tmp_path / "S"
    copy_state(applied, state)
    manifest = json.loads((state / "manifest.json").read_text())
    assert manifest["format"] == "streamstars-state" and manifest["format_version"] == 2
    assert manifest["shardNside"] == NSIDE and manifest["shardMargin"] == 9.0
    assert manifest["config"]["shardMargin"] == 9.0
    assert manifest["association_fingerprint"]["shardNside"] == NSIDE
    assert manifest["association_fingerprint"]["referenceCCD"] == 40
    assert (state / "index" / "data.mdb").is_file()
    with StateDirectory.open(state, readonly=True) as directory:
        shards = directory.shards()
        assert len(shards) >= 3, shards
        assert all(order == 6 for order, _ in shards)
        instances = set()
        for order, pixel in shards:
            assert (state / "shards" / str(order) / str(pixel) / "data.mdb").is_file()
            store = directory.open_shard(pixel)
            assert store.shard == {"order": 6, "pixel": pixel, "nside": NSIDE, "margin": 9.0}
            instances.add(store.instance)
            assert store.generation()[0] == store.instance
        assert len(instances) == len(shards)
        # every visit is recorded in its shards (index and shards agree)
        for record in directory.index_records():
            assert record.status == "applied"
            for pixel in record.shards:
                with directory.open_shard(pixel).read() as txn:
                    assert txn.visits.get(record.visit) is not None


def test_each_row_is_stored_in_its_core_shard_and_the_shards_within_the_margin(
        prepared: list[PreparedVisit], tmp_path: Path) -> None:
    state = tmp_path / "S"
    apply_all(state, prepared[:3])
    contents = shard_contents(state)
    margin = CONFIG.shardMargin
    for visit in prepared[:3]:
        obs = visit.observations
        v = observation_vectors(obs["ra"], obs["dec"])
        core = pixels_of(v, NSIDE)
        for pixel, content in contents.items():
            stored = {s for (vis, s) in content["observations"]  # type: ignore[attr-defined]
                      if vis == visit.visit}
            here = np.isin(obs["source_id"], list(stored))
            # everything in the core, nothing farther than the routing radius
            assert np.all(here[core == pixel])
            far = ~touches(v, np.full(len(v), pixel), NSIDE, margin + 0.5)
            assert not np.any(here & far)
            # and everything within the margin (minus the rim's slack)
            near = touches(v, np.full(len(v), pixel), NSIDE, margin - 0.5)
            assert np.all(here[near])
        # each row has exactly one core: the core counts add up to the visit's selection
        counts = [c["visits"][visit.visit][1] for c in contents.values()  # type: ignore[index]
                  if visit.visit in c["visits"]]  # type: ignore[operator]
        assert sum(counts) == len(obs["source_id"])


def test_the_default_margin_is_derived_and_the_rules_are_checked() -> None:
    assert BuildStarsConfig().shardNside == 32
    assert BuildStarsConfig().shardMargin == 9.0  # 2 + (4 + 3) x 1
    wide = BuildStarsConfig(matchRadius=2.0, isolationRadius=4.0, primaryBands=("r", "i"))
    assert wide.shardMargin == derived_shard_margin(wide) == 4.0 + 5 * 2.0
    with pytest.raises(ConfigError, match=r"shardMargin \(7 arcsec\) must be at least"):
        BuildStarsConfig(shardMargin=7.0)
    with pytest.raises(ConfigError, match="shardNside .256. must be at most densityCutNside"):
        BuildStarsConfig(shardNside=256)
    with pytest.raises(ConfigError, match="smaller than a quarter of a shard"):
        BuildStarsConfig(shardNside=128, densityCutNside=1024, shardMargin=450.0)
    with pytest.raises(ConfigError, match="shardNside must be a power of two"):
        BuildStarsConfig(shardNside=48)
    assert "shardMargin = 9.0" in BuildStarsConfig().to_toml()


def test_config_show_prints_the_derived_margin(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.toml"
    config.write_text("matchRadius = 0.5\n")
    assert main(["config", "show", "--config", str(config)]) == 0
    shown = capsys.readouterr().out
    assert "shardNside = 32" in shown and "shardMargin = 5.5" in shown  # 2 + 7 x 0.5


@pytest.mark.parametrize(("text", "key"), [(f"shardNside = {NSIDE * 2}\n", "shardNside"),
                                           (f"shardNside = {NSIDE}\nshardMargin = 12.0\n",
                                            "shardMargin"),
                                           (f"shardNside = {NSIDE}\nreferenceCCD = 3\n",
                                            "referenceCCD")])
def test_a_state_refuses_other_shard_settings_naming_the_key(
        text: str, key: str, survey: Path, applied: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "S"
    copy_state(applied, state)
    before = tree_digest(state, skip_names=LOCKS)
    other = tmp_path / "other.toml"
    other.write_text(text)
    assert main(["backfill", str(survey), "--state", str(state), "--config", str(other),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "incompatible configuration" in err and f"{key}: stored" in err
    assert tree_digest(state, skip_names=LOCKS) == before


def test_a_format_1_store_is_refused_with_the_rebuild_advice(
        survey: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Today's single LMDB directory (format version 1), as an earlier streamstars left it."""
    state = tmp_path / "old"
    env = lmdb.open(str(state), max_dbs=16)
    meta, visits = env.open_db(b"meta"), env.open_db(b"visits")
    with env.begin(write=True) as txn:
        txn.put(b"format_version", b"1", db=meta)
        txn.put(b"config", json.dumps({}).encode(), db=meta)
        txn.put(b"k", b"v", db=visits)
    env.close()
    before = tree_digest(state, skip_names=LOCKS)
    for command in (["backfill", str(survey), "--state", str(state), "--no-progress"],
                    ["status", "--state", str(state)],
                    ["snapshot", str(tmp_path / "snap"), "--state", str(state)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "format version 1" in err, err
        assert "rebuild it with `streamstars backfill` into a new directory" in err
    assert tree_digest(state, skip_names=LOCKS) == before
    assert not (tmp_path / "snap").exists()


def test_a_second_writer_is_refused_and_readers_are_not(tmp_path: Path) -> None:
    with StateDirectory.open(tmp_path / "S", CONFIG):
        with pytest.raises(StateError, match="another streamstars process is writing"):
            StateDirectory.open(tmp_path / "S", CONFIG)
        # a reader in another process (LMDB allows one environment handle per process)
        done = cli("status", "--state", tmp_path / "S", "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["shards"] == 0
        done = cli("retract", "1", "--state", tmp_path / "S")
        assert done.returncode == 2 and "another streamstars process is writing" in done.stderr


# ---------------------------------------------------------------------------------------------
# missing and damaged shards
# ---------------------------------------------------------------------------------------------
def test_a_missing_shard_directory_is_named_and_nothing_is_written(
        prepared: list[PreparedVisit], survey: Path, config_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], applied: Path) -> None:
    state = tmp_path / "S"
    copy_state(applied, state)
    with StateDirectory.open(state, readonly=True) as directory:
        order, pixel = directory.shards()[1]
    shutil.rmtree(state / "shards" / str(order) / str(pixel))
    before = tree_digest(state, skip_names=LOCKS)
    for command in (["status", "--state", str(state)],
                    ["backfill", str(survey), "--state", str(state), "--config",
                     str(config_file), "--no-progress"],
                    ["retract", str(prepared[0].visit), "--state", str(state)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert f"1 shard(s) of {state} that hold data are missing: {order}/{pixel}" in err, err
    assert tree_digest(state, skip_names=LOCKS) == before
    with pytest.raises(ShardError, match=f"{order}/{pixel}"):
        StateDirectory.open(state, readonly=True)


def test_a_corrupt_shard_is_named_and_the_other_shards_are_untouched(
        prepared: list[PreparedVisit], tmp_path: Path) -> None:
    state = tmp_path / "S"
    apply_all(state, prepared[:-1])
    last = route_visit(prepared[-1], NSIDE, CONFIG.shardMargin)
    assert len(last.shards) >= 2
    broken = last.shards[-1]
    with StateDirectory.open(state, readonly=True) as directory:
        path = directory.shard_path(broken)
        assert directory.has_shard(broken)
        # a visit stored in the broken shard (and in others)
        holder = next(r.visit for r in directory.index_records()
                      if broken in r.shards and len(r.shards) >= 2)
    data = path / "data.mdb"
    data.write_bytes(b"\0garbage" * 1000)
    before = tree_digest(state, skip_names=LOCKS)
    with StateDirectory.open(state, CONFIG) as directory:
        with pytest.raises(ShardError, match=f"shard 6/{broken} of .* cannot be"):
            apply_prepared(directory, prepared[-1], references=None)
        with pytest.raises(ShardError, match=f"shard 6/{broken}"):
            retract_visit(directory, holder)
    # no other shard and not the index was written
    assert tree_digest(state, skip_names=LOCKS) == before


def test_a_shard_of_another_place_is_refused(prepared: list[PreparedVisit],
                                             tmp_path: Path) -> None:
    state = tmp_path / "S"
    apply_all(state, prepared[:2])
    with StateDirectory.open(state, readonly=True) as directory:
        (_, a), (_, b) = directory.shards()[:2]
        pa_, pb = directory.shard_path(a), directory.shard_path(b)
    shutil.rmtree(pb)
    shutil.copytree(pa_, pb)
    with StateDirectory.open(state, readonly=True) as directory, \
            pytest.raises(ShardError, match=f"should hold the sky shard .*\"pixel\": {b}"):
        directory.open_shard(b)


# ---------------------------------------------------------------------------------------------
# one visit across shards: home shard, replace, retract, order
# ---------------------------------------------------------------------------------------------
def test_a_visit_with_no_selected_row_is_recorded_in_its_home_shard(
        survey: Path, config_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "R"
    shutil.copytree(survey, repo)
    path = sorted(repo.glob("sourceTable_visit*.parquet"))[2]
    table = pq.read_table(path)
    visit = int(table.column("visit")[0].as_py())
    field = table.schema.field("extendedness")
    table = table.set_column(table.schema.get_field_index("extendedness"), field,
                             pa.array(np.ones(table.num_rows), type=field.type))
    pq.write_table(table, path)  # every source a galaxy: nothing selected
    state = tmp_path / "S"
    assert main(["backfill", str(repo), "--state", str(state), "--config", str(config_file),
                 "--no-progress"]) == 0
    assert f"{N_VISITS} applied" in capsys.readouterr().out
    metadata = discover_repo(repo).visits[visit].metadata
    assert metadata is not None
    home = home_shard(metadata.telra, metadata.teldec, NSIDE)
    with StateDirectory.open(state, readonly=True) as directory:
        record = directory.visit_record(visit)
        assert record is not None and record.shards == [home] and record.n_selected == 0
        with directory.open_shard(home).read() as txn:
            stored = txn.visits.get(visit)
        assert stored is not None
        assert stored.n_selected == 0 and stored.pixels == [] and stored.shards == [home]
        assert stored.n_sources == table.num_rows
    out = snapshot(state, tmp_path / "snap")
    visits = pq.read_table(out / "fgcmVisitCatalog.parquet").column("visit").to_pylist()
    assert visit in visits and len(visits) == N_VISITS


def _shifted(visit: PreparedVisit, degrees: float) -> PreparedVisit:
    """The same visit with every observation moved ``degrees`` in RA (other shards)."""
    obs = dict(visit.observations)
    obs["ra"] = (obs["ra"] + degrees) % 360.0
    return dataclasses.replace(visit, observations=obs,
                               content_hash=content_hash(obs, visit.metadata, visit.band))


def test_replace_moves_a_visit_across_shards_and_retract_removes_it_everywhere(
        prepared: list[PreparedVisit], tmp_path: Path, applied: Path) -> None:
    moved = _shifted(prepared[3], 2.5)
    old_shards = set(route_visit(prepared[3], NSIDE, CONFIG.shardMargin).shards)
    new_shards = set(route_visit(moved, NSIDE, CONFIG.shardMargin).shards)
    home = home_shard(moved.metadata.telra, moved.metadata.teldec, NSIDE)
    assert (old_shards - {home}) and not ((old_shards - {home}) & (new_shards - {home}))

    state = tmp_path / "S"
    copy_state(applied, state)
    with StateDirectory.open(state, CONFIG) as directory:
        result = apply_prepared(directory, moved, replace=True, references=None)
        assert result.status == "replaced"
        record = directory.visit_record(moved.visit)
        assert record is not None and set(record.shards) == new_shards
        assert record.status == "applied" and not record.old_shards
    # the same shards' contents as a state that only ever had the moved version
    clean = tmp_path / "clean"
    apply_all(clean, [*prepared[:3], moved, *prepared[4:]])
    assert shard_contents(state) == shard_contents(clean)
    assert_same_catalogs(snapshot(state, tmp_path / "a"), snapshot(clean, tmp_path / "b"))

    # retracted: gone from every shard; the same as a state without it
    with StateDirectory.open(state, CONFIG) as directory:
        assert retract_visit(directory, moved.visit).status == "retracted"
        assert directory.visit_record(moved.visit) is None
        assert retract_visit(directory, moved.visit).status == "absent"
    without = tmp_path / "without"
    apply_all(without, [*prepared[:3], *prepared[4:]])
    contents = shard_contents(state)
    for content in contents.values():
        assert moved.visit not in content["visits"]  # type: ignore[operator]
    expected = shard_contents(without)
    assert {p: c for p, c in contents.items() if c["visits"]} == \
        {p: c for p, c in expected.items() if c["visits"]}
    assert_same_catalogs(snapshot(state, tmp_path / "c"), snapshot(without, tmp_path / "d"))


def test_random_visit_orders_give_the_same_shards_and_catalogs(
        prepared: list[PreparedVisit], tmp_path: Path, applied: Path) -> None:
    rng = random.Random(3)
    reference = tmp_path / "in-order"
    copy_state(applied, reference)
    expected = shard_contents(reference)
    expected_snap = snapshot(reference, tmp_path / "snap-in-order")
    for k in range(2):
        order = list(range(len(prepared)))
        rng.shuffle(order)
        state = tmp_path / f"shuffled{k}"
        apply_all(state, prepared, order)
        assert shard_contents(state) == expected
        assert_same_catalogs(expected_snap, snapshot(state, tmp_path / f"snap{k}"))


def test_the_sharded_snapshot_equals_one_store(prepared: list[PreparedVisit],
                                             tmp_path: Path, applied: Path) -> None:
    """The per-shard snapshot of several shards equals the snapshot of one store holding every
    visit (the single-store computation the shards must agree with)."""
    from streamstars.snapshot import write_store_snapshot
    from streamstars.state import StarStore

    state = tmp_path / "S"
    copy_state(applied, state)
    with StarStore.open(tmp_path / "one", CONFIG) as store:
        for visit in prepared:
            apply_prepared(store, visit, references=None)
        write_store_snapshot(store, tmp_path / "one-snap")
    # the flat files are the same; the sharded snapshot adds its HATS catalog and manifest keys
    diffs = [d for d in compare_snapshots(
        tmp_path / "one-snap", snapshot(state, tmp_path / "snap"),
        ignore_metadata_keys={"created"},
        ignore_manifest_keys=("partitions", "shards", "reuse_key", "margin_violations"))
        if not d.startswith("fgcm_stars")]
    assert diffs == []


def test_status_counts_shards_and_margin_copies(prepared: list[PreparedVisit], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                applied: Path) -> None:
    state = tmp_path / "S"
    copy_state(applied, state)
    assert main(["status", "--state", str(state), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    selected = sum(len(v.observations["source_id"]) for v in prepared)
    assert status["visits"] == N_VISITS and status["observations"] == selected
    assert status["shard_nside"] == NSIDE and status["shard_margin"] == 9.0
    assert status["shards"] == len(status["shard_counts"]) >= 3
    counts = status["shard_counts"].values()
    assert sum(c["core_observations"] for c in counts) == selected
    assert status["observations_stored"] == sum(c["observations_stored"] for c in counts)
    assert status["observations_stored"] > selected  # some rows are near a border
    assert 0 < status["margin_fraction"] < 0.2
    assert status["visits_incomplete"] == []


def test_backup_holds_every_shard_and_restores_the_same_catalogs(
        prepared: list[PreparedVisit], tmp_path: Path, applied: Path) -> None:
    state = tmp_path / "S"
    copy_state(applied, state)
    assert main(["backup", str(tmp_path / "B"), "--state", str(state)]) == 0
    assert shard_contents(tmp_path / "B") == shard_contents(state)
    assert_same_catalogs(snapshot(state, tmp_path / "a"), snapshot(tmp_path / "B", tmp_path / "b"))


# ---------------------------------------------------------------------------------------------
# a crash between two shards' commits
# ---------------------------------------------------------------------------------------------
def _incomplete(state: Path) -> list[int]:
    with StateDirectory.open(state, readonly=True) as directory:
        return [r.visit for r in directory.index_records() if r.status != "applied"]


@pytest.mark.parametrize("workers", [1, 2])
def test_sigkill_between_two_shard_commits_then_resume_loses_and_doubles_nothing(
        workers: int, survey: Path, config_file: Path, applied: Path, tmp_path: Path) -> None:
    """The backfill SIGKILLs itself (or a worker does) right after its N-th shard commit, N
    chosen to fall inside multi-shard visits; each rerun completes the interrupted visit
    (every shard that already holds it skips it) and goes on.  The shards end holding exactly
    what a clean run's hold."""
    clean = applied
    state = tmp_path / "S"
    interrupted = []
    for kill_at in (2, 3, 5):
        done = cli("backfill", survey, "--state", state, "--config", config_file,
                   "--no-progress", "--workers", workers,
                   env={ENV_KILL_AFTER_SHARD_COMMITS: str(kill_at)})
        assert done.returncode != 0, done.stdout
        if workers == 1:
            assert done.returncode == -9, done.stderr
        else:
            assert done.returncode == 2 and "backfill worker" in done.stderr, done.stderr
        interrupted += _incomplete(state)
    assert interrupted, "no kill fell between two shards' commits of a visit"
    done = cli("backfill", survey, "--state", state, "--config", config_file, "--no-progress",
               "--workers", workers)
    assert done.returncode == 0, done.stderr
    assert _incomplete(state) == []
    assert shard_contents(state) == shard_contents(clean)
    assert_same_catalogs(snapshot(clean, tmp_path / "a"), snapshot(state, tmp_path / "b"))


# ---------------------------------------------------------------------------------------------
# parallel backfill
# ---------------------------------------------------------------------------------------------
def test_workers_1_and_2_give_the_same_shards_and_catalogs(survey: Path, config_file: Path,
                                                           tmp_path: Path) -> None:
    """Two worker processes (each owning some shards, reading half the visits) leave every
    shard holding exactly what one process leaves, and the same catalogs; a second run over
    the same repository skips everything."""
    states = {}
    for workers in (1, 2):
        state = tmp_path / f"w{workers}"
        done = cli("backfill", survey, "--state", state, "--config", config_file,
                   "--no-progress", "--workers", workers)
        assert done.returncode == 0, done.stderr
        assert f"backfill: {N_VISITS} applied, 0 replaced, 0 skipped" in done.stdout, done.stdout
        states[workers] = state
    one, two = shard_contents(states[1]), shard_contents(states[2])
    assert len(one) >= 3
    assert one == two
    with StateDirectory.open(states[1], readonly=True) as a, \
            StateDirectory.open(states[2], readonly=True) as b:
        assert a.index_records() == b.index_records()
    assert_same_catalogs(snapshot(states[1], tmp_path / "a"), snapshot(states[2], tmp_path / "b"))
    again = cli("backfill", survey, "--state", states[2], "--config", config_file,
                "--no-progress", "--workers", 2)
    assert again.returncode == 0, again.stderr
    assert "backfill: 0 applied" in again.stdout, again.stdout
    assert shard_contents(states[2]) == two
