"""File helpers shared by the tests: digests of directory trees and copies of state
directories that keep LMDB's sparse files sparse."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path


def file_digest(path: Path) -> str:
    """sha256 of a file's size and of its data extents with their offsets.

    Exact like a digest of the whole content (holes read as zeros by definition), but a
    writer's sparse ``data.mdb`` — as large as the LMDB map, gigabytes of holes — costs only
    the pages it really holds."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        digest.update(size.to_bytes(8, "little"))
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fh.fileno(), pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(fh.fileno(), start, os.SEEK_HOLE)
            fh.seek(start)
            digest.update(start.to_bytes(8, "little"))
            left = end - start
            while left:
                chunk = fh.read(min(left, 1 << 22))
                if not chunk:
                    break
                digest.update(chunk)
                left -= len(chunk)
            pos = end
    return digest.hexdigest()


def tree_digest(root: Path, *, skip_names: tuple[str, ...] = ()) -> dict[str, str]:
    """Relative path -> :func:`file_digest` (files) or ``"dir"`` of everything under ``root``
    (names in ``skip_names`` left out, e.g. LMDB's ``lock.mdb`` that readers write)."""
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        if path.name in skip_names:
            continue
        rel = str(path.relative_to(root))
        out[rel] = "dir" if path.is_dir() else file_digest(path)
    return out


def copy_state(source: Path, dest: Path) -> None:
    """A copy of a closed state directory keeping its sparse LMDB files sparse (a plain
    ``shutil.copytree`` writes every hole of their map out as zeros: gigabytes)."""
    subprocess.run(["cp", "-a", "--sparse=always", str(source), str(dest)], check=True)
