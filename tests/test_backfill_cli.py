"""The command line end to end: simulate, backfill, snapshot, status, retract, bad input."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from streamstars.cli import main
from streamstars.io.snapshot_files import compare_snapshots, read_snapshot
from streamstars.simulate import simulate_survey
from streamstars.state import StateDirectory

N_VISITS = 6


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pristine")
    simulate_survey(out, n_visits=N_VISITS, seed=21, sources_per_visit=800, write_refcat=False)
    return out


@pytest.fixture
def repo(pristine: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "repo"
    shutil.copytree(pristine, copy)
    return copy


def source_files(repo: Path) -> list[Path]:
    return sorted(repo.glob("sourceTable_visit*.parquet"))


def rewrite(path: Path, change: Callable[[pa.Table], pa.Table]) -> None:
    table = pq.read_table(path)
    pq.write_table(change(table), path)


def set_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, values)


def visit_of(path: Path) -> int:
    return int(pq.read_table(path, columns=["visit"]).column(0)[0].as_py())


def test_backfill_snapshot_status_end_to_end(repo: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    state, out = tmp_path / "state", tmp_path / "snap"
    assert main(["backfill", str(repo), "--state", str(state), "--no-progress"]) == 0
    summary = capsys.readouterr().out
    assert f"{N_VISITS} applied" in summary and "0 failed" in summary
    assert main(["snapshot", str(out), "--state", str(state)]) == 0
    assert "stars" in capsys.readouterr().out
    for name in ("fgcmVisitCatalog.fits", "fgcmStarObservations.fits", "fgcmStarIds.fits",
                 "fgcmStarIndices.fits", "fgcm_star_observations.parquet",
                 "fgcm_star_ids.parquet", "fgcmVisitCatalog.parquet"):
        assert (out / name).is_file(), name
    catalogs = read_snapshot(out)
    assert len(catalogs.visits["visit"]) == N_VISITS
    assert len(catalogs.stars["fgcm_id"]) > 50
    assert catalogs.stars["n_obs"].sum() == len(catalogs.observations["source_id"])
    assert main(["status", "--state", str(state), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["visits"] == N_VISITS

    # resumable: a second run reads nothing and changes nothing
    assert main(["backfill", str(repo), "--state", str(state), "--no-progress"]) == 0
    assert f"{N_VISITS} skipped" in capsys.readouterr().out
    assert main(["snapshot", str(tmp_path / "again"), "--state", str(state)]) == 0
    assert compare_snapshots(out, tmp_path / "again") == []


def test_retract_command_removes_the_visit(repo: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert main(["backfill", str(repo), "--state", str(state), "--no-progress"]) == 0
    gone = visit_of(source_files(repo)[0])
    assert main(["retract", str(gone), "--state", str(state)]) == 0
    with StateDirectory.open(state, readonly=True) as store:
        assert gone not in store.applied_visits()
        assert len(store.applied_visits()) == N_VISITS - 1


def test_changed_visit_needs_replace(repo: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    assert main(["backfill", str(repo), "--state", str(state), "--no-progress"]) == 0
    path = source_files(repo)[1]
    rewrite(path, lambda t: t.slice(0, t.num_rows // 2))
    assert main(["backfill", str(repo), "--state", str(state), "--no-progress"]) == 1
    assert "--replace" in capsys.readouterr().err
    assert main(["backfill", str(repo), "--state", str(state), "--no-progress",
                 "--replace"]) == 0
    assert "1 replaced" in capsys.readouterr().out


# Rows with non-finite or out-of-range coordinates are dropped and counted, not a failure of
# the visit (as in fgcmcal): tests/test_hostile_ingest.py.
BAD_INPUTS: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
                  "truncated or not parquet"),
    "not_parquet": (lambda p: p.write_text("visit,ra,dec\n1,2,3\n"), "not parquet"),
    "missing_column": (lambda p: rewrite(p, lambda t: t.drop_columns(["extendedness"])),
                       "extendedness"),
    "wrong_dtype": (lambda p: rewrite(p, lambda t: set_column(
        t, "ra", pa.array([str(v) for v in t.column("ra").to_pylist()]))), "ra"),
    "empty_visit": (lambda p: rewrite(p, lambda t: t.slice(0, 0)), "no rows"),
    "duplicate_source_ids": (lambda p: rewrite(p, lambda t: set_column(
        t, "sourceId", pa.array(np.repeat(t.column("sourceId").to_numpy()[:1], t.num_rows)))),
        "duplicate"),
    "no_metadata": (lambda p: rewrite(p, lambda t: set_column(
        t, "visit", pa.array(np.full(t.num_rows, 999_999_999, dtype=np.int64)))),
        "no visit metadata"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_visit_fails_alone_and_clearly(case: str, repo: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    damage, cause = BAD_INPUTS[case]
    bad = source_files(repo)[2]
    bad_visit = visit_of(bad)
    damage(bad)
    state = tmp_path / "state"
    assert main(["backfill", str(repo), "--state", str(state), "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert cause in captured.err
    # the message names the file or the visit
    assert any(name in captured.err for name in (bad.name, str(bad_visit), "999999999"))
    assert f"{N_VISITS - 1} applied" in captured.out
    with StateDirectory.open(state, readonly=True) as store:
        assert len(store.applied_visits()) == N_VISITS - 1


def test_mixed_visits_in_one_file_fail_those_visits(repo: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    first, second = source_files(repo)[:2]
    mixed = pa.concat_tables([pq.read_table(first), pq.read_table(second)])
    pq.write_table(mixed, first)
    second.unlink()
    state = tmp_path / "state"
    assert main(["backfill", str(repo), "--state", str(state), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "mixed visits" in err
    with StateDirectory.open(state, readonly=True) as store:
        assert len(store.applied_visits()) == N_VISITS - 2


def test_state_of_another_format_version_is_refused(repo: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    assert main(["backfill", str(repo), "--state", str(state), "--no-progress"]) == 0
    manifest = json.loads((state / "manifest.json").read_text())
    manifest["format_version"] = 999
    (state / "manifest.json").write_text(json.dumps(manifest))
    assert main(["backfill", str(repo), "--state", str(state), "--no-progress"]) == 2
    assert "format version 999" in capsys.readouterr().err


def test_incompatible_config_is_refused(repo: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    assert main(["backfill", str(repo), "--state", str(state), "--no-progress"]) == 0
    config = tmp_path / "c.toml"
    config.write_text('primaryBands = ["r", "i"]\nmatchRadius = 0.5\n')
    assert main(["backfill", str(repo), "--state", str(state), "--config", str(config),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "incompatible configuration" in err and "matchRadius" in err
    # snapshot-time settings may change
    config.write_text('isolationRadius = 3.0\ndensityCutMaxPerPixel = 5\n')
    assert main(["snapshot", str(tmp_path / "s"), "--state", str(state), "--config",
                 str(config)]) == 0


def test_config_show_and_unknown_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show"]) == 0
    shown = capsys.readouterr().out
    assert "primaryBands" in shown and "[sourceSelector.signalToNoise]" in shown
    config = tmp_path / "c.toml"
    config.write_text(shown)
    assert main(["config", "show", "--config", str(config)]) == 0
    assert capsys.readouterr().out == shown
    config.write_text("[sourceSelector.signalToNoise]\nminimm = 5\n")
    assert main(["config", "show", "--config", str(config)]) == 2
    assert "sourceSelector.signalToNoise.minimm" in capsys.readouterr().err


def test_map_grows_when_full(repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import streamstars.state.environment as environment

    monkeypatch.setattr(environment, "INITIAL_MAP_SIZE", 64 * 1024)
    state = tmp_path / "state"
    assert main(["backfill", str(repo), "--state", str(state), "--no-progress"]) == 0
    with StateDirectory.open(state, readonly=True) as store:
        for _, pixel in store.shards():
            assert store.open_shard(pixel).env.info()["map_size"] > 64 * 1024
        assert len(store.applied_visits()) == N_VISITS


def test_prefetch_depth_does_not_change_the_catalogs(repo: Path, tmp_path: Path) -> None:
    for depth in ("1", "4"):
        state = tmp_path / f"state{depth}"
        assert main(["backfill", str(repo), "--state", str(state), "--no-progress",
                     "--prefetch", depth]) == 0
        assert main(["snapshot", str(tmp_path / f"snap{depth}"), "--state", str(state)]) == 0
    assert compare_snapshots(tmp_path / "snap1", tmp_path / "snap4") == []


def test_missing_or_empty_repository_is_an_error(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["backfill", str(tmp_path / "absent"), "--state", str(tmp_path / "s1"),
                 "--no-progress"]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert not (tmp_path / "s1").exists()
    (tmp_path / "empty").mkdir()
    assert main(["backfill", str(tmp_path / "empty"), "--state", str(tmp_path / "s2"),
                 "--no-progress"]) == 1
    assert "no source tables" in capsys.readouterr().err


def test_a_full_disk_stops_the_backfill_clearly_and_it_resumes(
        repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Writers write through the map, where a full disk would be a SIGBUS: a write transaction
    is only begun with enough free space, so a backfill stops with a clear error after the
    visits it could apply, and the next run goes on from there."""
    from streamstars.backfill import backfill
    from streamstars.config import BuildStarsConfig
    from streamstars.errors import DiskFullError

    state = tmp_path / "state"

    with StateDirectory.open(state, BuildStarsConfig()) as store:
        def fill_disk_after_two(result: object) -> None:
            if result.visit == sorted(map(visit_of, source_files(repo)))[1]:  # type: ignore[attr-defined]
                store.index.min_free_disk = 1 << 62

        assert store.index.env.flags()["writemap"]
        with pytest.raises(DiskFullError, match=r"nearly full .*\(nothing was written\)"):
            backfill(repo, store, progress=False, on_result=fill_disk_after_two)
        assert len(store.applied_visits()) == 2
    monkeypatch.setenv("STREAMSTARS_MIN_FREE_DISK_MB", str(1 << 40))
    assert main(["backfill", str(repo), "--state", str(state), "--no-progress"]) == 2
    assert "nearly full" in capsys.readouterr().err
    monkeypatch.setenv("STREAMSTARS_MIN_FREE_DISK_MB", "lots")
    assert main(["backfill", str(repo), "--state", str(state), "--no-progress"]) == 2
    assert "STREAMSTARS_MIN_FREE_DISK_MB must be a number" in capsys.readouterr().err
    monkeypatch.undo()  # space freed
    assert main(["backfill", str(repo), "--state", str(state), "--no-progress"]) == 0
    assert "2 skipped" in capsys.readouterr().out
    with StateDirectory.open(state, readonly=True) as store:
        assert not store.index.env.flags()["writemap"]  # readers map the file read-only
        assert not store.open_shard(store.shards()[0][1]).env.flags()["writemap"]
        assert len(store.applied_visits()) == N_VISITS


def test_backup_is_a_consistent_compact_store_taken_while_a_writer_works(
        repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``streamstars backup`` (another process) copies the last committed state while this
    process holds a write transaction that has emptied the observations of a shard; the copy
    is a complete state (same snapshot), compact, and refuses to overwrite anything."""
    import subprocess
    import sys

    from streamstars.state import Transaction

    state, backup = tmp_path / "state", tmp_path / "backup"
    assert main(["backfill", str(repo), "--state", str(state), "--no-progress"]) == 0
    with StateDirectory.open(state) as directory:
        pixel = directory.shards()[0][1]
        store = directory.shard_for_write(pixel)

        def body(txn: Transaction) -> None:
            txn.observations.clear()  # not committed
            done = subprocess.run(
                [sys.executable, "-m", "streamstars.cli", "backup", str(backup),
                 "--state", str(state)], capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            assert "backup:" in done.stdout
            raise RuntimeError("abort the writer's transaction")

        with pytest.raises(RuntimeError, match="abort"):
            store.write(body)
    assert main(["snapshot", str(tmp_path / "snap-state"), "--state", str(state)]) == 0
    assert main(["snapshot", str(tmp_path / "snap-backup"), "--state", str(backup)]) == 0
    assert compare_snapshots(tmp_path / "snap-state", tmp_path / "snap-backup") == []
    # the writer's data.mdb is sparse and as large as the map; the copy holds the data only
    shard = Path("shards") / str(directory.shard_order) / str(pixel) / "data.mdb"
    assert (backup / shard).stat().st_size < (state / shard).stat().st_size
    with StateDirectory.open(backup, readonly=True) as copy:
        assert len(copy.applied_visits()) == N_VISITS
    capsys.readouterr()
    assert main(["backup", str(backup), "--state", str(state)]) == 2
    assert "not an empty directory" in capsys.readouterr().err


def test_snapshot_of_a_store_without_any_star(tmp_path: Path) -> None:
    # one visit: observations but no star (minPerBand 2 needs a second visit of the band)
    simulate_survey(tmp_path / "one", n_visits=1, seed=1, sources_per_visit=500)
    assert main(["backfill", str(tmp_path / "one"), "--state", str(tmp_path / "s"),
                 "--no-progress"]) == 0
    assert main(["snapshot", str(tmp_path / "snap"), "--state", str(tmp_path / "s")]) == 0
    catalogs = read_snapshot(tmp_path / "snap")
    assert len(catalogs.stars["fgcm_id"]) == 0
    assert len(catalogs.observations["source_id"]) == 0
    assert len(catalogs.visits["visit"]) == 1
