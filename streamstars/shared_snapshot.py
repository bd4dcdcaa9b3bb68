"""One snapshot shared by the consumers of a group: each writes the partitions of its shards,
any of them completes the flat files.

Consumers in a group (``streamstars run --group G --snapshot-dir SHARED --snapshot-shared``)
each hold the shards of their own partitions.  Each writes the HATS partition of every shard it
holds into the shared directory, and the catalogs are *completed* from the newest partition of
every shard (docs/snapshot-format.md, "A snapshot shared by consumers")::

    SHARED/
    ├── partitions.lock                   flock: replacing a shard's entry, pinning the entries
    ├── fgcm_stars/Norder=k/Dir=d/        one entry per shard (d = n // 10000 * 10000)
    │   ├── Npix=n.json                   the shard's entry (written last, atomically)
    │   ├── Npix=n.<token>.parquet        its HATS partition (absent: the shard owns no star)
    │   └── Npix=n.<token>.visits.json    its visit records (the visit catalog's rows)
    └── snapshot/                         the completed snapshot (as `streamstars snapshot`)

**Writing a shard** (:func:`publish_partitions`): the shard's stars are derived from one read
transaction of its store (under the state's visit boundary, as any snapshot of a state) and
its partition and visit records written into a staged directory ``.fgcm_stars.writing-*``
beside ``fgcm_stars``; then, holding ``partitions.lock``, the entry now in place is read
again and the new copy is put in place only when it *supersedes* it (:func:`supersedes`: at or
past it on every partition and further on one, i.e. higher offsets): its two files are renamed
in under a fresh token and ``Npix=n.json`` naming them is replaced atomically (the one step
that publishes the copy), then the previous token's files are removed.  A consumer that lost
the partition (its copy is stale: lower offsets) never replaces a newer copy, nor a copy at
the same offsets (same events: the same data), whoever wrote it.  A shard whose entry is its
own copy at the same offsets is not derived at all (the check needs the store's offsets only),
so a consumer whose shards did not change writes nothing.

**Completing** (:func:`complete_shared_snapshot`): the entries are pinned under
``partitions.lock`` (their partitions hard-linked into the staged snapshot, their visit
records read), then the catalog files, the flat files and ``SNAPSHOT.json`` are written as by
``streamstars snapshot`` and the directory is swapped into place atomically
(:func:`streamstars.io.snapshot_directory.stage_snapshot`, whose ``flock`` on the parent
directory serialises two completions of the same output).  When the output already holds the
snapshot of exactly the entries now there (same tokens, same formats), nothing is written.

Entries of shards nobody holds any more stay until replaced (a shard's data only goes forward:
an entry is never removed, so the catalogs never lose a shard whose partition moved).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamstars import __version__
from streamstars.config import BuildStarsConfig, to_dict
from streamstars.errors import StreamstarsError
from streamstars.io.flat_stream import finish_partitioned_snapshot
from streamstars.io.hats import CATALOG_DIR, PartitionFile, link_or_copy, partition_path
from streamstars.io.snapshot_catalogs import check_formats
from streamstars.io.snapshot_directory import stage_snapshot
from streamstars.io.snapshot_files import MANIFEST_NAME
from streamstars.margins import MarginViolation
from streamstars.sharded_snapshot import (
    ShardedSnapshotSummary,
    ShardRef,
    _generation,
    _one_value,
    _reuse_key,
    _ShardJob,
    _ShardOutcome,
    _snapshot_read_shard,
)
from streamstars.snapshot import kafka_offsets, visit_catalog
from streamstars.staging import staged_directory, write_json_atomic
from streamstars.state import StateDirectory, VisitRecord
from streamstars.state.directory import merge_visit_records

__all__ = [
    "ENTRY_FORMAT",
    "LOCK_NAME",
    "PARTITIONS_DIR",
    "SNAPSHOT_NAME",
    "PublishSummary",
    "SharedEntry",
    "SharedSnapshotError",
    "complete_shared_snapshot",
    "entry_path",
    "publish_partitions",
    "read_entries",
    "supersedes",
]

log = logging.getLogger(__name__)

#: the directory of the shards' entries inside ``SHARED``
PARTITIONS_DIR = CATALOG_DIR
#: the completed snapshot inside ``SHARED`` (the consumers' completion writes it)
SNAPSHOT_NAME = "snapshot"
#: the file whose ``flock`` guards replacing entries and pinning them
LOCK_NAME = "partitions.lock"
ENTRY_FORMAT = "streamstars-shard-partition"
ENTRY_VERSION = 1


class SharedSnapshotError(StreamstarsError):
    """The shared snapshot directory cannot be completed (no entries, entries written with
    other settings, a damaged entry)."""


# --------------------------------------------------------------------------------------------
# entries
# --------------------------------------------------------------------------------------------


def _offset_key(topic: str, partition: int) -> str:
    return f"{topic}/{int(partition)}"


@dataclass(frozen=True)
class SharedEntry:
    """A shard's entry in ``SHARED/fgcm_stars`` (its ``Npix=n.json``).

    Attributes:
        order, pixel: the shard.
        token: names its files (``Npix=n.<token>.parquet``, ``Npix=n.<token>.visits.json``).
        offsets: ``topic/partition`` -> the next offset its store recorded (empty: a state
            fed without Kafka offsets per shard, e.g. a backfill or version-1 events).
        generation: [store instance, LMDB transaction id] it was derived from.
        reuse_key: digest of the configuration, margin and streamstars version.
        raw: the whole entry as stored.
    """

    order: int
    pixel: int
    token: str
    offsets: dict[str, int]
    generation: list[Any]
    reuse_key: str
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """``order/pixel``, the shard's key in ``SNAPSHOT.json``."""
        return f"{self.order}/{self.pixel}"

    @property
    def position(self) -> int:
        """The sum of its next offsets (a shard's events are on one partition)."""
        return sum(self.offsets.values())

    @classmethod
    def from_json(cls, raw: dict[str, Any], where: Path) -> SharedEntry:
        """Parse a stored entry.

        Raises:
            SharedSnapshotError: not an entry of this format (the file is named).
        """
        try:
            if raw.get("format") != ENTRY_FORMAT:
                raise ValueError(f"format {raw.get('format')!r}")
            return cls(int(raw["order"]), int(raw["pixel"]), str(raw["token"]),
                       {str(k): int(v) for k, v in raw["offsets"].items()},
                       list(raw["generation"]), str(raw["reuse_key"]), raw)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SharedSnapshotError(f"{where} is not a streamstars shard entry ({exc}); "
                                      "remove it, its shard is written again by its owner"
                                      ) from exc


def supersedes(offsets: dict[str, int], generation: Sequence[Any], reuse_key: str,
               current: SharedEntry | None) -> bool:
    """Whether a copy of a shard (its store's ``offsets``, ``generation``, ``reuse_key``)
    replaces the entry ``current``.

    With Kafka offsets: only a copy at or past ``current`` on every partition and further on
    at least one (a stale copy, left by a consumer that lost the partition, is behind; a copy
    at the same offsets holds the same events, hence the same data), or at the same offsets
    with other settings (``reuse_key``: a new configuration or streamstars version).  Without
    offsets on either side (a state fed without per-shard offsets has one writer): any other
    generation.
    """
    if current is None:
        return True
    if not offsets and not current.offsets:
        return list(generation) != current.generation or reuse_key != current.reuse_key
    if not all(offsets.get(k, -1) >= v for k, v in current.offsets.items()):
        return False
    if sum(offsets.values()) > current.position:
        return True
    return offsets == current.offsets and reuse_key != current.reuse_key


def entry_path(shared: str | os.PathLike[str], order: int, pixel: int) -> Path:
    """``SHARED/fgcm_stars/Norder=k/Dir=d/Npix=n.json``, the entry of shard (order, pixel)
    (d = n // 10000 * 10000, as a HATS partition's path).

    Raises:
        ValueError: no such HEALPix pixel.
    """
    dataset = Path(shared) / PARTITIONS_DIR / "dataset"
    relative = partition_path(dataset.parent, order, pixel).relative_to(dataset)
    return (Path(shared) / PARTITIONS_DIR / relative).with_suffix(".json")


def _data_path(entry_file: Path, token: str, suffix: str) -> Path:
    """``Npix=n.<token><suffix>`` beside the entry ``Npix=n.json``."""
    return entry_file.with_name(f"{entry_file.stem}.{token}{suffix}")


def _read_entry(path: Path) -> SharedEntry | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise SharedSnapshotError(f"{path} is not JSON ({exc}); remove it, its shard is "
                                  "written again by its owner") from exc
    return SharedEntry.from_json(raw, path)


def read_entries(shared: str | os.PathLike[str]) -> dict[str, SharedEntry]:
    """Every shard's entry in ``SHARED/fgcm_stars``, by ``order/pixel``.

    Raises:
        SharedSnapshotError: a damaged entry (named).
    """
    root = Path(shared) / PARTITIONS_DIR
    entries: dict[str, SharedEntry] = {}
    for path in sorted(root.glob("Norder=*/Dir=*/Npix=*.json")):
        if path.name.count(".") != 1:  # Npix=n.<token>.visits.json
            continue
        entry = _read_entry(path)
        if entry is not None:
            entries[entry.name] = entry
    return entries


@contextlib.contextmanager
def _locked(shared: Path) -> Iterator[None]:
    """``flock`` on ``SHARED/partitions.lock`` for the block."""
    shared.mkdir(parents=True, exist_ok=True)
    fd = os.open(shared / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


# --------------------------------------------------------------------------------------------
# writing the partitions of one state's shards
# --------------------------------------------------------------------------------------------


@dataclass
class PublishSummary:
    """What :func:`publish_partitions` did with the shards of one state directory.

    Attributes:
        written: shards whose copy replaced the entry (or made the first).
        unchanged: shards whose entry is already at their offsets (nothing derived).
        behind: shards whose entry is further than this state's copy (a stale copy: left).
        revoked: shards the state marks revoked (never published from it).
        violations: margin violations of the shards written.
    """

    written: list[str] = field(default_factory=list)
    unchanged: int = 0
    behind: list[str] = field(default_factory=list)
    revoked: int = 0
    violations: list[MarginViolation] = field(default_factory=list)


@dataclass
class _Staged:
    outcome: _ShardOutcome
    offsets: dict[str, int]
    visits_file: Path


def publish_partitions(state: StateDirectory, shared: str | os.PathLike[str], *,
                       config: BuildStarsConfig | None = None,
                       provenance: dict[str, str] | None = None) -> PublishSummary:
    """Write the partitions of the shards ``state`` holds into ``SHARED/fgcm_stars`` where
    they supersede the entries there (see the module docstring).

    Shards marked revoked are skipped; the others are compared with their entries from their
    stores' offsets (no derivation when the entry is as far), derived under the state's
    visit boundary (a writer waits meanwhile) and put in place one by one under
    ``partitions.lock``.

    Args:
        state: the consumer's state directory (read-only is enough).
        shared: the shared snapshot directory (created when missing).
        config: snapshot-time settings to derive with (default the state's).
        provenance: strings recorded with the entries and carried into the completed
            snapshot's provenance when every entry agrees (e.g. ``kafka_topic``).

    Returns:
        What was written, left or skipped.

    Raises:
        SharedSnapshotError: an entry in the way is damaged.
        OSError: the shared directory cannot be written.
    """
    shared = Path(shared)
    config = config or state.config
    margin = state.shard_margin
    key = _reuse_key(config, margin)
    summary = PublishSummary()
    staged: list[_Staged] = []
    with staged_directory(shared / PARTITIONS_DIR, "writing") as staging, \
            contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, staging.path, True)  # what was not put in place
        with state.visit_boundary(exclusive=False):
            state.check_shards_present()
            revoked = state.revoked_shards()
            for order, pixel in sorted(state.shards()):
                if pixel in revoked:
                    summary.revoked += 1
                    continue
                shard = ShardRef(order, pixel, state.shard_path(pixel))
                state.keep_open([pixel])
                store = state.open_shard(pixel)
                with store.read(buffers=True) as tx:
                    offsets = {_offset_key(t, p): int(o) for t, p, o in tx.offsets.items()}
                    current = _read_entry(entry_path(shared, order, pixel))
                    if not supersedes(offsets, _generation(tx), key, current):
                        if current is not None and current.offsets == offsets:
                            summary.unchanged += 1
                        else:
                            summary.behind.append(shard.name)
                        continue
                    job = _ShardJob(shard, config, margin, staging.path / CATALOG_DIR, key,
                                    None, None)
                    outcome = _snapshot_read_shard(job, store, tx)
                visits = staging.path / f"{order}-{pixel}.visits.json"
                _write_visits(visits, outcome.records)
                staged.append(_Staged(outcome, offsets, visits))
        entry_common = {"format": ENTRY_FORMAT, "format_version": ENTRY_VERSION,
                        "reuse_key": key, "config": to_dict(config), "shard_margin": margin,
                        "streamstars_version": __version__, "provenance": provenance or {},
                        "state": str(state.path)}
        for item in staged:
            if _commit(shared, item, entry_common):
                summary.written.append(item.outcome.shard.name)
                summary.violations += item.outcome.violations
            else:
                summary.behind.append(item.outcome.shard.name)
    return summary


def _write_visits(path: Path, records: list[VisitRecord]) -> None:
    with open(path, "wb") as handle:
        handle.write(b"[" + b",\n".join(r.to_json() for r in records) + b"]\n")
        handle.flush()
        os.fsync(handle.fileno())


def _commit(shared: Path, item: _Staged, common: dict[str, Any]) -> bool:
    """Put one staged shard in place if it still supersedes the entry (under the lock)."""
    outcome = item.outcome
    shard = outcome.shard
    target = entry_path(shared, shard.order, shard.pixel)
    with _locked(shared):
        current = _read_entry(target)
        if not supersedes(item.offsets, outcome.generation, common["reuse_key"], current):
            log.info("shard %s: the shared entry went past this copy meanwhile (offsets %s, "
                     "this copy %s); left", shard.name,
                     current.offsets if current else None, item.offsets)
            return False
        token = f"{int(time.time())}-{secrets.token_hex(6)}"
        target.parent.mkdir(parents=True, exist_ok=True)
        part = outcome.partition
        if part is not None:
            os.rename(part.path, _data_path(target, token, ".parquet"))
        os.rename(item.visits_file, _data_path(target, token, ".visits.json"))
        entry = {**common, "order": shard.order, "pixel": shard.pixel, "token": token,
                 "offsets": item.offsets, "generation": outcome.generation,
                 "partition": part is not None, **outcome.manifest_entry()}
        write_json_atomic(target, entry)  # publishes the copy
        _remove_other_tokens(target, token)
    return True


def _remove_other_tokens(target: Path, token: str) -> None:
    """Remove the files of the shard's earlier copies (and of writers killed between renaming
    their files in and replacing the entry)."""
    for path in target.parent.glob(f"{target.stem}.*"):
        if path == target or path.name.startswith(f"{target.stem}.{token}."):
            continue
        if path.name.endswith((".parquet", ".visits.json")):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


# --------------------------------------------------------------------------------------------
# completing the snapshot
# --------------------------------------------------------------------------------------------


class _Unchanged(Exception):
    """The output already holds the snapshot of the entries now there."""


def _completed_tokens(out: Path) -> tuple[dict[str, str], list[str]] | None:
    """The tokens of the entries the snapshot in ``out`` was completed from, and its formats
    (None: no such snapshot)."""
    try:
        manifest = json.loads((out / MANIFEST_NAME).read_text())
        shards = manifest["shards"]
        return ({name: str(e["token"]) for name, e in shards.items()},
                list(manifest["formats"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _is_current(out: Path, entries: dict[str, SharedEntry], formats: Sequence[str]) -> bool:
    done = _completed_tokens(out)
    return done is not None and done == ({n: e.token for n, e in entries.items()},
                                         list(formats))


def complete_shared_snapshot(shared: str | os.PathLike[str],
                             out: str | os.PathLike[str] | None = None, *,
                             formats: Sequence[str] = ("fits", "parquet"),
                             force: bool = False) -> ShardedSnapshotSummary | None:
    """Complete the snapshot of the newest partition of every shard in ``SHARED`` into
    ``out`` (default ``SHARED/snapshot``), swapped into place atomically.

    Args:
        shared: the shared snapshot directory.
        out: the snapshot directory to write (as ``streamstars snapshot OUT``).
        formats: ``fits`` and/or ``parquet`` flat files.
        force: write even when ``out`` already holds the snapshot of these entries.

    Returns:
        The summary (``written``: partitions new since the snapshot in ``out``, ``reused``:
        the others), or None when nothing changed (nothing written).

    Raises:
        SharedSnapshotError: no entry at all, entries written with other settings or
            streamstars versions (named), a damaged entry.
        SnapshotDirectoryError, SnapshotWriteError: as for any snapshot.
    """
    start = time.perf_counter()
    shared = Path(shared)
    target = Path(out) if out is not None else shared / SNAPSHOT_NAME
    fmts = list(check_formats(formats))  # as the manifest records them
    entries = read_entries(shared)
    if not entries:
        raise SharedSnapshotError(f"{shared} holds no shard partitions ({PARTITIONS_DIR}/"
                                  "Norder=*/Dir=*/Npix=*.json): no consumer wrote one yet")
    if not force and _is_current(target, entries, fmts):
        return None
    try:
        with stage_snapshot(target) as staging:
            previous = _completed_tokens(target) if staging.target_existed else None
            with _locked(shared):
                entries = read_entries(shared)
                if not force and _is_current(target, entries, fmts):
                    raise _Unchanged
                pinned = _pin(shared, entries, staging.path / CATALOG_DIR,
                              previous[0] if previous else {})
            summary = _finish(staging, entries, pinned, fmts)
    except _Unchanged:
        return None
    summary.seconds = time.perf_counter() - start
    for violation in summary.violations:
        log.warning("margin check: %s", violation.describe())
    return summary


@dataclass
class _Pinned:
    partitions: list[PartitionFile]
    records: list[list[VisitRecord]]


def _pin(shared: Path, entries: dict[str, SharedEntry], catalog: Path,
         previous: dict[str, str]) -> _Pinned:
    """Link every entry's partition into the staged catalog and read its visit records
    (under the lock: the entries cannot change meanwhile)."""
    keys = {e.reuse_key for e in entries.values()}
    if len(keys) > 1:
        by_key: dict[str, list[str]] = {}
        for e in entries.values():
            by_key.setdefault(e.reuse_key[:12], []).append(e.name)
        raise SharedSnapshotError(
            f"the shard partitions in {shared} were written with different settings or "
            f"streamstars versions ({by_key}); they cannot make one catalog. Run the "
            "consumers with one configuration and version: each writes its shards again "
            "at its next snapshot")
    pinned = _Pinned([], [])
    for name, entry in sorted(entries.items(), key=lambda kv: (kv[1].order, kv[1].pixel)):
        where = entry_path(shared, entry.order, entry.pixel)
        try:
            raw = _data_path(where, entry.token, ".visits.json").read_bytes()
            pinned.records.append([VisitRecord.from_json(json.dumps(r).encode())
                                   for r in json.loads(raw)])
        except (OSError, ValueError) as exc:
            raise SharedSnapshotError(f"shard {name}: its visit records cannot be read "
                                      f"({exc})") from exc
        if not entry.raw.get("partition"):
            continue
        src = _data_path(where, entry.token, ".parquet")
        dst = partition_path(catalog, entry.order, entry.pixel)
        link_or_copy(src, dst)
        pinned.partitions.append(PartitionFile(
            entry.order, entry.pixel, dst, int(entry.raw["stars"]),
            int(entry.raw["observations"]), reused=previous.get(name) == entry.token))
    return pinned


def _finish(staging: Any, entries: dict[str, SharedEntry], pinned: _Pinned,
            formats: list[str]) -> ShardedSnapshotSummary:
    """The catalog files, the flat files and the manifest of the pinned entries."""
    ordered = sorted(entries.values(), key=lambda e: (e.order, e.pixel))
    first = ordered[0].raw
    records = merge_visit_records(pinned.records)
    filters = tuple(_one_value([], "reference filters",
                               [list(e.raw.get("reference_filters") or []) for e in ordered])
                    or ())
    refcat = _one_value([], "reference catalogs", [e.raw.get("refcat") for e in ordered])
    provenances = [e.raw.get("provenance") or {} for e in ordered]
    common = {k: v for k, v in provenances[0].items()
              if all(p.get(k) == v for p in provenances[1:])}
    metadata = {
        "streamstars_version": str(first["streamstars_version"]),
        "visits": json.dumps([r.visit for r in records]),
        "kafka_offsets": json.dumps(kafka_offsets(records), sort_keys=True),
        "config": json.dumps(first["config"], sort_keys=True),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **({"refcat": refcat} if refcat else {}),
        **{str(k): str(v) for k, v in common.items()},
    }
    violations = [MarginViolation(**v) for e in ordered
                  for v in e.raw.get("margin_violations", [])]
    shards = {e.name: {k: e.raw.get(k) for k in ("generation", "stars", "observations",
                                                  "reference_filters", "refcat",
                                                  "margin_violations", "offsets", "token")}
              for e in ordered}
    files = finish_partitioned_snapshot(
        staging, pinned.partitions, visits=visit_catalog(records), metadata=metadata,
        reference_filters=filters, formats=formats,
        extra={"reuse_key": ordered[0].reuse_key, "shards": shards,
               "margin_violations": len(violations)})
    parts = pinned.partitions
    written = sum(1 for p in parts if not p.reused)
    return ShardedSnapshotSummary(
        staging.target, len(records), sum(p.n_stars for p in parts),
        sum(p.n_observations for p in parts), 0.0, files, written, len(parts) - written,
        violations)
