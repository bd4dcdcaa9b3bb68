"""Build a directory in a hidden sibling, then put it in place with one rename.

Three writers publish a whole directory that a reader must see complete or not at all: store
creation (``state/store.py``), ``streamstars backup`` (``StarStore.backup``) and snapshot
publication (:func:`streamstars.io.snapshot_directory.stage_snapshot`).  Each builds its
directory here:

* the staged directory is a hidden sibling of the target on the same file system,
  ``.<name>.<kind>-<pid>-<random>`` (``kind`` says which writer: ``creating``, ``backup``,
  ``tmp``), so the final rename is atomic;
* the writer holds an exclusive ``flock`` on it from just after creating it until the block
  ends, so other writers can tell a running writer's directory from a dead one's;
* staged directories of the same target left by dead writers (killed mid-way) are removed
  first: a directory is dead when its lock can be taken *and* the process named in it is gone
  (a directory without a pid counts as dead) — in the instant between creating the directory
  and locking it, its writer is alive; a reused pid merely postpones the cleaning;
* when the block raises, the staged directory is removed; the target is untouched.

Putting the directory in place is the writer's: :meth:`StagedDirectory.replace_empty_target`
(a rename onto a new or empty target, as store creation and backup do), or a directory
exchange (the snapshot's ``renameat2(RENAME_EXCHANGE)``, which swaps it with the previous
snapshot).

A single small file is put in place the same way by :func:`write_json_atomic` (the watch state
files of ``streamstars publish --watch``, with or without ``--butler``; the consumers' partition
indexes of shard backups).  :func:`exchange_directories` swaps a staged directory with the
existing target in one step (a shard restored from a backup replacing the older copy).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import glob
import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["StagedDirectory", "exchange_directories", "remove_dead_staging", "staged_directory",
           "write_json_atomic"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StagedDirectory:
    """A directory being built beside its target.

    Attributes:
        path: the hidden sibling being written (``.<name>.<kind>-<pid>-<random>``).
        target: where it goes when complete.
    """

    path: Path
    target: Path

    def replace_empty_target(self) -> None:
        """Rename the staged directory onto the target (atomic when the target is absent or
        an empty directory).

        Raises:
            OSError: the target exists and is not an empty directory, or the rename failed.
        """
        os.rename(self.path, self.target)


def _staging_prefix(target: Path, kind: str) -> str:
    return f".{target.name}.{kind}-"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _writer_pid(name: str, prefix: str) -> int | None:
    """The pid in ``<prefix><pid>-<random>``, or None when there is none."""
    text = name[len(prefix):].split("-", 1)[0]
    return int(text) if text.isdigit() else None


def remove_dead_staging(target: Path, kinds: Iterable[str]) -> list[Path]:
    """Remove the staged directories of ``target`` (of the given kinds) left by dead writers.

    Args:
        target: the directory the staged directories were built for.
        kinds: which writers' directories to look at (``"backup"``, ``"tmp"``, ...).

    Returns:
        The directories removed.  A directory still locked, or named after a live process, is
        left alone.
    """
    removed = []
    for kind in kinds:
        prefix = _staging_prefix(target, kind)
        for leftover in sorted(target.parent.glob(glob.escape(prefix) + "*")):
            if leftover.is_symlink() or not leftover.is_dir():
                continue
            pid = _writer_pid(leftover.name, prefix)
            if pid is not None and _process_alive(pid):
                continue
            try:
                fd = os.open(leftover, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                continue  # renamed or removed meanwhile
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # a writer is working in it
            try:
                shutil.rmtree(leftover, ignore_errors=True)
            finally:
                os.close(fd)
            removed.append(leftover)
            log.info("removed %s, left by a writer that was killed", leftover)
    return removed


@contextlib.contextmanager
def staged_directory(target: str | os.PathLike[str], kind: str, *,
                     also_remove: Iterable[str] = ()) -> Iterator[StagedDirectory]:
    """Create a fresh locked hidden sibling of ``target`` for the block to build.

    The target's parent is created when missing; the dead writers' staged directories of
    ``target`` of this ``kind`` (and of the kinds in ``also_remove``) are removed first
    (:func:`remove_dead_staging`).  The lock is held until the block ends; when the block
    raises, the staged directory is removed.  The block puts the directory in place itself
    (see the module docstring); whatever is left at the staged path when the block ends
    normally stays there.

    Args:
        target: the directory to build.
        kind: which writer this is, part of the staged directory's name.
        also_remove: other kinds of staged directories of ``target`` to clean when dead.

    Yields:
        The :class:`StagedDirectory`.

    Raises:
        OSError: the parent or the staged directory could not be created or locked.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_staging(target, [kind, *also_remove])
    path = target.parent / (f"{_staging_prefix(target, kind)}{os.getpid()}-"
                            f"{secrets.token_hex(4)}")
    path.mkdir()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        shutil.rmtree(path, ignore_errors=True)
        raise
    try:
        # held until the block ends: a writer starting meanwhile leaves the directory alone
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield StagedDirectory(path, target)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    finally:
        os.close(fd)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write ``payload`` as JSON (sorted keys) to ``path`` so that a crash leaves either the old
    file or the new one: written to ``<name>.<pid>-<random>.tmp`` beside it (a name of its own:
    two processes writing the same file, e.g. two consumers one partition index, never write
    into each other's), fsynced, renamed into place, and the directory fsynced so that the
    rename itself is durable.  The parent is created when missing.

    Raises:
        OSError: the file could not be written, synced or renamed.
        TypeError: ``payload`` is not JSON-serialisable.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "w") as fh:
            json.dump(payload, fh, indent=0, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _load_renameat2() -> Any:
    try:
        func = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                     ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


_renameat2 = _load_renameat2()


def exchange_directories(a: Path, b: Path) -> bool:
    """Swap the directories ``a`` and ``b`` in one step (Linux ``renameat2`` with
    ``RENAME_EXCHANGE``): a crash leaves both in one place or the other, never one missing.

    Returns:
        False when the system cannot do it (no ``renameat2``, a file system without
        ``RENAME_EXCHANGE``): nothing was changed, the caller renames in two steps.

    Raises:
        OSError: the exchange failed for another reason (a directory missing, permissions).
    """
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"renameat2(RENAME_EXCHANGE) failed: {os.strerror(err)}", str(a), None,
                  str(b))
