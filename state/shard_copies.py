"""Shard backups: consistent copies of one shard's store in a backup directory, each verified
by a checksum manifest, and installed into a state directory in place of an older copy.

::

    ROOT/shards/<order>/<pixel>/<offset>-<consumer>-<random>/
        data.mdb        LMDB's compacting copy of the shard's store (StarStore.backup)
        manifest.json   written last (a directory without it is partial): the sha256 and
                        size of data.mdb, the shard's Kafka offsets and visit count, the
                        shard identity and the association fingerprint it was built with

``offset`` is the shard's next offset of the partition whose events it follows (decimal), so
the newest backup of a shard sorts first without opening anything.  The consumers of a group
(``streamstars run --shard-backups ROOT``) write them; the partition indexes that say which
shards a partition holds are theirs (``streamstars.consumers.shard_backups``).  Layout and
formats: docs/state.md, "Shard backups".

Installing a backup (:func:`install_shard_backup`) copies its ``data.mdb`` into a staged
directory beside the shard while hashing it (what is installed is what was verified), opens
it as the shard (format, configuration and identity are checked), gives it a new instance id
(an incremental snapshot never mistakes it for the copy it replaces: LMDB's compacting copy
restarts the transaction ids), then, under the state's visit boundary, swaps it with the
shard's directory in one step and teaches the state's index the shard's visits from the
shard's own visit records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamstars.errors import ShardBackupError, ShardBackupRejected, StateError
from streamstars.staging import (
    exchange_directories,
    remove_dead_staging,
    staged_directory,
    write_json_atomic,
)
from streamstars.state.directory import SHARDS_DIR, StateDirectory
from streamstars.state.index import IndexRecord
from streamstars.state.records import VisitRecord
from streamstars.state.schema import FORMAT_VERSION, META_INSTANCE
from streamstars.state.store import StarStore

__all__ = ["BACKUP_FORMAT", "BACKUP_FORMAT_VERSION", "BACKUP_MANIFEST", "KEEP_BACKUPS",
           "ShardBackup", "backup_offsets", "consumer_name", "install_shard_backup",
           "learn_shard_visits", "list_shard_backups", "prune_shard_backups",
           "read_backup_manifest", "shard_backup_dir", "write_shard_backup"]

log = logging.getLogger("streamstars.state")

BACKUP_FORMAT = "streamstars-shard-backup"
BACKUP_FORMAT_VERSION = 1
BACKUP_MANIFEST = "manifest.json"
#: backups kept per shard (older ones are removed after a new one is complete)
KEEP_BACKUPS = 2
_NAME = re.compile(r"^(\d+)-(.+)$")
_CHUNK = 1 << 22


@dataclass(frozen=True)
class ShardBackup:
    """One backup directory of a shard (complete or not; :func:`read_backup_manifest` says).

    Attributes:
        path: ``ROOT/shards/<order>/<pixel>/<offset>-<consumer>-<random>``.
        pixel: the shard.
        offset: the shard's next offset of its partition, from the directory's name.
    """

    path: Path
    pixel: int
    offset: int

    @property
    def complete(self) -> bool:
        """Whether its manifest (written last) is there."""
        return (self.path / BACKUP_MANIFEST).is_file()


def consumer_name(text: str) -> str:
    """``text`` (a group instance id, a host name) made safe for a directory name."""
    return re.sub(r"[^A-Za-z0-9._]+", "_", text).strip("._") or "consumer"


def shard_backup_dir(root: Path, order: int, pixel: int) -> Path:
    """``ROOT/shards/<order>/<pixel>``: where the backups of one shard live."""
    return Path(root) / SHARDS_DIR / str(int(order)) / str(int(pixel))


def list_shard_backups(root: Path, order: int, pixel: int) -> list[ShardBackup]:
    """The backup directories of a shard, newest (highest offset) first; hidden (staged)
    directories are not backups.

    Raises:
        OSError: the shard's backup directory exists but cannot be listed.
    """
    base = shard_backup_dir(root, order, pixel)
    if not base.is_dir():
        return []
    found = []
    for entry in base.iterdir():
        match = _NAME.match(entry.name)
        if match and entry.is_dir() and not entry.is_symlink():
            found.append((int(match.group(1)), entry.stat().st_mtime_ns, entry))
    found.sort(key=lambda item: (item[0], item[1]), reverse=True)
    return [ShardBackup(path, int(pixel), offset) for offset, _, path in found]


def write_shard_backup(state: StateDirectory, pixel: int, root: Path, *, topic: str,
                       partition: int, consumer: str) -> tuple[ShardBackup, dict[str, Any]]:
    """Write a consistent copy of one shard of ``state`` into the backup directory ``root``,
    its manifest last.  The caller is the state's only writer and applies nothing meanwhile,
    so the offsets and visit count read just before the copy are the copy's.

    Args:
        state: the consumer's state directory.
        pixel: the shard.
        root: the backup directory (``--shard-backups``).
        topic, partition: the partition whose offset names the backup.
        consumer: who writes it (part of the directory name, :func:`consumer_name`).

    Returns:
        The backup and its manifest.

    Raises:
        ShardBackupError: the backup directory cannot be written (named, with the cause).
    """
    order = state.shard_order
    store = state.open_shard(pixel)
    with store.read() as tx:
        offsets = sorted(tx.offsets.items())
        visits = tx.visits.count()
    next_offset = next((o for t, p, o in offsets if t == topic and p == partition), 0)
    name = f"{next_offset}-{consumer_name(consumer)}-{secrets.token_hex(4)}"
    dest = shard_backup_dir(root, order, pixel) / name
    try:
        store.backup(dest)
        digest, size = _file_sha256(dest / "data.mdb")
        manifest = {
            "format": BACKUP_FORMAT,
            "format_version": BACKUP_FORMAT_VERSION,
            "store_format_version": FORMAT_VERSION,
            "shard": state.shard_identity(pixel),
            "association_fingerprint": state.manifest["association_fingerprint"],
            "offsets": [[t, p, o] for t, p, o in offsets],
            "visits": int(visits),
            "data_sha256": digest,
            "data_bytes": size,
            "consumer": consumer,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_json_atomic(dest / BACKUP_MANIFEST, manifest)
    except (StateError, OSError) as exc:
        raise ShardBackupError(
            f"cannot write the backup of shard {order}/{pixel} to {dest.parent}: {exc}") \
            from exc
    return ShardBackup(dest, int(pixel), next_offset), manifest


def prune_shard_backups(root: Path, order: int, pixel: int,
                        keep: int = KEEP_BACKUPS) -> list[Path]:
    """Remove a shard's backups older than its ``keep`` newest complete ones, the partial
    ones older than those, and the staged directories of killed backup writers.  Returns what
    was removed; a directory that cannot be removed is left (logged)."""
    removed: list[Path] = []
    backups = list_shard_backups(root, order, pixel)
    complete = [b for b in backups if b.complete]
    if len(complete) >= keep:
        floor = complete[keep - 1].offset
        kept = {b.path for b in complete[:keep]}
        for backup in backups:
            if backup.path in kept or (not backup.complete and backup.offset >= floor):
                continue  # a partial newer one may be a backup being written right now
            try:
                shutil.rmtree(backup.path)
                removed.append(backup.path)
            except OSError as exc:
                log.warning("cannot remove the old shard backup %s: %s", backup.path, exc)
    base = shard_backup_dir(root, order, pixel)
    for hidden in base.glob(".*.backup-*") if base.is_dir() else []:
        target = hidden.name[1:].rsplit(".backup-", 1)[0]
        removed += remove_dead_staging(base / target, ["backup"])
    return removed


def read_backup_manifest(backup: ShardBackup, state: StateDirectory) -> dict[str, Any]:
    """The manifest of ``backup``, checked against the state that would install it.

    Raises:
        ShardBackupRejected: no manifest (a partial backup), an unreadable one, another
            format, shard or association fingerprint (saying which).
    """
    path = backup.path / BACKUP_MANIFEST
    if not path.is_file():
        raise ShardBackupRejected(f"the shard backup {backup.path} is partial (no "
                                  f"{BACKUP_MANIFEST}: its writer did not finish)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ShardBackupRejected(f"the manifest of the shard backup {backup.path} cannot be "
                                  f"read: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != BACKUP_FORMAT or \
            manifest.get("format_version") != BACKUP_FORMAT_VERSION:
        raise ShardBackupRejected(f"{path} is not a shard backup manifest of format version "
                                  f"{BACKUP_FORMAT_VERSION}")
    if manifest.get("store_format_version") != FORMAT_VERSION:
        raise ShardBackupRejected(f"the shard backup {backup.path} holds a store of format "
                                  f"version {manifest.get('store_format_version')}, this "
                                  f"streamstars reads {FORMAT_VERSION}")
    identity = state.shard_identity(backup.pixel)
    if manifest.get("shard") != identity:
        raise ShardBackupRejected(f"the shard backup {backup.path} holds the shard "
                                  f"{manifest.get('shard')}, not {identity}")
    if manifest.get("association_fingerprint") != state.manifest["association_fingerprint"]:
        raise ShardBackupRejected(f"the shard backup {backup.path} was built with another "
                                  f"configuration than the state {state.path}")
    if not isinstance(manifest.get("data_sha256"), str) or \
            not isinstance(manifest.get("offsets"), list):
        raise ShardBackupRejected(f"{path} lacks data_sha256 or offsets")
    return manifest


def backup_offsets(manifest: dict[str, Any]) -> dict[tuple[str, int], int]:
    """(topic, partition) -> next offset recorded by a backup's manifest."""
    return {(str(t), int(p)): int(o) for t, p, o in manifest["offsets"]}


def install_shard_backup(state: StateDirectory, backup: ShardBackup,
                         partition: tuple[str, int] | None = None) -> dict[str, Any]:
    """Replace the state's copy of ``backup.pixel`` (or create it) with the backup.

    The backup's ``data.mdb`` is copied into a staged directory beside the shard while its
    sha256 is computed; a mismatch with the manifest rejects it.  The copy is opened as the
    shard (format, configuration, identity), given a new instance id, then swapped with the
    shard's directory under the visit boundary, and the index learns the shard's visits
    (:func:`learn_shard_visits`).  A crash leaves the old copy or the new one in place.

    Args:
        state: the state directory (written).
        backup: the backup of one of its shards.
        partition: (topic, partition) the backup must record an offset of (a backup made
            from another topic's events, or before the partition count changed, is refused).

    Returns:
        The backup's manifest.

    Raises:
        ShardBackupRejected: partial, corrupt, not this state's shard, or without an offset
            of ``partition`` (nothing changed).
        ShardBackupError: the copy cannot be made (the state's disk, permissions).
    """
    manifest = read_backup_manifest(backup, state)
    if partition is not None and partition not in backup_offsets(manifest):
        raise ShardBackupRejected(f"the shard backup {backup.path} records no offset of "
                                  f"{partition[0]}[{partition[1]}] (another topic, or made "
                                  "before the partition count changed)")
    pixel = backup.pixel
    target = state.shard_path(pixel)
    try:
        with staged_directory(target, "restore") as building:
            digest, _ = _file_sha256(backup.path / "data.mdb",
                                     copy_to=building.path / "data.mdb")
            if digest != manifest["data_sha256"]:
                raise ShardBackupRejected(
                    f"the shard backup {backup.path} is corrupt: the sha256 of its data.mdb "
                    f"is {digest}, its manifest says {manifest['data_sha256']}")
            try:
                with StarStore.open(building.path, state.config,
                                    shard=state.shard_identity(pixel)) as store:
                    store.write(lambda tx: tx.meta.put(META_INSTANCE,
                                                       str(uuid.uuid4()).encode()))
            except StateError as exc:
                raise ShardBackupRejected(f"the shard backup {backup.path} cannot be used as "
                                          f"shard {state.shard_order}/{pixel}: {exc}") from exc
            with state.visit_boundary(exclusive=True):
                state.close_shard(pixel)
                if target.exists():
                    if not exchange_directories(building.path, target):
                        old = target.with_name(f".{target.name}.replaced-{os.getpid()}-"
                                               f"{secrets.token_hex(4)}")
                        os.rename(target, old)  # (a crash here leaves the shard missing:
                        os.rename(building.path, target)  # only where renameat2 is not)
                        shutil.rmtree(old, ignore_errors=True)
                    else:
                        shutil.rmtree(building.path, ignore_errors=True)  # the old copy
                else:
                    building.replace_empty_target()
                learn_shard_visits(state, pixel)
    except FileNotFoundError as exc:
        raise ShardBackupRejected(f"the shard backup {backup.path} is incomplete: {exc}") \
            from exc
    except OSError as exc:
        raise ShardBackupError(f"cannot install the shard backup {backup.path} into "
                               f"{target}: {exc}") from exc
    return manifest


def learn_shard_visits(state: StateDirectory, pixel: int) -> None:
    """Bring the state's index to what the shard's store holds (after the store was replaced
    by a restored copy), in one index transaction: every visit recorded in the shard lists
    the shard (a new index record, ``applied``, when the index has none for that content),
    visits the index listed for the shard that the store no longer holds leave it, and the
    shard is registered."""
    pixel = int(pixel)
    with state.open_shard(pixel).read() as tx:
        records = {r.visit: r for r in tx.visits.records()}

    def body(tx: Any) -> None:
        listed = [r for _, r in tx.items() if pixel in r.shards and r.visit not in records]
        for record in listed:
            left = sorted(set(record.shards) - {pixel})
            if left:
                tx.put(_with(record, shards=left))
            else:
                tx.delete(record.visit)
        for visit, shard_record in records.items():
            record = tx.get(visit)
            if record is None or record.content_hash != shard_record.content_hash:
                record = _index_record(shard_record)
            tx.put(_with(record, shards=sorted({*record.shards, pixel})))
        tx.register_shards([pixel])

    state.index.write(body)


def _index_record(record: VisitRecord) -> IndexRecord:
    """A new ``applied`` index record for a visit known from one shard's record."""
    return IndexRecord(
        visit=record.visit, band=record.band, content_hash=record.content_hash,
        status="applied", shards=[], n_sources=int(record.n_sources),
        n_selected=int(record.n_selected), dropped_rows=record.dropped,
        files=[list(f) for f in record.files or []] or None,
        source_paths=list(record.source_paths or []) or None,
        dataset_ids=list(record.dataset_ids or []) or None,
        metadata_source=record.metadata_source, kafka=record.kafka)


def _with(record: IndexRecord, **changes: Any) -> IndexRecord:
    values = {k: getattr(record, k) for k in record.__dataclass_fields__}
    return IndexRecord(**{**values, **changes})


def _file_sha256(path: Path, copy_to: Path | None = None) -> tuple[str, int]:
    """sha256 (hex) and size of a file, optionally copied to ``copy_to`` (fsynced) as it is
    read: what is hashed is what was written."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as src:
        out = open(copy_to, "wb") if copy_to is not None else None  # noqa: SIM115
        try:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                if out is not None:
                    out.write(chunk)
            if out is not None:
                out.flush()
                os.fsync(out.fileno())
        finally:
            if out is not None:
                out.close()
    return digest.hexdigest(), size
