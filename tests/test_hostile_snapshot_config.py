"""Hostile input to the snapshot, its configuration and the backup (real files, real processes).

The setting of the issue: a simulated survey of 8 visits (seed 1, 2000 sources per visit)
backfilled into a fresh state directory; every command runs as its own ``streamstars``
process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from file_helpers import tree_digest

import streamstars.io.snapshot_parquet as snapshot_parquet
from streamstars.config import (
    ALLOWED,
    STORE_FINE_FACTOR,
    BuildStarsConfig,
    ColortermConfig,
    RefcatLoadConfig,
    load_config,
    numeric_fields,
    to_dict,
)
from streamstars.errors import ConfigError
from streamstars.io.snapshot_files import (
    SNAPSHOT_ENTRIES,
    SnapshotCatalogs,
    SnapshotDirectoryError,
    compare_snapshots,
    read_snapshot,
    write_snapshot,
)
from streamstars.state import StateDirectory
from streamstars.state.schema import FINE_FACTOR

N_VISITS = 8


def streamstars(*args: object) -> subprocess.CompletedProcess[str]:
    """Run the ``streamstars`` command line as its own process."""
    return subprocess.run([sys.executable, "-m", "streamstars.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def one_clear_error(done: subprocess.CompletedProcess[str]) -> str:
    """The single error line of a command that failed with exit code 2 (no traceback)."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("streamstars: error: "), done.stderr
    return lines[0]


@pytest.fixture(scope="module")
def survey(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("survey") / "R"
    done = streamstars("simulate", out, "--visits", N_VISITS, "--seed", 1,
                       "--sources-per-visit", 2000)
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def state(survey: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state directory the tests only read (snapshot, backup, status)."""
    out = tmp_path_factory.mktemp("state") / "S"
    done = streamstars("backfill", survey, "--state", out, "--no-progress")
    assert done.returncode == 0, done.stderr
    return out


# ---------------------------------------------------------------------------------------------
# 5. snapshot OUT must not delete anything else in OUT
# ---------------------------------------------------------------------------------------------
def test_snapshot_refuses_an_out_holding_foreign_entries_and_touches_nothing(
        state: Path, survey: Path, tmp_path: Path) -> None:
    out = tmp_path / "OUT"
    assert streamstars("snapshot", out, "--state", state).returncode == 0
    # what a user may well keep next to the catalogs: notes, a backup, a state directory
    (out / "notes.txt").write_text("calibration run notes\n")
    assert streamstars("backup", out / "bk", "--state", state).returncode == 0
    done = streamstars("backfill", survey, "--state", out / "state", "--no-progress")
    assert done.returncode == 0, done.stderr
    (out / ".hidden").write_text("x")
    before = tree_digest(out)

    error = one_clear_error(streamstars("snapshot", out, "--state", state))
    assert "does not write: .hidden, bk/, notes.txt, state/" in error
    assert "nothing was written" in error
    assert tree_digest(out) == before  # every byte of OUT as it was
    assert sorted(os.listdir(tmp_path)) == ["OUT"]  # no temporary directory left
    for store_dir in (out / "bk", out / "state"):
        with StateDirectory.open(store_dir, readonly=True) as store:
            assert len(store.applied_visits()) == N_VISITS
    assert len(read_snapshot(out).visits["visit"]) == N_VISITS

    # once the foreign entries are gone, the snapshot is replaced as before
    for name in ("notes.txt", ".hidden"):
        (out / name).unlink()
    shutil.rmtree(out / "bk")
    shutil.rmtree(out / "state")
    done = streamstars("snapshot", out, "--state", state)
    assert done.returncode == 0, done.stderr
    assert set(os.listdir(out)) <= set(SNAPSHOT_ENTRIES)


def test_an_entry_of_a_snapshot_name_but_the_wrong_kind_is_foreign(
        state: Path, tmp_path: Path) -> None:
    out = tmp_path / "OUT"
    assert streamstars("snapshot", out, "--state", state).returncode == 0
    (out / "fgcm_star_ids.parquet").unlink()
    (out / "fgcm_star_ids.parquet").mkdir()  # somebody's directory under a snapshot name
    (out / "fgcm_star_ids.parquet" / "mine.txt").write_text("keep me")
    error = one_clear_error(streamstars("snapshot", out, "--state", state))
    assert "does not write: fgcm_star_ids.parquet/" in error
    assert (out / "fgcm_star_ids.parquet" / "mine.txt").read_text() == "keep me"


def test_an_entry_put_into_out_while_the_snapshot_is_written_is_not_deleted(
        state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """OUT is checked again right before the swap: a file that appeared while the new files
    were being written is not deleted with the old snapshot."""
    out = tmp_path / "OUT"
    assert streamstars("snapshot", out, "--state", state).returncode == 0
    catalogs = read_snapshot(out)
    real_writer = snapshot_parquet.write_parquet_files

    def writer_meanwhile(tmp: Path, cat: SnapshotCatalogs) -> dict[str, int]:
        (out / "arrived-meanwhile.txt").write_text("precious")
        return real_writer(tmp, cat)

    monkeypatch.setattr(snapshot_parquet, "write_parquet_files", writer_meanwhile)
    with pytest.raises(SnapshotDirectoryError, match="does not write: arrived-meanwhile.txt"):
        write_snapshot(out, catalogs, grace_seconds=0)
    assert (out / "arrived-meanwhile.txt").read_text() == "precious"
    assert sorted(os.listdir(tmp_path)) == ["OUT"]


# ---------------------------------------------------------------------------------------------
# 8. snapshot --config may change snapshot-time settings only
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "keys"), [
    ("matchRadius = 2.0\nisolationRadius = 4.0\n", ["matchRadius (store: 1.0, given: 2.0)"]),
    ('primaryBands = ["r"]\n', ["primaryBands"]),
    ("[sourceSelector.signalToNoise]\nminimum = 5.0\n",
     ["sourceSelector.signalToNoise.minimum (store: 10.0, given: 5.0)"]),
    ("minPerBand = 3\nreferenceCCD = 7\nrandomSeed = 9\n",
     ["minPerBand (store: 2, given: 3)", "referenceCCD (store: 40, given: 7)"]),
    ('[fgcmLoadReferenceCatalog]\nfilterMap = {"r_57" = "r"}\n',
     ["fgcmLoadReferenceCatalog.filterMap",
      "changed on the store with streamstars refresh-refs --state DIR --config FILE"]),
])
def test_snapshot_config_refuses_settings_that_shape_stored_data(
        text: str, keys: list[str], state: Path, tmp_path: Path) -> None:
    config = tmp_path / "snap.toml"
    config.write_text(text)
    error = one_clear_error(streamstars("snapshot", tmp_path / "OUT", "--state", state,
                                        "--config", config))
    assert f"config file {config} changes settings that shape the stored data" in error
    for key in keys:
        assert key in error
    assert "randomSeed (" not in error and "isolationRadius (" not in error
    assert not (tmp_path / "OUT").exists()


def test_snapshot_config_applies_snapshot_time_settings_on_the_stores_configuration(
        survey: Path, tmp_path: Path) -> None:
    """Keys the file leaves out keep the store's values (here a non-default storeNside), the
    file's snapshot-time keys are used, and the provenance records exactly what was used."""
    built_with = tmp_path / "build.toml"
    built_with.write_text("storeNside = 1024\n")
    state = tmp_path / "S"
    done = streamstars("backfill", survey, "--state", state, "--config", built_with,
                       "--no-progress")
    assert done.returncode == 0, done.stderr
    config = tmp_path / "snap.toml"
    # a stored-data key repeated with the store's own value is accepted
    config.write_text("isolationRadius = 3.0\nrandomSeed = 7\nmatchRadius = 1.0\n"
                      "[fgcmLoadReferenceCatalog]\nmatchRadius = 0.5\n")
    done = streamstars("snapshot", tmp_path / "OUT", "--state", state, "--config", config)
    assert done.returncode == 0, done.stderr
    used = json.loads(read_snapshot(tmp_path / "OUT").metadata["config"])
    with StateDirectory.open(state, readonly=True) as store:
        expected = to_dict(dataclasses.replace(
            store.config, isolationRadius=3.0, randomSeed=7,
            fgcmLoadReferenceCatalog=RefcatLoadConfig(matchRadius=0.5)))
    assert used == json.loads(json.dumps(expected))
    assert used["storeNside"] == 1024
    # and the isolation radius really was applied: fewer stars than with the store's 2"
    assert streamstars("snapshot", tmp_path / "PLAIN", "--state", state).returncode == 0
    assert len(read_snapshot(tmp_path / "OUT").stars["fgcm_id"]) < \
        len(read_snapshot(tmp_path / "PLAIN").stars["fgcm_id"])


def test_build_catalogs_refuses_a_config_that_differs_in_stored_data(state: Path) -> None:
    from streamstars.snapshot import build_catalogs

    with StateDirectory.open(state, readonly=True) as directory:
        store = directory.open_shard(directory.shards()[0][1])
        with store.read() as txn:
            other = dataclasses.replace(store.config, primaryBands=("r", "i"))
            with pytest.raises(ConfigError,
                               match=r"primaryBands \(store: \['i', 'r', 'g', 'z'\]"):
                build_catalogs(store, txn, other)


# ---------------------------------------------------------------------------------------------
# 9. every numeric setting has an allowed range, checked when a config is built or loaded
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "message"), [
    ("storeNside = 1048576\n", "storeNside = 1048576 has pixels of 0.201 arcsec"),
    ("storeNside = 16777216\n", "storeNside must be a power of two from 1 to 8388608 (2**23)"),
    ("storeNside = 1000\n", "storeNside must be a power of two"),
    ("densityCutNside = 1073741824\n",
     "densityCutNside must be a power of two from 1 to 536870912 (2**29)"),
    ("coarseNside = 0\n", "coarseNside must be a power of two from 1"),
    ("matchRadius = inf\n", "matchRadius must be a finite number in (0, 60] arcsec, got inf"),
    ("matchRadius = nan\n", "matchRadius must be a finite number in (0, 60] arcsec, got nan"),
    ("matchRadius = 0.0\n", "matchRadius must be a finite number in (0, 60] arcsec"),
    ("matchRadius = 100.0\nisolationRadius = 300.0\n", "matchRadius must be a finite number"),
    ("isolationRadius = inf\n", "isolationRadius must be a finite number in (0, 600] arcsec"),
    ("minPerBand = 1e20\n", "minPerBand must be an integer in [1, 8388608], got 1e+20"),
    ("minPerBand = 9223372036854775807\n", "minPerBand must be an integer in [1, 8388608]"),
    ("minPerBand = 0\n", "minPerBand must be an integer in [1, 8388608], got 0"),
    ("densityCutMaxPerPixel = -5\n",
     "densityCutMaxPerPixel must be an integer in [1, 2147483647], got -5"),
    ("randomSeed = -1\n", "randomSeed must be an integer in [0, 4294967295]"),
    ("reserveFraction = 1.0\n", "reserveFraction must be a finite number in [0, 1)"),
    ("referenceCCD = -1\n", "referenceCCD must be an integer in [0, 2147483647]"),
    ("[sourceSelector.signalToNoise]\nminimum = nan\n",
     "sourceSelector.signalToNoise.minimum must be a finite number >= 0"),
    ("[sourceSelector.signalToNoise]\nmaximum = inf\n",
     "sourceSelector.signalToNoise.maximum must be a finite number > 0"),
    ("[sourceSelector.signalToNoise]\nminimum = 2000.0\n",
     "sourceSelector.signalToNoise.minimum (2000.0) must be smaller than"),
    ("[sourceSelector.unresolved]\nmaximum = nan\n",
     "sourceSelector.unresolved.maximum must be a finite number, got nan"),
    ("[fgcmLoadReferenceCatalog]\nmatchRadius = -1.0\n",
     "fgcmLoadReferenceCatalog.matchRadius must be a finite number in (0, 60] arcsec"),
    ("[fgcmLoadReferenceCatalog.referenceSelector.signalToNoise]\nminimum = -inf\n",
     "fgcmLoadReferenceCatalog.referenceSelector.signalToNoise.minimum must be a finite"),
    ("[fgcmLoadReferenceCatalog.colorterms.r_57]\nprimary = \"r\"\nc1 = inf\n",
     "fgcmLoadReferenceCatalog.colorterms.r_57.c1 must be a finite number, got inf"),
])
def test_out_of_range_settings_are_refused_naming_key_and_range(
        text: str, message: str, tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert str(info.value).startswith(f"{config}: ")
    assert message in str(info.value)


@pytest.mark.parametrize("text", ["storeNside = 1048576\n", "matchRadius = inf\n",
                                  "minPerBand = 1e20\n", "densityCutMaxPerPixel = -5\n"])
def test_the_issues_settings_fail_cleanly_before_anything_is_written(
        text: str, survey: Path, state: Path, tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(text)
    key = text.split(" ")[0]
    error = one_clear_error(streamstars("backfill", survey, "--state", tmp_path / "new",
                                        "--config", config, "--no-progress"))
    assert key in error and str(config) in error
    assert not (tmp_path / "new").exists()
    error = one_clear_error(streamstars("snapshot", tmp_path / "OUT", "--state", state,
                                        "--config", config))
    assert key in error and str(config) in error
    assert not (tmp_path / "OUT").exists()


def test_every_numeric_setting_has_a_range_and_the_defaults_are_valid() -> None:
    config = BuildStarsConfig(fgcmLoadReferenceCatalog=RefcatLoadConfig(
        colorterms={"r_57": ColortermConfig(primary="r", secondary="i", c1=0.1)}))
    patterns = {pattern for _, pattern, _ in numeric_fields(config)}
    assert patterns == set(ALLOWED)
    for key, pattern, value in numeric_fields(config):
        assert ALLOWED[pattern].allows(value), key
    # fgcmcal's defaults are valid as they are
    assert load_config(None) == BuildStarsConfig()
    assert STORE_FINE_FACTOR == FINE_FACTOR
    # dataclasses.replace goes through the same checks
    with pytest.raises(ConfigError, match="densityCutMaxPerPixel must be an integer"):
        dataclasses.replace(BuildStarsConfig(), densityCutMaxPerPixel=-5)


def test_a_store_recorded_with_an_invalid_configuration_is_refused_clearly(
        state: Path, tmp_path: Path) -> None:
    copy = tmp_path / "S"
    assert streamstars("backup", copy, "--state", state).returncode == 0
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["config"]["storeNside"] = 1 << 20
    (copy / "manifest.json").write_text(json.dumps(manifest))
    error = one_clear_error(streamstars("status", "--state", copy))
    assert "was built with a configuration this streamstars refuses" in error
    assert "storeNside = 1048576" in error


# ---------------------------------------------------------------------------------------------
# 12. a killed backup's hidden directory is removed by the next backup (not a running one's)
# ---------------------------------------------------------------------------------------------
def start_backup_and_catch_it_copying(dest: Path, state: Path,
                                      action: signal.Signals) -> tuple[subprocess.Popen[bytes],
                                                                       Path] | None:
    """Start ``streamstars backup DEST`` and send it ``action`` as soon as its hidden
    directory holds the copy of the index (the copy has begun); None if it finished first."""
    proc = subprocess.Popen([sys.executable, "-m", "streamstars.cli", "backup", str(dest),
                             "--state", str(state)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    prefix = f".{dest.name}.backup-{proc.pid}"
    while proc.poll() is None:
        for name in os.listdir(dest.parent):
            if name.startswith(prefix) and (dest.parent / name / "index" / "data.mdb").exists():
                os.kill(proc.pid, action)
                return proc, dest.parent / name
    return None


def catch(dest: Path, state: Path, action: signal.Signals
          ) -> tuple[subprocess.Popen[bytes], Path]:
    for _ in range(20):  # the copy of this small store takes milliseconds: retry if missed
        caught = start_backup_and_catch_it_copying(dest, state, action)
        if caught is not None:
            return caught
        shutil.rmtree(dest)
    pytest.fail(f"never caught a backup to {dest} while it was copying")


def test_a_killed_backup_is_cleaned_by_the_next_one_and_a_running_one_is_left_alone(
        state: Path, tmp_path: Path) -> None:
    dest = tmp_path / "backups" / "nightly"
    dest.parent.mkdir()

    killed, killed_dir = catch(dest, state, signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    assert killed_dir.is_dir() and not dest.exists()

    paused, paused_dir = catch(dest, state, signal.SIGSTOP)  # alive, mid-copy
    try:
        done = streamstars("backup", dest, "--state", state)
        assert done.returncode == 0, done.stderr
        assert not killed_dir.exists()  # the killed backup's directory is gone
        assert paused_dir.is_dir()  # the running backup's is untouched
        with StateDirectory.open(dest, readonly=True) as store:
            assert len(store.applied_visits()) == N_VISITS
    finally:
        os.kill(paused.pid, signal.SIGCONT)
    assert paused.wait(timeout=120) == 2  # DEST is now taken: it fails cleanly...
    assert sorted(os.listdir(dest.parent)) == ["nightly"]  # ...and removes its own directory


# ---------------------------------------------------------------------------------------------
# 14. a snapshot onto a full disk: one clear message, exit 2, the previous snapshot intact
# ---------------------------------------------------------------------------------------------
FULL_DISK_SCRIPT = r"""
set -e
mount -t tmpfs -o size=2m tmpfs "$FS"
"$PY" -m streamstars.cli snapshot "$FS/OUT" --state "$STATE" > /dev/null
cp -a "$FS/OUT" "$KEEP/before"
head -c 200000 /dev/zero > "$FS/spacer"
dd if=/dev/zero of="$FS/fill" bs=4096 2> /dev/null || true
rm "$FS/spacer"   # ~200 kB free: the new snapshot fails part way through
set +e
"$PY" -m streamstars.cli snapshot "$FS/OUT" --state "$STATE" --format "$FORMAT" \
    > "$KEEP/out" 2> "$KEEP/err"
echo $? > "$KEEP/rc"
cp -a "$FS/OUT" "$KEEP/after"
ls -A "$FS" > "$KEEP/listing"
"""


def run_in_mount_namespace(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``script`` with sh in a new mount namespace (unprivileged through a user namespace,
    so a tmpfs can be mounted without root; the mount vanishes with the namespace)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) is not installed: cannot mount a small file system")
    probe = subprocess.run([unshare, "--mount", "--map-root-user", "true"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a mount namespace here ({probe.stderr.strip()})")
    return subprocess.run([unshare, "--mount", "--map-root-user", "sh", "-c", script],
                          env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("fmt", ["fits,parquet", "parquet"])
def test_a_snapshot_onto_a_full_disk_fails_clearly_and_keeps_the_previous_one(
        fmt: str, state: Path, tmp_path: Path) -> None:
    fs, keep = tmp_path / "fs", tmp_path / "keep"
    fs.mkdir()
    keep.mkdir()
    done = run_in_mount_namespace(FULL_DISK_SCRIPT, {
        "FS": str(fs), "KEEP": str(keep), "STATE": str(state), "PY": sys.executable,
        "FORMAT": fmt})
    assert done.returncode == 0, done.stderr
    stderr = (keep / "err").read_text()
    assert int((keep / "rc").read_text()) == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"streamstars: error: cannot write the snapshot {fs}/OUT: "
                               f"no space left on the file system of {fs}")
    assert "the previous snapshot at" in lines[0] and "is unchanged" in lines[0]
    # the previous snapshot is intact, byte for byte, and nothing else is left behind
    assert tree_digest(keep / "after") == tree_digest(keep / "before")
    assert compare_snapshots(keep / "before", keep / "after") == []
    assert (keep / "listing").read_text().split() == ["OUT", "fill"]


# ---------------------------------------------------------------------------------------------
# 15 (part). a config file that is not UTF-8
# ---------------------------------------------------------------------------------------------
def test_a_config_file_that_is_not_utf8_is_named_not_a_traceback(
        survey: Path, state: Path, tmp_path: Path) -> None:
    config = tmp_path / "latin1.toml"
    config.write_bytes("# étoiles\nisolationRadius = 3.0\n".encode("latin-1"))
    for args in (("config", "show", "--config", config),
                 ("backfill", survey, "--state", tmp_path / "new", "--config", config,
                  "--no-progress"),
                 ("snapshot", tmp_path / "OUT", "--state", state, "--config", config)):
        error = one_clear_error(streamstars(*args))
        assert f"config file {config} is not UTF-8 text (byte 0xe9 at offset 2, line 1)" \
            in error
    assert not (tmp_path / "new").exists() and not (tmp_path / "OUT").exists()


def test_snapshot_entries_name_every_file_a_snapshot_writes(state: Path, tmp_path: Path) -> None:
    """The one list of snapshot entries covers what a snapshot writes in every format."""
    for fmt in ("fits", "parquet", "fits,parquet"):
        out = tmp_path / fmt.replace(",", "-")
        assert streamstars("snapshot", out, "--state", state, "--format", fmt).returncode == 0
        for entry in os.listdir(out):
            kind = "dir" if (out / entry).is_dir() else "file"
            assert SNAPSHOT_ENTRIES.get(entry) == kind, entry
        assert (out / "fgcm_stars").is_dir()  # the HATS catalog of the sharded snapshot
