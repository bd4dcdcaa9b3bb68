"""Hostile input to ingest / backfill / the store: every case ends with a clear message or a
counted drop, never an aborted run, and nothing else is lost or doubled — the catalogs of the
other visits equal those of a clean run (compared snapshot to snapshot).

The survey is the issue's reproduction setting: 8 simulated visits of ~2000 sources, seed 1.
Commands run through ``streamstars.cli.main`` (real files, real LMDB stores) or as real
processes where signals, tracebacks, other users or mounts are involved.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from streamstars.cli import main
from streamstars.config import BuildStarsConfig
from streamstars.io.snapshot_files import compare_snapshots
from streamstars.io.sourcetable import read_source_table
from streamstars.select import cut_masks
from streamstars.simulate import simulate_survey
from streamstars.state import StateDirectory, Transaction

N_VISITS = 8
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pristine") / "R"
    simulate_survey(out, n_visits=N_VISITS, seed=1, sources_per_visit=2000, write_refcat=False)
    return out


@pytest.fixture
def repo(pristine: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "R"
    shutil.copytree(pristine, copy)
    return copy


def copy_repo(pristine: Path, dest: Path) -> Path:
    shutil.copytree(pristine, dest)
    return dest


def source_file(repo: Path, index: int) -> Path:
    """The source table of the ``index``-th visit (visit order)."""
    return sorted(repo.glob("sourceTable_visit*.parquet"))[index]


def visit_of(path: Path) -> int:
    return int(pq.read_table(path, columns=["visit"]).column(0)[0].as_py())


def selectable_rows(path: Path, config: BuildStarsConfig | None = None) -> np.ndarray:
    """Rows of a source table that pass every selection cut (file order)."""
    cfg = config or BuildStarsConfig()
    table = read_source_table(path, cfg)
    keep = np.ones(table.num_rows, dtype=bool)
    for mask in cut_masks(table, cfg).values():
        keep &= mask
    return np.flatnonzero(keep)


def set_rows(path: Path, column: str, rows: np.ndarray, value: Any) -> None:
    """Set ``column`` of ``rows`` of a parquet file to ``value`` (rewrites the file)."""
    table = pq.read_table(path)
    field = table.schema.field(column)
    values = table.column(column).to_numpy(zero_copy_only=False).copy()
    values[rows] = value
    table = table.set_column(table.schema.get_field_index(column), field,
                             pa.array(values, type=field.type))
    pq.write_table(table, path)


def set_visit_table(repo: Path, visit: int, column: str, value: Any) -> None:
    """Change one visit's row of ``visitTable.parquet``."""
    path = repo / "visitTable.parquet"
    table = pq.read_table(path)
    values = table.column(column).to_pylist()
    index = table.column("visit").to_pylist().index(visit)
    values[index] = value
    field = table.schema.field(column)
    table = table.set_column(table.schema.get_field_index(column), field,
                             pa.array(values, type=field.type))
    pq.write_table(table, path)


def backfill(repo: Path | str, state: Path, capsys: pytest.CaptureFixture[str],
             *extra: str) -> tuple[int, str, str]:
    code = main(["backfill", str(repo), "--state", str(state), "--no-progress", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def snapshot(state: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    assert main(["snapshot", str(out), "--state", str(state)]) == 0
    capsys.readouterr()
    return out


def clean_snapshot(pristine: Path, tmp: Path, capsys: pytest.CaptureFixture[str],
                   change: Callable[[Path], None], *extra: str) -> Path:
    """Snapshot of a clean run: a fresh copy of the survey changed by ``change`` (a visit left
    out, rows flagged bad ...), backfilled into a fresh store."""
    clean = copy_repo(pristine, tmp / "clean-repo")
    change(clean)
    code, _, err = backfill(clean, tmp / "clean-state", capsys, *extra)
    assert code == 0, err
    return snapshot(tmp / "clean-state", tmp / "clean-snap", capsys)


def assert_same(a: Path, b: Path) -> None:
    diffs = compare_snapshots(a, b)
    assert not diffs, f"{len(diffs)} difference(s), first: {diffs[0][:2000]}"


def records(state: Path) -> dict[int, dict[str, Any]]:
    """The visit records as the shards store them (their JSON; one per visit, see
    ``StateDirectory.visit_records``)."""
    with StateDirectory.open(state, readonly=True) as directory:
        return {r.visit: json.loads(r.to_json()) for r in directory.visit_records()}


def write_shard_records(state: Path, change: Callable[[Transaction], None]) -> None:
    """Run ``change`` in a write transaction of every shard of the state directory."""
    with StateDirectory.open(state) as directory:
        for _, pixel in directory.shards():
            directory.shard_for_write(pixel).write(change)


def cli(*args: str, env: dict[str, str] | None = None, **kw: Any
        ) -> subprocess.CompletedProcess[str]:
    """``streamstars`` as a real process."""
    return subprocess.run([sys.executable, "-m", "streamstars.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=300, **kw)


# ------------------------------------------------------------- 1: moved / re-addressed repo
def test_resume_after_moving_or_re_addressing_the_repository(
        pristine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The content hash covers content, not where files live: `backfill R` then
    `backfill $PWD/R`, and then the repository moved elsewhere, skip every visit."""
    monkeypatch.chdir(tmp_path)
    copy_repo(pristine, tmp_path / "R")
    state = tmp_path / "S"
    code, out, err = backfill("R", state, capsys)
    assert code == 0 and f"{N_VISITS} applied" in out, err
    first = snapshot(state, tmp_path / "snap1", capsys)

    code, out, err = backfill(tmp_path / "R", state, capsys)  # same files, absolute path
    assert code == 0, err
    assert f"{N_VISITS} skipped" in out and "0 failed" in out and "different content" not in err

    (tmp_path / "R").rename(tmp_path / "moved")
    code, out, err = backfill(tmp_path / "moved", state, capsys)
    assert code == 0, err
    assert f"{N_VISITS} skipped" in out and "0 failed" in out
    # the records follow the files: the next resume skips without reading anything
    code, out, err = backfill(tmp_path / "moved", state, capsys)
    assert code == 0 and f"{N_VISITS} skipped" in out and " 0 sources read" in out, out
    for record in records(state).values():
        assert all(p.startswith(str(tmp_path / "moved")) for p in record["source_paths"])
        assert record["metadata"]["source"].startswith(str(tmp_path / "moved"))
    assert_same(first, snapshot(state, tmp_path / "snap2", capsys))


# ------------------------------------------------------------- 2: band names the store cannot key
@pytest.mark.parametrize("band", ["wideband_x", "\u00ef"])
def test_a_band_name_the_store_cannot_key_fails_that_visit_alone(
        band: str, pristine: Path, repo: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    bad = visit_of(source_file(repo, 2))
    set_visit_table(repo, bad, "band", band)
    state = tmp_path / "S"
    for _ in range(2):  # and every rerun: the same single failure
        code, out, err = backfill(repo, state, capsys)
        assert code == 1, err
        assert f"FAILED visit {bad}: visit {bad}" in err and repr(band) in err
        assert "cannot be stored" in err and "1 failed" in out
    assert len(records(state)) == N_VISITS - 1
    clean = clean_snapshot(pristine, tmp_path, capsys,
                           lambda r: source_file(r, 2).unlink())
    assert_same(clean, snapshot(state, tmp_path / "snap", capsys))


@pytest.mark.parametrize("band", ["toolongband", "\u01f5"])
def test_a_physical_filter_map_band_the_store_cannot_key_is_refused_at_load(
        band: str, repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'physicalFilterMap = {{"r_57" = {json.dumps(band)}}}\n')
    code, out, err = backfill(repo, tmp_path / "S", capsys, "--config", str(config))
    assert code == 2
    assert "physicalFilterMap.r_57" in err and "streamstars: error:" in err
    assert not (tmp_path / "S").exists()


# ------------------------------------------------------------- 6: sourceIds reused across visits
def _reuse_ids(repo: Path, source: int, target: int) -> int:
    """Give the ``target``-th visit the sourceIds of the ``source``-th one (as many rows as
    both have); returns how many of the target's selectable rows got an id the source stores."""
    src_path, dst_path = source_file(repo, source), source_file(repo, target)
    src_ids = pq.read_table(src_path, columns=["sourceId"]).column(0).to_numpy()
    stored = src_ids[selectable_rows(src_path)]
    table = pq.read_table(dst_path)
    ids = table.column("sourceId").to_numpy().copy()
    n = min(len(ids), len(src_ids))
    ids[:n] = src_ids[:n]
    reused = int(np.isin(ids[selectable_rows(dst_path)], stored).sum())
    pq.write_table(table.set_column(table.schema.get_field_index("sourceId"), "sourceId",
                                    pa.array(ids)), dst_path)
    return reused


def test_source_ids_reused_by_a_later_visit_fail_that_visit(
        pristine: Path, repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The later visit is refused with a message naming both visits; retracting the first
    visit frees its sourceIds."""
    first, later = visit_of(source_file(repo, 1)), visit_of(source_file(repo, 5))
    assert _reuse_ids(repo, 1, 5) > 0
    state = tmp_path / "S"
    code, out, err = backfill(repo, state, capsys)
    assert code == 1 and f"{N_VISITS - 1} applied" in out
    line = next(x for x in err.splitlines() if x.startswith(f"FAILED visit {later}"))
    assert f"already stored for visit {first}" in line and "sourceIds are unique" in line
    clean = clean_snapshot(pristine, tmp_path, capsys, lambda r: source_file(r, 5).unlink())
    assert_same(clean, snapshot(state, tmp_path / "snap", capsys))

    # the first visit retracted (and its files gone): the later visit's ids are free now
    assert main(["retract", str(first), "--state", str(state)]) == 0
    source_file(repo, 1).unlink()
    code, out, err = backfill(repo, state, capsys)
    assert code == 0 and "1 applied" in out, err
    fresh = tmp_path / "fresh"
    code, _, err = backfill(repo, fresh, capsys)
    assert code == 0, err
    assert_same(snapshot(fresh, tmp_path / "snap-fresh", capsys),
                snapshot(state, tmp_path / "snap-after", capsys))


def test_a_store_without_the_source_id_index_gets_it_and_refuses_reuse(
        pristine: Path, repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """A store written before the index existed has it built by the first writer (here every
    shard of a state directory loses its index)."""
    later = visit_of(source_file(repo, 5))
    held = tmp_path / "held.parquet"
    shutil.move(source_file(repo, 5), held)
    state = tmp_path / "S"
    assert backfill(repo, state, capsys)[0] == 0
    for shard in sorted((state / "shards").glob("*/*")):
        env = lmdb.open(str(shard), max_dbs=16)
        with env.begin(write=True) as txn:
            if txn.get(b"source_ids") is not None:
                txn.drop(env.open_db(b"source_ids", txn=txn), delete=True)
            txn.delete(b"source_index", db=env.open_db(b"meta", txn=txn))
        env.close()
    shutil.move(held, repo / held.name.replace("held", f"sourceTable_visit_{later}"))
    assert _reuse_ids(repo, 1, 5) > 0
    code, out, err = backfill(repo, state, capsys)
    assert code == 1 and f"FAILED visit {later}" in err and "already stored for visit" in err
    assert "built the sourceId index" in caplog.text


# ------------------------------------------------------------- 7 / 17: unusable coordinates
def _damage_coordinates(path: Path, rows: np.ndarray, column: str, value: float) -> None:
    set_rows(path, column, rows, value)


def _flag_rows(path: Path, rows: np.ndarray) -> None:
    """The clean equivalent of dropped rows: the same rows rejected by a flag."""
    set_rows(path, "pixelFlags_bad", rows, True)


@pytest.mark.parametrize("require_finite", [True, False])
def test_rows_with_unusable_coordinates_are_dropped_and_counted(
        require_finite: bool, pristine: Path, repo: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    """Non-finite ra/dec (fgcmcal's doRequireFiniteRaDec: dropped, the rest of the visit used;
    with the switch off still dropped, they cannot be placed on the sky), dec outside
    [-90, 90] and ra outside [0, 360): dropped, counted in the visit record, `status`, the
    summary and a warning; the catalogs equal a run where those rows are flagged bad."""
    extra: tuple[str, ...] = ()
    config = BuildStarsConfig()
    if not require_finite:
        toml = tmp_path / "c.toml"
        toml.write_text("[sourceSelector]\ndoRequireFiniteRaDec = false\n")
        extra = ("--config", str(toml))
    path = source_file(repo, 3)
    visit = visit_of(path)
    rows = selectable_rows(path, config)
    nan_ra, nan_dec, dec95, dec_low, ra360, ra_neg = np.array_split(rows[:60], 6)
    damaged = np.concatenate([nan_ra, nan_dec, dec95, dec_low, ra360, ra_neg])
    _damage_coordinates(path, nan_ra, "ra", np.nan)
    _damage_coordinates(path, nan_dec, "dec", np.inf)
    _damage_coordinates(path, dec95, "dec", 95.0)
    _damage_coordinates(path, dec_low, "dec", -90.5)
    _damage_coordinates(path, ra360, "ra", 365.0)
    _damage_coordinates(path, ra_neg, "ra", -1.0)
    state = tmp_path / "S"
    code, out, err = backfill(repo, state, capsys, *extra)
    assert code == 0, err
    assert f"{N_VISITS} applied" in out
    assert "60 rows dropped for unusable coordinates (nonFiniteRaDec 20, raDecOutOfRange 40)" \
        in out
    assert records(state)[visit]["dropped_rows"] == {"nonFiniteRaDec": 20, "raDecOutOfRange": 40}
    assert f"visit {visit}: 60 of" in caplog.text and "WARNING" in caplog.text
    assert main(["status", "--state", str(state), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["rows_dropped"] == {"nonFiniteRaDec": 20, "raDecOutOfRange": 40}
    clean = clean_snapshot(pristine, tmp_path, capsys,
                           lambda r: _flag_rows(source_file(r, 3), damaged), *extra)
    assert_same(clean, snapshot(state, tmp_path / "snap", capsys))
    # nothing outside the sphere reached the catalogs
    obs = pq.read_table(tmp_path / "snap" / "fgcm_star_observations.parquet")
    ra, dec = obs.column("ra").to_numpy(), obs.column("dec").to_numpy()
    assert np.all((ra >= 0) & (ra < 360) & (np.abs(dec) <= 90))


# ------------------------------------------------------------- 10: unusable visit metadata
@pytest.mark.parametrize(("column", "shown"), [("ra", "telra = nan"),
                                               ("expMidptMJD", "mjd = nan")])
def test_a_visit_with_a_non_finite_boresight_or_date_fails_alone(
        column: str, shown: str, pristine: Path, repo: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    bad = visit_of(source_file(repo, 4))
    set_visit_table(repo, bad, column, float("nan"))
    if column == "expMidptMJD":
        set_visit_table(repo, bad, "obsStartMJD", float("nan"))
    state = tmp_path / "S"
    code, out, err = backfill(repo, state, capsys)
    assert code == 1, err
    assert f"FAILED visit {bad}" in err and "unusable visit metadata" in err and shown in err
    clean = clean_snapshot(pristine, tmp_path, capsys, lambda r: source_file(r, 4).unlink())
    assert_same(clean, snapshot(state, tmp_path / "snap", capsys))


# ------------------------------------------------------------- 11: unknown detector ids
def test_sources_on_unknown_detectors_fail_their_visit(
        pristine: Path, repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Detector 999 (not in the visit's ccdVisitTable rows) and -1: those visits fail with a
    message; nothing grows fgcm's per-detector arrays."""
    high, negative = source_file(repo, 2), source_file(repo, 6)
    set_rows(high, "detector", selectable_rows(high)[:3], 999)
    set_rows(negative, "detector", np.arange(5), -1)
    state = tmp_path / "S"
    code, out, err = backfill(repo, state, capsys)
    assert code == 1
    assert f"FAILED visit {visit_of(high)}" in err and "detector(s) [999]" in err
    assert f"FAILED visit {visit_of(negative)}" in err and "detector(s) [-1]" in err
    clean = clean_snapshot(pristine, tmp_path, capsys, lambda r: (
        source_file(r, 6).unlink(), source_file(r, 2).unlink()))
    snap = snapshot(state, tmp_path / "snap", capsys)
    assert_same(clean, snap)
    visits = pq.read_table(snap / "fgcmVisitCatalog.parquet")
    assert len(visits.column("deltaAperDetector")[0]) == 9  # detectors 0..8 only


# ------------------------------------------------------------- 13: a foreign LMDB environment
def test_backfill_refuses_a_foreign_lmdb_environment(
        repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "foreign"
    env = lmdb.open(str(state), max_dbs=4)
    with env.begin(write=True) as txn:
        txn.put(b"someone", b"else's data")
        txn.put(b"k", b"v", db=env.open_db(b"their_table", txn=txn))
    env.close()
    before = {p.name: p.read_bytes() for p in state.iterdir()}
    code, out, err = backfill(repo, state, capsys)
    assert code == 2
    assert "is not a streamstars store" in err and "nothing was written" in err
    assert (state / "data.mdb").read_bytes() == before["data.mdb"]
    env = lmdb.open(str(state), max_dbs=4, readonly=True)
    with env.begin() as txn:
        assert sorted(bytes(k) for k, _ in txn.cursor()) == [b"someone", b"their_table"]
    env.close()
    assert main(["status", "--state", str(state)]) == 2


# ------------------------------------------------------------- 15: messages, not tracebacks
@pytest.mark.parametrize("variable", ["STREAMSTARS_MIN_FREE_DISK_MB", "STREAMSTARS_MAP_RSS_MB"])
def test_non_finite_size_settings_are_refused_with_a_message(
        variable: str, repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "S"
    assert backfill(repo, state, capsys)[0] == 0
    for value in ("nan", "inf", "-inf"):
        done = cli("status", "--state", str(state), env={variable: value})
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        assert f"{variable} must be a finite number of megabytes, not {value!r}" in done.stderr


def test_simulate_without_visits_is_a_usage_error(tmp_path: Path) -> None:
    done = cli("simulate", str(tmp_path / "out"), "--visits", "0")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--visits must be at least 1" in done.stderr


PATHOLOGICAL_REFCAT_CONFIGS: dict[str, bytes] = {
    "deeply nested": b"config.format_version = " + b"-" * 100_000 + b"1\n",
    "unhashable literal": b"config.format_version = {[1]: 2}\n",
    "deep target": b"a." * 3000 + b"b = 1\n",
    "not UTF-8": b"config.format_version = 1  # \xff\xfe\n",
    "NUL byte": b"config.format_version = 1\x00\n",
}


@pytest.fixture(scope="module")
def refcat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("refsurvey") / "sim"
    simulate_survey(out, n_visits=1, seed=3, sources_per_visit=300)
    return out / "refcat"


@pytest.mark.parametrize("case", sorted(PATHOLOGICAL_REFCAT_CONFIGS))
def test_a_pathological_refcat_config_py_is_a_message(
        case: str, refcat: Path, repo: Path, tmp_path: Path) -> None:
    bad = tmp_path / "refcat"
    shutil.copytree(refcat, bad)
    (bad / "config.py").write_bytes(PATHOLOGICAL_REFCAT_CONFIGS[case])
    config = tmp_path / "c.toml"
    config.write_text(f'[fgcmLoadReferenceCatalog]\npath = "{bad}"\n'
                      'filterMap = {"r_57" = "r"}\n')
    done = cli("backfill", str(repo), "--state", str(tmp_path / "S"), "--no-progress",
               "--config", str(config))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("streamstars: error:") and "config.py" in done.stderr
    assert len(done.stderr) < 1000


@pytest.fixture(scope="module")
def long_survey(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("long") / "R"
    simulate_survey(out, n_visits=40, seed=5, sources_per_visit=4000, write_refcat=False)
    return out


def test_ctrl_c_during_a_backfill_prints_one_line_and_it_resumes(
        long_survey: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """SIGINT to a real backfill process: one line with the resume hint, no traceback, exit
    130; the visits applied before it stay, and the same command resumes to the catalogs of
    an uninterrupted run."""
    state = tmp_path / "S"
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamstars.cli", "backfill", str(long_survey), "--state",
         str(state), "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # a test run started in the background by a shell inherits SIGINT ignored, and so
        # would the backfill (Python keeps an ignored SIGINT ignored): give it the default
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if (state / "manifest.json").exists():
                with StateDirectory.open(state, readonly=True) as store:
                    if len(store.applied_visits()) >= 3:
                        break
            time.sleep(0.02)
        assert proc.poll() is None, "the backfill ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("streamstars: interrupted"), err
    assert "run the same command again to resume" in lines[0]
    with StateDirectory.open(state, readonly=True) as store:
        applied = len(store.applied_visits())  # a visit in flight is completed on resume
    assert 3 <= applied < 40
    code, out, err = backfill(long_survey, state, capsys)
    assert code == 0, err
    assert f"{40 - applied} applied" in out and f"{applied} skipped" in out
    clean_state = tmp_path / "clean"
    assert backfill(long_survey, clean_state, capsys)[0] == 0
    assert_same(snapshot(clean_state, tmp_path / "clean-snap", capsys),
                snapshot(state, tmp_path / "snap", capsys))


# ------------------------------------------------------------- read-only stores
@pytest.fixture
def world_readable_dir() -> Iterator[Path]:
    """A directory another user can enter (pytest's own tmp directories are private)."""
    path = Path(tempfile.mkdtemp(prefix="streamstars-ro-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _require(tool: str) -> str:
    found = shutil.which(tool)
    if found is None or os.geteuid() != 0:
        pytest.skip(f"needs root and {tool} to run a process as another user / in a mount "
                    "namespace")
    return found


def test_status_and_snapshot_read_a_store_they_cannot_write(
        pristine: Path, world_readable_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A store in a directory the reader cannot write (another user's store, a backup on a
    read-only file system): LMDB's lock file cannot be created or opened there, so readers
    open without it.  Run as user ``nobody`` (chmod does not stop root) and, inside a
    private mount namespace, on a real read-only bind mount."""
    setpriv = _require("setpriv")
    base = world_readable_dir
    state, backup = base / "S", base / "B"
    assert backfill(pristine, state, capsys)[0] == 0
    expected = snapshot(state, base / "expected", capsys)
    assert main(["backup", str(backup), "--state", str(state)]) == 0  # data.mdb only
    capsys.readouterr()
    assert not list(backup.rglob("lock.mdb")) and (state / "index" / "lock.mdb").exists()
    home, outputs = base / "home", base / "outputs"
    for d in (home, outputs):
        d.mkdir()
        d.chmod(0o777)
    for store_dir in (state, backup):
        for f in store_dir.rglob("*"):
            f.chmod(0o755 if f.is_dir() else 0o644)
        store_dir.chmod(0o755)
    nobody = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home),
           "XDG_CACHE_HOME": str(home)}
    for store_dir in (state, backup):
        status = subprocess.run([*nobody, sys.executable, "-m", "streamstars.cli", "status",
                                 "--state", str(store_dir), "--json"], capture_output=True,
                                text=True, env=env, timeout=120, cwd=home)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["visits"] == N_VISITS
        out = outputs / f"snap-{store_dir.name}"
        snap = subprocess.run([*nobody, sys.executable, "-m", "streamstars.cli", "snapshot",
                               str(out), "--state", str(store_dir)], capture_output=True,
                              text=True, env=env, timeout=120, cwd=home)
        assert snap.returncode == 0, snap.stderr
        assert_same(expected, out)
    assert not list(backup.rglob("lock.mdb"))

    unshare = _require("unshare")
    script = (f"mount --bind {backup} {backup} && mount -o remount,bind,ro {backup} && "
              f"touch {backup}/probe 2>/dev/null && echo WRITABLE; "
              f"{sys.executable} -m streamstars.cli status --state {backup} --json > "
              f"{outputs}/status.json && "
              f"{sys.executable} -m streamstars.cli snapshot {outputs}/snap-ro --state {backup}")
    mounted = subprocess.run([unshare, "-m", "sh", "-c", script], capture_output=True,
                             text=True, timeout=120)
    if "mount:" in mounted.stderr or "unshare:" in mounted.stderr:
        pytest.skip(f"no read-only bind mount here: {mounted.stderr.strip()}")
    assert "WRITABLE" not in mounted.stdout
    assert mounted.returncode == 0, mounted.stderr
    assert json.loads((outputs / "status.json").read_text())["visits"] == N_VISITS
    assert_same(expected, outputs / "snap-ro")


# ------------------------------------------------------------- the consumer
def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


@pytest.mark.kafka  # starts its own broker
def test_consumer_events_with_other_paths_are_duplicates_and_dropped_rows_are_counted(
        pristine: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A store backfilled from one copy of the repository, events naming the files of another
    copy: the visits already there are duplicates (no conflict dead letters); the new visit,
    with rows of non-finite coordinates, is applied and its dropped rows are counted in
    ``streamstars_rows_dropped_total``.  The catalogs equal a clean backfill."""
    from kafka_broker import TansuBroker, free_port, write_kafka_config

    from streamstars.consumers.publisher import events_for_inventory
    from streamstars.io.discover import discover_repo

    first = copy_repo(pristine, tmp_path / "first")
    source_file(first, 7).unlink()
    state = tmp_path / "S"
    assert backfill(first, state, capsys)[0] == 0
    data = tmp_path / "data"
    second = copy_repo(pristine, data / "repo")
    path = source_file(second, 7)
    rows = selectable_rows(path)[:12]
    set_rows(path, "dec", rows, np.nan)
    events, skipped = events_for_inventory(discover_repo(second))
    assert not skipped and len(events) == N_VISITS

    with TansuBroker.start(log_path=tmp_path / "tansu.log") as broker:
        topic = "hostile"
        broker.create_topic(topic, partitions=1)
        broker.produce(topic, [(e.key, e.to_json()) for e in events])
        port = free_port()
        log_path = tmp_path / "consumer.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "streamstars.cli", "run", "--bootstrap-servers",
                 broker.bootstrap, "--topic", topic, "--group", "g-hostile", "--state",
                 str(state), "--data-root", str(data), "--kafka-config",
                 str(write_kafka_config(tmp_path / "kafka.properties")), "--metrics-port",
                 str(port)], stdout=log, stderr=subprocess.STDOUT)
            try:
                metrics = ""
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    try:
                        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                                    timeout=5) as response:
                            metrics = response.read().decode()
                    except (urllib.error.URLError, ConnectionError):
                        metrics = ""
                    done = (_metric(metrics, 'streamstars_visits_skipped_total{reason="duplicate"}')
                            or 0) + (_metric(metrics, 'streamstars_visits_applied_total'
                                             '{action="apply"}') or 0) + sum(
                        float(line.split()[-1]) for line in metrics.splitlines()
                        if line.startswith("streamstars_visits_dead_lettered_total{"))
                    if done >= N_VISITS:
                        break
                    assert proc.poll() is None, log_path.read_text()
                    time.sleep(0.2)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
    text = log_path.read_text()
    assert 'streamstars_visits_dead_lettered_total{' not in metrics, text
    assert _metric(metrics, 'streamstars_visits_skipped_total{reason="duplicate"}') \
        == N_VISITS - 1, metrics
    assert _metric(metrics, 'streamstars_visits_applied_total{action="apply"}') == 1
    assert _metric(metrics, 'streamstars_rows_dropped_total{reason="nonFiniteRaDec"}') == 12
    assert _metric(metrics, 'streamstars_rows_dropped_total{reason="raDecOutOfRange"}') == 0
    clean = clean_snapshot(pristine, tmp_path, capsys,
                           lambda r: _flag_rows(source_file(r, 7), rows))
    diffs = compare_snapshots(clean, snapshot(state, tmp_path / "snap", capsys),
                              ignore_metadata_keys=("created", "kafka_offsets"))
    assert not diffs, diffs[0][:2000]
