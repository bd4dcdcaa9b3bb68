"""Shards follow partitions: the backups a consumer in a group writes of its shards, and the
restore of a partition's shards when the partition is assigned (``streamstars run --group G
--shard-backups DIR_OR_URI --backup-every-visits N``).

Backups
-------
Every ``N`` visits applied to a shard (counted per shard, from this process's start), the
consumer writes a consistent copy of the shard into the backup directory
(:meth:`.visit_store.ConsumerStore.backup_shard`: ``DIR/shards/<order>/<pixel>/
<offset>-<consumer>-<random>/``, its checksum manifest last), backs up with it every shard of
the same partition that has no backup yet, then rewrites the partition's **index**
``DIR/partitions/<topic>/<partition>.json`` atomically::

    {"complete_through": X, "shards": {"<pixel>": <newest backup offset>, ...}, ...}

``X`` is the partition's watermark in this state at that moment: every event of the partition
below ``X`` belongs to a listed shard.  Older backups beyond the newest two of a shard are
removed.  Backups run between two messages (or while idle), in the consumer's thread: nothing
is applied meanwhile, and the copy holds no lock (LMDB's copy is one read transaction).  A
failure (an unwritable or full backup directory) is logged naming the directory, counted in
``streamstars_shard_backup_failures_total``, and retried at the next opportunity after
:data:`RETRY_SECONDS`; the consumer goes on applying.

Restore
-------
When a partition is assigned (inside the assignment callback, i.e. between two messages), its
index is read; for each listed shard the state keeps its own copy when that copy is at least
as new as the newest backup, else installs the newest backup that verifies (a partial or
corrupt one is rejected: logged, ``streamstars_shard_backup_rejected_total``, the next older
one is tried), else the shard is replayed from the partition's start.  The partition is then
consumed from ``min(X, offsets of the listed shards)`` (never before the state's own
watermark): each shard skips the events below its own offset without reading them.  Without
an index the partition starts at the state's watermark (the beginning when it has none), as
without backups.  docs/operations.md "Shard backups" has the operator's view.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from streamstars.errors import ConfigError, ShardBackupError, ShardBackupRejected
from streamstars.events import VisitEvent
from streamstars.staging import write_json_atomic

from .context import RunContext
from .hooks import NO_HOOKS, ConsumerHooks
from .kafka_client import Position
from .metrics import Outcome
from .visit_store import ConsumerStore

__all__ = ["INDEX_FORMAT", "PARTITIONS_DIR", "RETRY_SECONDS", "ShardBackups",
           "backup_root", "partition_index_path", "read_partition_index"]

log = logging.getLogger("streamstars.run")

PARTITIONS_DIR = "partitions"
INDEX_FORMAT = "streamstars-partition-index"
INDEX_FORMAT_VERSION = 1
#: a failed backup is tried again after this many seconds (at the next message or idle poll)
RETRY_SECONDS = 5.0


def backup_root(text: str) -> Path:
    """The backup directory of ``--shard-backups``: a directory path, or a ``file://`` URI.

    Raises:
        ConfigError: a URI of another scheme (object stores are not supported: mount the
            storage and give its path), or a ``file://`` URI naming another host.
    """
    if "://" not in text:
        return Path(text)
    parsed = urllib.parse.urlsplit(text)
    if parsed.scheme != "file":
        raise ConfigError(
            f"--shard-backups {text!r}: the scheme {parsed.scheme}:// is not supported; give "
            "a directory path or a file:// URI (a volume every consumer of the group mounts)")
    if parsed.netloc not in ("", "localhost"):
        raise ConfigError(f"--shard-backups {text!r}: a file:// URI must name a local path "
                          f"(file:///path), not the host {parsed.netloc!r}")
    if not parsed.path:
        raise ConfigError(f"--shard-backups {text!r}: the URI names no path")
    return Path(urllib.parse.unquote(parsed.path))


def partition_index_path(root: Path, topic: str, partition: int) -> Path:
    """``ROOT/partitions/<topic>/<partition>.json``."""
    return Path(root) / PARTITIONS_DIR / topic / f"{int(partition)}.json"


def read_partition_index(root: Path, topic: str, partition: int) -> dict[str, Any] | None:
    """The partition's index (``complete_through``, ``shards`` as {pixel: offset}), or None
    when there is none.

    Raises:
        ShardBackupError: it exists but cannot be read or is not a partition index.
    """
    path = partition_index_path(root, topic, partition)
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ShardBackupError(f"cannot read the partition index {path}: {exc}") from exc
    try:
        index = json.loads(raw)
        if index.get("format") != INDEX_FORMAT:
            raise ValueError(f"format {index.get('format')!r}")
        return {**index, "complete_through": int(index["complete_through"]),
                "shards": {int(k): int(v) for k, v in index["shards"].items()}}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ShardBackupError(f"{path} is not a partition index ({exc})") from exc


class ShardBackups:
    """The backups of one consumer's shards and the restore of assigned partitions.

    Args:
        ctx: the consumer's options (``shard_backups``, ``backup_every_visits``, topic,
            group instance id) and metrics.
        store: the consumer's state directory.
        assigned: the partitions assigned now (only their shards are backed up).
        hooks: steps reported to tests (a shard restored).
    """

    def __init__(self, ctx: RunContext, store: ConsumerStore,
                 assigned: Callable[[], set[int]], hooks: ConsumerHooks = NO_HOOKS) -> None:
        opts = ctx.options
        assert opts.shard_backups is not None
        self.root = opts.shard_backups
        self.every = opts.backup_every_visits
        self.topic = opts.topic
        self.consumer = opts.group_instance_id or f"{socket.gethostname()}-{os.getpid()}"
        self.metrics = ctx.metrics
        self.store = store
        self._assigned = assigned
        self.hooks = hooks
        #: shard -> visits applied to it since its last backup (this process)
        self._pending: dict[int, int] = {}
        #: shard -> the partition its events come from
        self._partition_of: dict[int, int] = {}
        #: shard -> offset of its newest backup known to be complete
        self._backed_up: dict[int, int] = {}
        #: partitions whose index must be written again (a backup was written, the index not)
        self._stale_index: set[int] = set()
        self._retry_at = 0.0

    # ------------------------------------------------------------------ backups
    def applied(self, event: VisitEvent | None, outcome: Outcome, position: Position) -> None:
        """Count a message: a shard event that changed its shard brings its backup closer."""
        if event is None or event.shard is None or not outcome.changed:
            return
        self._pending[event.shard] = self._pending.get(event.shard, 0) + 1
        self._partition_of[event.shard] = position.partition

    def due(self) -> list[int]:
        """The assigned partitions with a shard due for a backup (or an index to rewrite)."""
        assigned = self._assigned()
        due = {self._partition_of[s] for s, n in self._pending.items() if n >= self.every}
        return sorted((due | self._stale_index) & assigned)

    def maybe_backup(self) -> None:
        """Back up what is due (between two messages or while idle); a failure is logged and
        counted, and tried again after :data:`RETRY_SECONDS`."""
        if time.monotonic() < self._retry_at:
            return
        for partition in self.due():
            try:
                self.backup_partition(partition)
            except ShardBackupError as exc:
                self.metrics.shard_backup_failures.inc()
                self._retry_at = time.monotonic() + RETRY_SECONDS
                log.error("shard backup failed (the consumer goes on applying; tried again in "
                          "%.0f s): %s", RETRY_SECONDS, exc)
                return

    def backup_partition(self, partition: int) -> None:
        """Back up the shards of ``partition`` that are due or have no backup yet, then write
        the partition's index.

        Raises:
            ShardBackupError: a backup or the index cannot be written (naming the directory).
        """
        store = self.store
        shards = store.partition_shards(self.topic, partition)
        for pixel in shards:
            if self._pending.get(pixel, 0) < self.every and pixel in self._backed_up:
                continue
            start = time.perf_counter()
            backup, visits = store.backup_shard(pixel, self.root, topic=self.topic,
                                                partition=partition, consumer=self.consumer)
            self._backed_up[pixel] = backup.offset
            self._pending.pop(pixel, None)
            self._stale_index.add(partition)
            self.metrics.shard_backups.inc()
            self.metrics.last_shard_backup_time = time.time()
            log.info("backed up shard %d/%d (%d visit(s), offset %d of %s[%d]) to %s in %.2f s",
                     store.shard_order, pixel, visits, backup.offset, self.topic, partition,
                     backup.path, time.perf_counter() - start)
            for old in store.prune_shard_backups(self.root, pixel):
                log.info("removed the older shard backup %s", old)
        if partition not in self._stale_index:
            return
        path = partition_index_path(self.root, self.topic, partition)
        complete_through = store.watermark(self.topic, partition) or 0
        index = {
            "format": INDEX_FORMAT, "format_version": INDEX_FORMAT_VERSION,
            "topic": self.topic, "partition": partition,
            "complete_through": complete_through,
            "shardNside": store.shard_nside,
            "shards": {str(p): self._backed_up[p] for p in shards if p in self._backed_up},
            "consumer": self.consumer,
            "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        try:
            write_json_atomic(path, index)
        except OSError as exc:
            raise ShardBackupError(f"cannot write the partition index {path}: {exc}") from exc
        self._stale_index.discard(partition)

    # ------------------------------------------------------------------ restore
    def restore(self, topic: str, partitions: list[int]) -> dict[int, int]:
        """Bring the shards of newly assigned ``partitions`` up to their partition index
        (called by the assignment callback, between two messages).

        Returns:
            partition -> offset to start at (0: the beginning), for the partitions that have
            an index; the others start where the state says (its watermark, or the
            beginning).  A partition whose restore fails is left out (logged).
        """
        out: dict[int, int] = {}
        for partition in partitions:
            try:
                start = self._restore_partition(topic, partition)
            except ShardBackupError as exc:
                log.error("%s[%d]: restore from shard backups failed, starting at the state's "
                          "watermark: %s", topic, partition, exc)
                continue
            if start is not None:
                out[partition] = start
        return out

    def _restore_partition(self, topic: str, partition: int) -> int | None:
        store = self.store
        index = read_partition_index(self.root, topic, partition)
        if index is None:
            log.info("%s[%d]: no partition index in %s (no shard backup yet)", topic,
                     partition, self.root)
            return None
        if index.get("shardNside") != store.shard_nside:
            raise ShardBackupError(
                f"the partition index of {topic}[{partition}] lists shards of nside "
                f"{index.get('shardNside')}, this state has shardNside {store.shard_nside}")
        start = index["complete_through"]
        for pixel, listed in sorted(index["shards"].items()):
            start = min(start, self._restore_shard(topic, partition, pixel, listed))
        watermark = store.watermark(topic, partition)
        if watermark is not None and watermark >= start:
            return watermark  # every event below it is done here (restored copies are newer)
        if start > 0:
            # every event below start is done here now: a restart resumes there too
            store.raise_watermark(topic, partition, start)
        return start

    def _restore_shard(self, topic: str, partition: int, pixel: int, listed: int) -> int:
        """Make one listed shard current; returns its next offset of the partition (0: it is
        replayed from the partition's start)."""
        store = self.store
        name = f"{store.shard_order}/{pixel}"
        local = store.shard_next_offset(pixel, topic, partition)
        try:
            backups = store.shard_backups(self.root, pixel)
        except OSError as exc:
            log.error("shard %s: cannot list its backups in %s: %s", name, self.root, exc)
            backups = []
        for backup in backups:
            if local is not None and backup.offset <= local:
                break  # the state's own copy is at least as new
            try:
                offset, visits = store.install_shard_backup(backup, topic, partition)
            except ShardBackupRejected as exc:
                self.metrics.shard_backup_rejected.inc()
                log.warning("shard %s: %s; trying an older backup", name, exc)
                continue
            except ShardBackupError as exc:
                log.error("shard %s: %s; trying an older backup", name, exc)
                continue
            self._backed_up[pixel] = backup.offset
            self._pending.pop(pixel, None)
            self.metrics.shard_restores.labels("backup").inc()
            self.hooks.shard_restored(pixel, "backup", offset)
            log.info("shard %s: restored from the backup %s (%d visit(s), offset %d of "
                     "%s[%d]; local copy: %s)", name, backup.path, visits, offset, topic,
                     partition, "none" if local is None else f"offset {local}")
            return offset
        if local is not None:
            if local >= listed:
                self._backed_up.setdefault(pixel, listed)
            self.metrics.shard_restores.labels("local").inc()
            self.hooks.shard_restored(pixel, "local", local)
            log.info("shard %s: the local copy (offset %d of %s[%d]) is used (newest backup: "
                     "offset %s)", name, local, topic, partition,
                     backups[0].offset if backups else "none")
            return local
        self.metrics.shard_restores.labels("replay").inc()
        self.hooks.shard_restored(pixel, "replay", 0)
        log.warning("shard %s: no usable backup and no local copy: replayed from the start of "
                    "%s[%d]", name, topic, partition)
        return 0
