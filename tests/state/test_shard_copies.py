"""Shard backups (``state/shard_copies.py``): a consistent copy of one shard with its checksum
manifest, installed into another state directory in place of an older copy (or of none), the
index taught the shard's visits; partial and corrupt backups refused; old backups pruned.
Real LMDB files, real backfills."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from consumer_helpers import assert_same_catalogs, shard_tables

from streamstars.cli import main
from streamstars.config import BuildStarsConfig
from streamstars.errors import ShardBackupRejected
from streamstars.simulate import simulate_survey
from streamstars.state import StateDirectory
from streamstars.state.shard_copies import (
    BACKUP_MANIFEST,
    ShardBackup,
    install_shard_backup,
    list_shard_backups,
    prune_shard_backups,
    write_shard_backup,
)

NSIDE = 64
CONFIG = BuildStarsConfig(shardNside=NSIDE)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A state backfilled with visits 0-2, its shards backed up (the *old* backups), then
    visits 3-5 added and backed up again (the *new* ones); the full state and its snapshot."""
    tmp = tmp_path_factory.mktemp("copies")
    config = tmp / "config.toml"
    config.write_text(f"shardNside = {NSIDE}\n")
    first = simulate_survey(tmp / "first", n_visits=3, seed=5, sources_per_visit=1500,
                            write_refcat=False).out_dir
    rest = simulate_survey(tmp / "rest", n_visits=3, seed=5, sources_per_visit=1500,
                           write_refcat=False, first_visit=3).out_dir
    state, root = tmp / "state", tmp / "backups"
    for repo, kind in ((first, "old"), (rest, "new")):
        assert main(["backfill", str(repo), "--state", str(state), "--config", str(config),
                     "--no-progress"]) == 0
        with StateDirectory.open(state) as directory:
            for _, pixel in directory.shards():
                write_shard_backup(directory, pixel, root / kind, topic="t", partition=0,
                                   consumer="test")
    assert main(["snapshot", str(tmp / "snap"), "--state", str(state)]) == 0
    return {"state": state, "root": root, "snap": tmp / "snap", "tmp": tmp}


def _install_all(state: Path, root: Path) -> None:
    with StateDirectory.open(state, CONFIG) as directory:
        order = directory.shard_order
        for pixel in sorted(int(p.name) for p in (root / "shards" / str(order)).iterdir()):
            (backup,) = list_shard_backups(root, order, pixel)
            install_shard_backup(directory, backup)


def test_backups_installed_over_older_copies_make_the_same_state(
        built: dict[str, Path], tmp_path: Path) -> None:
    """The old backups installed into an empty state, then the new ones over them (the
    directory swap): the shards hold exactly the original's tables, the index knows every
    visit, and the snapshot is the original's."""
    target = tmp_path / "target"
    _install_all(target, built["root"] / "old")
    with StateDirectory.open(target, readonly=True) as directory:
        assert len(directory.applied_visits()) == 3
    _install_all(target, built["root"] / "new")
    assert shard_tables(target) == shard_tables(built["state"])
    with StateDirectory.open(target, readonly=True) as directory, \
            StateDirectory.open(built["state"], readonly=True) as original:
        assert directory.applied_visits() == original.applied_visits()
        assert {r.visit: sorted(r.shards) for r in directory.index_records()} == \
            {r.visit: sorted(r.shards) for r in original.index_records()}
        instances = {directory.open_shard(p).instance for _, p in directory.shards()}
        assert not instances & {original.open_shard(p).instance for _, p in original.shards()}
    assert main(["snapshot", str(tmp_path / "snap"), "--state", str(target)]) == 0
    assert_same_catalogs(tmp_path / "snap", built["snap"])
    assert not [p for p in (target / "shards").rglob(".*")]  # no staged directory left


def test_a_partial_or_corrupt_backup_is_rejected_and_nothing_changes(
        built: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "backups"
    shutil.copytree(built["root"] / "new", root)
    target = tmp_path / "target"
    with StateDirectory.open(target, CONFIG) as directory:
        order = directory.shard_order
        pixels = sorted(int(p.name) for p in (root / "shards" / str(order)).iterdir())
        partial = list_shard_backups(root, order, pixels[0])[0]
        (partial.path / BACKUP_MANIFEST).unlink()
        with pytest.raises(ShardBackupRejected, match="is partial"):
            install_shard_backup(directory, partial)
        corrupt = list_shard_backups(root, order, pixels[1])[0]
        data = corrupt.path / "data.mdb"
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
        with pytest.raises(ShardBackupRejected, match="is corrupt: the sha256"):
            install_shard_backup(directory, corrupt)
        other = list_shard_backups(root, order, pixels[2])[0]
        moved = partial.path.parent / other.path.name  # another shard's backup in its place
        shutil.copytree(other.path, moved)
        with pytest.raises(ShardBackupRejected, match="holds the shard"):
            install_shard_backup(directory, ShardBackup(moved, pixels[0], other.offset))
        clean = list_shard_backups(root, order, pixels[2])[0]
        with pytest.raises(ShardBackupRejected, match=r"records no offset of visits\[0\]"):
            install_shard_backup(directory, clean, ("visits", 0))  # (a backfill records none)
        assert directory.shards() == [] and directory.applied_visits() == {}
    assert not [p for p in (target / "shards").rglob("*") if p.name.startswith(".")]


def test_old_backups_are_pruned_to_the_newest_two(built: dict[str, Path],
                                                 tmp_path: Path) -> None:
    root = tmp_path / "backups"
    with StateDirectory.open(built["state"], readonly=True) as directory:
        pixel = directory.shards()[0][1]
        order = directory.shard_order
        made = [write_shard_backup(directory, pixel, root, topic="t", partition=0,
                                   consumer="c")[0] for _ in range(3)]
    for k, backup in enumerate(made):  # (a backfilled shard records no offset: name some)
        backup.path.rename(backup.path.with_name(f"{5 + k}-c-{k}"))
    partial = made[0].path.parent / "3-dead-0000"
    partial.mkdir()  # a writer killed before its manifest, older than the kept ones
    newer_partial = made[0].path.parent / "999999-busy-0000"
    newer_partial.mkdir()  # may be a backup being written: left alone
    removed = prune_shard_backups(root, order, pixel)
    left = list_shard_backups(root, order, pixel)
    assert [b.offset for b in left if b.complete] == [7, 6]
    assert partial in removed and newer_partial.exists()
    manifest = json.loads((left[1].path / BACKUP_MANIFEST).read_text())
    assert manifest["shard"]["pixel"] == pixel and manifest["visits"] > 0
