"""The snapshot directory: staged, then swapped into place atomically; its manifest.

:func:`stage_snapshot` gives a writer a fresh hidden sibling of ``out_dir`` on the same file
system (:func:`streamstars.staging.staged_directory`, kind ``tmp``), in which every file of
the snapshot is written and fsynced, the manifest ``SNAPSHOT.json`` last
(:func:`write_manifest`: file names, row counts, byte sizes, sha256, provenance).  When the
block ends the directory is published:

* if ``out_dir`` does not exist: ``os.rename`` (atomic);
* otherwise: Linux ``renameat2(RENAME_EXCHANGE)`` (through ctypes/libc) swaps the two
  directories in one step, so the path ``out_dir`` always names a complete snapshot, old or new.
  The old snapshot (now at the staged name) is removed after ``grace_seconds`` so that a
  reader which resolved ``out_dir`` just before the swap can still open its files (files that are
  already open stay readable after removal anyway; ``read_snapshot`` opens all the files it
  needs through one directory file descriptor before reading any of them);
* if ``renameat2`` is unavailable (non-Linux, old glibc, filesystem without
  ``RENAME_EXCHANGE``): ``rename(out_dir, .<name>.old-<pid>-<random>)`` then
  ``rename(staged, out_dir)``.  Between the two renames (a few microseconds) ``out_dir`` does
  not exist: a reader may see it missing, never a mix.

Writers of the same parent directory are serialised with ``flock`` on the parent directory,
and leftovers of crashed writers (``.<name>.tmp-*`` / ``.<name>.old-*``) are removed.  An
existing ``out_dir`` is replaced only when it holds nothing but entries a snapshot writes
(:data:`~streamstars.io.snapshot_catalogs.SNAPSHOT_ENTRIES`, checked before the files are
written and again just before the swap); anything else in it (notes, a backup, a state
directory...) would be deleted with the old snapshot, so :class:`SnapshotDirectoryError` is
raised naming those entries and nothing is written or removed.

A file that cannot be written (full disk, permissions, I/O error) raises
:class:`SnapshotWriteError` with one message: the partial files are removed and the previous
snapshot is unchanged (it is only replaced once every new file is complete).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamstars.errors import StreamstarsError
from streamstars.io.snapshot_catalogs import MANIFEST_NAME, SNAPSHOT_ENTRIES, compare_provenance
from streamstars.staging import exchange_directories, staged_directory

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_VERSION",
    "SnapshotDirectoryError",
    "SnapshotStaging",
    "SnapshotWriteError",
    "compare_manifests",
    "file_sha256",
    "fsync_path",
    "stage_snapshot",
    "write_manifest",
]

MANIFEST_FORMAT = "streamstars-snapshot"
MANIFEST_VERSION = 1


class SnapshotDirectoryError(StreamstarsError):
    """``out_dir`` cannot be used for a snapshot (e.g. it holds files a snapshot does not
    write)."""


class SnapshotWriteError(StreamstarsError):
    """The snapshot could not be written (full disk, no permission, I/O error); the previous
    snapshot, if any, is unchanged and the partial files are removed."""


def fsync_path(path: Path, directory: bool = False) -> None:
    """fsync a file (or, with ``directory``, a directory's entries) to disk."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes (hex), as the manifest records it.

    Raises:
        OSError: the file cannot be read.
    """
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


@contextlib.contextmanager
def _locked_parent(parent: Path) -> Iterator[None]:
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _foreign_entries(out_dir: Path) -> list[str]:
    """Entries of ``out_dir`` that a snapshot does not write (``/`` marks directories)."""
    foreign = []
    with os.scandir(out_dir) as entries:
        for entry in entries:
            kind = SNAPSHOT_ENTRIES.get(entry.name)
            if entry.is_symlink():
                ok = False
            elif kind == "file":
                ok = entry.is_file(follow_symlinks=False)
            elif kind == "dir":
                ok = entry.is_dir(follow_symlinks=False)
            else:
                ok = False
            if not ok:
                foreign.append(entry.name + ("/" if entry.is_dir(follow_symlinks=False)
                                             else ""))
    return sorted(foreign)


def _check_out_dir(out_dir: Path) -> bool:
    """Whether ``out_dir`` exists (as a replaceable directory); raise when it must not be used.

    A replaceable directory is empty or holds only entries of :data:`SNAPSHOT_ENTRIES` (of the
    right kind): replacing it deletes nothing else.
    """
    if out_dir.is_symlink():
        raise SnapshotDirectoryError(
            f"{out_dir} is a symbolic link; pass the real directory path to write_snapshot")
    if not out_dir.exists():
        return False
    if not out_dir.is_dir():
        raise SnapshotDirectoryError(f"{out_dir} exists and is not a directory")
    foreign = _foreign_entries(out_dir)
    if foreign:
        shown = ", ".join(foreign[:20]) + (f" and {len(foreign) - 20} more"
                                           if len(foreign) > 20 else "")
        raise SnapshotDirectoryError(
            f"{out_dir} holds entries a streamstars snapshot does not write: {shown}; "
            "replacing the directory would delete them, so nothing was written. Move them out "
            "of it, or choose another output directory.")
    return True


def write_manifest(tmp: Path, rows: dict[str, int], fmts: Sequence[str],
                   reference_filters: Sequence[str], metadata: dict[str, str], *,
                   checksums: bool, extra: dict[str, Any] | None = None) -> None:
    """fsync the files named in ``rows`` and write ``SNAPSHOT.json`` (last) into ``tmp``.

    ``extra`` entries (e.g. ``partitions``) are added at the top level of the manifest.
    """
    files: dict[str, dict[str, Any]] = {}
    for fname in sorted(rows):
        path = tmp / fname
        fsync_path(path)
        entry: dict[str, Any] = {"rows": rows[fname], "bytes": path.stat().st_size}
        if checksums:
            entry["sha256"] = file_sha256(path)
        files[fname] = entry
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "formats": list(fmts),
        "files": files,
        "reference_filters": list(reference_filters),
        "provenance": metadata,
        **(extra or {}),
    }
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    fsync_path(tmp / MANIFEST_NAME)
    fsync_path(tmp, directory=True)


@dataclass(frozen=True)
class SnapshotStaging:
    """A snapshot being written: files go into ``path``; ``target`` is the snapshot directory
    it replaces on success (``target_existed``: it held a snapshot, readable until the swap)."""

    path: Path
    target: Path
    target_existed: bool


@contextlib.contextmanager
def stage_snapshot(out_dir: str | os.PathLike[str], *,
                   grace_seconds: float = 0.2) -> Iterator[SnapshotStaging]:
    """Stage a snapshot in a fresh sibling directory and swap it into ``out_dir`` atomically.

    The parent directory is locked (``flock``) for the whole block, leftovers of crashed
    writers are removed, and the block's files are written into ``staging.path``.  When the
    block ends normally, ``out_dir`` is checked again (an entry put into it meanwhile would be
    deleted with the old snapshot), the staging directory is fsynced and swapped into place as
    described in the module docstring; when it raises, the staging directory is removed and
    ``out_dir`` is left as it was.  The caller writes the manifest (last,
    :func:`write_manifest`) and fsyncs its own files
    (:func:`streamstars.io.snapshot_files.write_snapshot` and
    :func:`streamstars.io.flat_stream.finish_partitioned_snapshot` do both).

    Args:
        out_dir: the snapshot directory (created; its parent is created too).
        grace_seconds: delay before the replaced snapshot is deleted (see the module
            docstring).

    Yields:
        The :class:`SnapshotStaging` to write into.

    Raises:
        SnapshotDirectoryError: ``out_dir`` is a symlink, a file, or a directory holding an
            entry that is not in ``SNAPSHOT_ENTRIES`` (nothing is written or removed).
        SnapshotWriteError: a file could not be written (full disk, permissions, I/O error)
            or the snapshot could not be put in place; the previous snapshot is unchanged and
            the partial files are removed.
    """
    target = Path(os.path.abspath(os.fspath(out_dir)))
    parent = target.parent
    with contextlib.ExitStack() as stack:
        try:
            parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(_locked_parent(parent))
            exists = _check_out_dir(target)
            staged = stack.enter_context(staged_directory(target, "tmp", also_remove=("old",)))
            yield SnapshotStaging(staged.path, target, exists)
            fsync_path(staged.path, directory=True)
            exists = _check_out_dir(target)
        except OSError as exc:
            raise _write_error(target, exc) from exc
        _publish(staged.path, target, exists, grace_seconds)


def _publish(tmp: Path, target: Path, exists: bool, grace_seconds: float) -> None:
    """Put the complete snapshot ``tmp`` at ``target`` (see the module docstring)."""
    parent = target.parent
    try:
        if not exists:
            os.rename(tmp, target)
        elif exchange_directories(tmp, target):
            fsync_path(parent, directory=True)
            if grace_seconds > 0:
                time.sleep(grace_seconds)
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old snapshot
            return
        else:
            old = parent / f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(target, old)  # window: target missing until the next rename
            try:
                os.rename(tmp, target)
            except OSError:
                os.rename(old, target)  # the previous snapshot back in place
                raise
            fsync_path(parent, directory=True)
            if grace_seconds > 0:
                time.sleep(grace_seconds)
            shutil.rmtree(old, ignore_errors=True)
            return
        fsync_path(parent, directory=True)
    except OSError as exc:
        # tmp holds the new snapshot (not published) or, after the exchange, the old one
        shutil.rmtree(tmp, ignore_errors=True)
        raise SnapshotWriteError(f"cannot put the snapshot in place at {target}: "
                                 f"{exc.strerror or exc}") from exc


def _directory_bytes(path: Path) -> int:
    try:
        return sum(entry.stat(follow_symlinks=False).st_size for entry in os.scandir(path)
                   if entry.is_file(follow_symlinks=False))
    except OSError:
        return 0


def _write_error(target: Path, exc: OSError) -> SnapshotWriteError:
    """One clear message for a snapshot that could not be written (nothing was replaced)."""
    exists = target.is_dir()
    # astropy raises its own "Not enough space on disk" OSError (no errno); pyarrow's errors
    # carry the errno in their text only
    text = str(exc).lower()
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT) or "space" in text or "quota" in text
    kept = (f"the previous snapshot at {target} is unchanged" if exists
            else f"{target} was not created")
    if full:
        size = _directory_bytes(target) if exists else 0
        need = f" (the previous snapshot takes {size / 1e6:,.1f} MB)" if size else ""
        return SnapshotWriteError(
            f"cannot write the snapshot {target}: no space left on the file system of "
            f"{target.parent}. Nothing was replaced: {kept}, and the partial files were "
            f"removed. Free space there{need} and run the snapshot again.")
    where = f" ({exc.filename})" if exc.filename else ""
    return SnapshotWriteError(
        f"cannot write the snapshot {target}: {exc.strerror or exc}{where}. Nothing was "
        f"replaced: {kept}, and the partial files were removed.")


def compare_manifests(a: Path, b: Path, ignore: Sequence[str],
                      ignore_keys: Sequence[str] = ()) -> list[str]:
    """Differences between two manifests (empty list: the same).

    The provenance less the keys in ``ignore``, the row counts of every file (not their byte
    sizes or sha256, which depend on the provenance) and every other top-level entry but those
    in ``ignore_keys``.  The ``generation`` of each shard (which store, at which LMDB
    transaction, it was read from: what the incremental snapshot compares) identifies the
    store, not the data: it is not compared; a shard's ``refcat`` is ignored with the
    provenance's ``refcat``, the ``reuse_key`` (a digest of the configuration) with its
    ``config``.
    """
    ma = {k: v for k, v in json.loads(a.read_text()).items() if k not in ignore_keys}
    mb = {k: v for k, v in json.loads(b.read_text()).items() if k not in ignore_keys}
    skip = {"generation"} | ({"refcat"} if "refcat" in ignore else set())
    for manifest in (ma, mb):
        if "config" in ignore:
            manifest.pop("reuse_key", None)
        if isinstance(manifest.get("shards"), dict):
            manifest["shards"] = {name: {k: v for k, v in entry.items() if k not in skip}
                                  for name, entry in manifest["shards"].items()
                                  if isinstance(entry, dict)}
    diffs = compare_provenance(MANIFEST_NAME, ma.pop("provenance", {}),
                               mb.pop("provenance", {}), ignore)
    fa, fb = ma.pop("files", {}), mb.pop("files", {})
    for fname in sorted(set(fa) | set(fb)):
        ra = {k: v for k, v in fa.get(fname, {}).items() if k == "rows"}
        rb = {k: v for k, v in fb.get(fname, {}).items() if k == "rows"}
        if ra != rb:
            diffs.append(f"{MANIFEST_NAME}: rows of {fname} differ: {ra} != {rb}")
    if ma != mb:
        diffs.append(f"{MANIFEST_NAME}: differs: {ma} != {mb}")
    return diffs
