"""The staged-directory helper shared by store creation, backup and snapshot publication."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from streamstars.staging import remove_dead_staging, staged_directory

# holds an exclusive flock on the directory given as argv[1] until its stdin closes
HOLD_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def test_a_staged_directory_replaces_an_empty_target(tmp_path: Path) -> None:
    target = tmp_path / "parent" / "store"
    with staged_directory(target, "creating") as staged:
        assert staged.path.parent == target.parent
        assert staged.path.name.startswith(f".store.creating-{os.getpid()}-")
        (staged.path / "data").write_text("complete")
        assert not target.exists()
        staged.replace_empty_target()
    assert (target / "data").read_text() == "complete"
    assert os.listdir(target.parent) == ["store"]


def test_a_block_that_raises_leaves_nothing_and_the_target_alone(tmp_path: Path) -> None:
    target = tmp_path / "backup"
    target.mkdir()
    with pytest.raises(RuntimeError, match="copy failed"), \
            staged_directory(target, "backup") as staged:
        (staged.path / "half").write_text("x")
        raise RuntimeError("copy failed")
    assert os.listdir(tmp_path) == ["backup"]
    assert os.listdir(target) == []


def test_dead_writers_directories_are_removed_running_ones_are_not(tmp_path: Path) -> None:
    target = tmp_path / "nightly"
    dead = tmp_path / f".nightly.backup-{dead_pid()}-0a0b0c0d"
    no_pid = tmp_path / ".nightly.backup-deadbeef"
    alive_unlocked = tmp_path / f".nightly.backup-{os.getpid()}-01020304"  # just created
    locked = tmp_path / f".nightly.backup-{dead_pid()}-05060708"  # pid gone, yet locked
    other_kind = tmp_path / f".nightly.creating-{dead_pid()}-090a0b0c"
    other_target = tmp_path / f".weekly.backup-{dead_pid()}-0d0e0f00"
    for directory in (dead, no_pid, alive_unlocked, locked, other_kind, other_target):
        directory.mkdir()
        (directory / "data.mdb").write_bytes(b"partial")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(locked)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        removed = remove_dead_staging(target, ["backup"])
    finally:
        holder.communicate("")
    assert sorted(removed) == sorted([dead, no_pid])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (alive_unlocked, locked, other_kind, other_target))


def test_a_new_staged_directory_cleans_its_kinds_first(tmp_path: Path) -> None:
    target = tmp_path / "snap"
    backup = f".snap.backup-{dead_pid()}-00000000"  # another kind: not cleaned here
    for name in (".snap.tmp-deadbeef", f".snap.old-{dead_pid()}-00000000", backup):
        (tmp_path / name).mkdir()
    with staged_directory(target, "tmp", also_remove=("old",)) as staged:
        assert sorted(os.listdir(tmp_path)) == sorted([staged.path.name, backup])
        staged.replace_empty_target()
    assert sorted(os.listdir(tmp_path)) == sorted([backup, "snap"])


def test_two_writers_of_one_json_file_never_meet_in_a_temporary_file(tmp_path: Path) -> None:
    """Two writers of the same file (two consumers rewriting one partition index) each write
    their own temporary file: every write lands whole, none fails, no temporary is left."""
    import threading

    from streamstars.staging import write_json_atomic

    target = tmp_path / "partitions" / "t" / "0.json"
    errors: list[BaseException] = []

    def writer(name: str) -> None:
        try:
            for i in range(300):
                write_json_atomic(target, {"writer": name, "i": i, "pad": "x" * 2000})
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert json.loads(target.read_text())["i"] == 299
    assert sorted(p.name for p in target.parent.iterdir()) == ["0.json"]
