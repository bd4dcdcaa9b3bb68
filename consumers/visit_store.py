"""The consumer's state directory: the one consumer part that uses :mod:`streamstars.state` and
the store steps of :mod:`streamstars.ingest` and the snapshot.

Each visit is applied to every sky shard it touches (one write transaction per shard,
:func:`streamstars.ingest.apply_prepared`); its partition's next offset is recorded in the
state's index in the same transaction that marks the visit applied, after every shard
committed, and a message that changes nothing else (a dead letter) records its offset alone,
so the index always knows where each partition resumes (:meth:`ConsumerStore.stored_offsets`)
and a visit interrupted between two shards is delivered again and completed.  An event naming
exactly the Butler datasets a visit was applied from is skipped without reading
(:meth:`ConsumerStore.applied_from`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from streamstars.butler.read import event_dataset_ids
from streamstars.config import BuildStarsConfig, load_config
from streamstars.errors import StateError
from streamstars.events import ShardEventError, VisitEvent
from streamstars.ingest import (
    ApplyResult,
    KafkaOffset,
    PreparedVisit,
    RoutedVisit,
    apply_prepared,
    apply_shard_event,
    repair_shard_visit,
    retract_shard_event,
    retract_visit,
    route_visit,
)
from streamstars.references import ReferenceSource, attach_references, open_reference_source
from streamstars.sharded_snapshot import ShardedSnapshotSummary, write_state_snapshot
from streamstars.shared_snapshot import complete_shared_snapshot, publish_partitions
from streamstars.state import StateDirectory
from streamstars.state.directory import MANIFEST_NAME
from streamstars.state.shard_copies import (
    ShardBackup,
    backup_offsets,
    install_shard_backup,
    list_shard_backups,
    prune_shard_backups,
    write_shard_backup,
)

from .kafka_client import Position
from .options import RunOptions

__all__ = ["ConsumerStore"]

log = logging.getLogger("streamstars.run")


class ConsumerStore:
    """The store of ``options.state``, opened by :meth:`open` and closed by :meth:`close`."""

    def __init__(self, options: RunOptions) -> None:
        self.opts = options
        self._store: StateDirectory | None = None
        #: the checked reference catalog visits cache stars from (None: no catalog)
        self._references: ReferenceSource | None = None
        #: the visit of the last shard event, routed (its other shard events reuse it)
        self._routed: RoutedVisit | None = None

    @property
    def star_store(self) -> StateDirectory:
        """The open :class:`~streamstars.state.StateDirectory`.

        Raises:
            StateError: the store is not open.
        """
        if self._store is None:
            raise StateError(f"the state {self.opts.state} is not open")
        return self._store

    @property
    def is_open(self) -> bool:
        """True between :meth:`open` and :meth:`close`."""
        return self._store is not None

    @property
    def config(self) -> BuildStarsConfig:
        """The configuration the store was built with."""
        return self.star_store.config

    def open(self) -> None:
        """Open (or create) the store with ``--config`` (the store's own configuration when
        it exists and none is given) and check its reference catalog, before any event.

        Raises:
            RefcatError: the configured reference catalog cannot be used, or the store
                caches another one (run ``streamstars refresh-refs``).
            StreamstarsError: the store cannot be opened (a ``StateError``, a bad config).
        """
        opts = self.opts
        config: BuildStarsConfig | None
        if opts.config_path is not None:
            config = load_config(opts.config_path)
        elif (opts.state / MANIFEST_NAME).exists():
            config = None  # the configuration the store was built with
        else:
            config = BuildStarsConfig()
        # validate the reference catalog before the store is touched (when the config is
        # given), and that the store caches the same catalog (a catalog kept in a Butler is
        # read from --butler unless the config names its repository)
        source = open_reference_source(config.fgcmLoadReferenceCatalog, opts.butler) \
            if config else None
        store = StateDirectory.open(opts.state, config)
        try:
            self._references = attach_references(store, source, butler=opts.butler)
        except BaseException:
            store.close()
            raise
        self._store = store

    def close(self) -> None:
        """Close the state directory (nothing when it is not open)."""
        if self._store is not None:
            self._store.close()
            self._store = None

    def visit_count(self) -> int:
        """How many visits the state holds (completely applied)."""
        return len(self.star_store.applied_visits())

    def stored_offsets(self, topic: str) -> dict[int, int]:
        """partition -> next offset to consume of ``topic``, as recorded with the visits."""
        return self.star_store.stored_offsets(topic)

    def applied_from(self, event: VisitEvent) -> bool:
        """True when the store holds the event's visit from exactly the Butler datasets the
        event names (datasets are immutable: there is nothing to read).  False for file
        events and retractions."""
        if event.butler_datasets is None or event.action == "retract":
            return False
        record = self.star_store.visit_record(event.visit)
        return record is not None and record.dataset_ids == event_dataset_ids(event)

    def record_offset(self, position: Position) -> None:
        """Record the offset after ``position`` alone (a message that changes nothing else)."""
        self.star_store.record_offset(position.topic, position.partition, position.next_offset)

    def apply(self, prepared: PreparedVisit, *, replace: bool,
              position: Position) -> ApplyResult:
        """Apply a prepared visit to its shards, then the offset after ``position`` with the
        visit's completion in the index (:func:`streamstars.ingest.apply_prepared`)."""
        return apply_prepared(self.star_store, prepared, replace=replace,
                              kafka_offset=_kafka_offset(position), references=self._references)

    def retract(self, visit: int, position: Position) -> ApplyResult:
        """Retract ``visit`` from its shards and record the offset after ``position`` with
        its removal from the index (:func:`streamstars.ingest.retract_visit`)."""
        return retract_visit(self.star_store, visit, kafka_offset=_kafka_offset(position))

    def mark_partitions(self, topic: str, partitions: list[int], owned: bool) -> None:
        """The shards that events of ``partitions`` reached (their stores record an offset of
        the partition) are marked owned again (assigned) or revoked: a revoked shard's copy
        here is stale and this consumer's snapshots leave it out."""
        state = self.star_store
        wanted = set(partitions)
        shards = [pixel for pixel, offsets in state.shard_offsets(topic).items()
                  if wanted & set(offsets)]
        if not shards:
            return
        if owned:
            if state.revoked_shards() & set(shards):
                state.set_revoked(shards, revoked=False)
            return
        state.set_revoked(shards, revoked=True)
        for pixel in shards:
            state.close_shard(pixel)  # closed: written again only once reassigned

    # ------------------------------------------------------------------ shard events
    def check_shard_event(self, event: VisitEvent) -> None:
        """A shard event must name a shard of this state's ``shardNside``.

        Raises:
            ShardEventError: another nside (the publisher and the consumers disagree).
        """
        state = self.star_store
        if event.shard_nside != state.shard_nside:
            raise ShardEventError(
                f"{event.describe()}: the event is routed to shards of nside "
                f"{event.shard_nside}, this state {self.opts.state} has shardNside "
                f"{state.shard_nside}; publish with the consumers' shardNside "
                "(`streamstars publish --shard-nside` or --config)")

    def shard_past(self, event: VisitEvent, position: Position) -> bool:
        """Whether the store of the event's shard records an offset of the partition past
        ``position`` (nothing to read; no repair: see :meth:`shard_event_done`)."""
        assert event.shard is not None
        own = self.star_store.shard_offset(event.shard, position.topic, position.partition)
        return own is not None and position.offset < own

    def shard_event_done(self, event: VisitEvent, position: Position) -> bool:
        """Whether the shard of ``event`` already applied it: its store's next offset of the
        partition is past the event (a shard with no record of the partition: the state's
        watermark of the partition).  When the index's watermark lags (a stop between the
        shard's commit and the index's), the index is repaired here."""
        assert event.shard is not None
        state = self.star_store
        watermark = state.stored_offsets(position.topic).get(position.partition)
        own = state.shard_offset(event.shard, position.topic, position.partition)
        done_below = own if own is not None else watermark
        if done_below is None or position.offset >= done_below:
            return False
        if watermark is None or watermark < position.next_offset:
            repair_shard_visit(state, event.visit, event.shard, _kafka_offset(position))
        return True

    def apply_shard(self, prepared: PreparedVisit, event: VisitEvent,
                    position: Position) -> ApplyResult:
        """Apply the event's shard of the visit with the partition's next offset in the
        shard's transaction (:func:`streamstars.ingest.apply_shard_event`)."""
        assert event.shard is not None
        state = self.star_store
        routed = self._routed
        if routed is None or routed.prepared is not prepared:
            # the other shard events of this visit reuse its routing (and its prepared rows:
            # consumers/prepare.py)
            routed = self._routed = route_visit(prepared, state.shard_nside, state.shard_margin)
        return apply_shard_event(state, prepared, event.shard, event.shards,
                                 replace=event.action == "replace",
                                 kafka_offset=_kafka_offset(position),
                                 references=self._references, routed=routed)

    def retract_shard(self, event: VisitEvent, position: Position) -> ApplyResult:
        """Remove the event's visit from the event's shard only."""
        assert event.shard is not None
        return retract_shard_event(self.star_store, event.visit, event.shard,
                                   kafka_offset=_kafka_offset(position))

    # ------------------------------------------------------------------ shard backups
    @property
    def shard_order(self) -> int:
        """``log2(shardNside)`` of the state."""
        return self.star_store.shard_order

    @property
    def shard_nside(self) -> int:
        """``shardNside`` of the state."""
        return self.star_store.shard_nside

    def watermark(self, topic: str, partition: int) -> int | None:
        """The partition's watermark: every event of it below is done in this state."""
        return self.star_store.stored_offsets(topic).get(int(partition))

    def raise_watermark(self, topic: str, partition: int, offset: int) -> None:
        """Record ``offset`` as the partition's watermark when it is higher (every event of
        the partition below it is done here, e.g. after a restore from backups)."""
        now = self.watermark(topic, partition)
        if now is None or offset > now:
            self.star_store.record_offset(topic, int(partition), int(offset))

    def partition_shards(self, topic: str, partition: int) -> list[int]:
        """The shards this state owns whose stores record an offset of the partition."""
        state = self.star_store
        revoked = state.revoked_shards()
        return sorted(pixel for pixel, offsets in state.shard_offsets(topic).items()
                      if int(partition) in offsets and pixel not in revoked)

    def shard_next_offset(self, pixel: int, topic: str, partition: int) -> int | None:
        """The partition's next offset recorded by the shard's own store (None: no store,
        or no event of the partition reached it)."""
        return self.star_store.shard_offset(pixel, topic, partition)

    def backup_shard(self, pixel: int, root: Path, *, topic: str, partition: int,
                     consumer: str) -> tuple[ShardBackup, int]:
        """Write a backup of one shard into ``root``
        (:func:`streamstars.state.shard_copies.write_shard_backup`); the backup and the
        number of visits it holds.

        Raises:
            ShardBackupError: the backup directory cannot be written.
        """
        backup, manifest = write_shard_backup(self.star_store, pixel, root, topic=topic,
                                              partition=partition, consumer=consumer)
        return backup, int(manifest["visits"])

    def shard_backups(self, root: Path, pixel: int) -> list[ShardBackup]:
        """The backups of a shard in ``root``, newest first.

        Raises:
            OSError: the shard's backup directory cannot be listed.
        """
        return list_shard_backups(root, self.shard_order, pixel)

    def prune_shard_backups(self, root: Path, pixel: int) -> list[Path]:
        """Remove the shard's backups beyond its newest two (what was removed)."""
        return prune_shard_backups(root, self.shard_order, pixel)

    def install_shard_backup(self, backup: ShardBackup, topic: str,
                             partition: int) -> tuple[int, int]:
        """Install a backup of one of the state's shards in place of its copy (verified;
        :func:`streamstars.state.shard_copies.install_shard_backup`); the partition's next
        offset it holds and its visit count.

        Raises:
            ShardBackupRejected: partial, corrupt, another shard / configuration / partition.
            ShardBackupError: it cannot be copied into the state.
        """
        manifest = install_shard_backup(self.star_store, backup, (topic, partition))
        return backup_offsets(manifest)[(topic, partition)], int(manifest["visits"])

    def write_snapshot(self) -> ShardedSnapshotSummary | None:
        """Write a snapshot to ``--snapshot-dir`` (safe while another thread applies visits).

        With ``--snapshot-shared``: the partitions of this state's shards that are past the
        shared ones are written into ``--snapshot-dir``, then the snapshot
        ``--snapshot-dir/snapshot`` is completed from the newest partition of every shard
        (:mod:`streamstars.shared_snapshot`); None when it already held exactly those.
        """
        opts = self.opts
        assert opts.snapshot_dir is not None
        provenance = {"kafka_topic": opts.topic, "kafka_group": opts.group}
        if opts.snapshot_shared:
            published = publish_partitions(self.star_store, opts.snapshot_dir,
                                           provenance=provenance)
            log.info("shared snapshot %s: %d shard partition(s) written, %d unchanged, %d "
                     "behind the shared copy, %d revoked", opts.snapshot_dir,
                     len(published.written), published.unchanged, len(published.behind),
                     published.revoked)
            return complete_shared_snapshot(opts.snapshot_dir, formats=opts.snapshot_formats)
        return write_state_snapshot(self.star_store, opts.snapshot_dir,
                                    formats=opts.snapshot_formats, extra_metadata=provenance)


def _kafka_offset(position: Position) -> KafkaOffset:
    return KafkaOffset(position.topic, position.partition, position.next_offset)
