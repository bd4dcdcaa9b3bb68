"""The consumer's Kafka client: settings, subscription, assignment, fetching, commits, lag.

Auto-commit is off and the LMDB store is the source of truth for positions: when partitions
are assigned, each one is seeked to the next offset stored in LMDB (the beginning when the
store has none), or once, at the first assignment of the process, to ``--seek-offset`` /
``--seek-time``.  The Kafka commit after each message is a convenience for monitoring tools.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from .context import RunContext

__all__ = ["KafkaClient", "Position", "position_of"]

log = logging.getLogger("streamstars.run")

#: The lag gauge is refreshed at most this often (seconds).
_LAG_INTERVAL = 2.0


@dataclass(frozen=True)
class Position:
    """Where a message is: topic, partition and its offset."""

    topic: str
    partition: int
    offset: int

    @property
    def next_offset(self) -> int:
        """The offset to consume after this message (what LMDB and Kafka record)."""
        return self.offset + 1

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


def position_of(msg: Message) -> Position:
    """The position of a fetched message (not an error event).

    Raises:
        ValueError: the message has no topic, partition or offset (an error event).
    """
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    if topic is None or partition is None or offset is None:
        raise ValueError(f"a Kafka message without a position: {msg.error()}")
    return Position(topic, partition, offset)


class KafkaClient:
    """One ``confluent_kafka.Consumer`` subscribed to the visits topic.

    Args:
        ctx: the consumer's options (bootstrap, topic, group, client settings, seeks), its
            readiness (follows the assignment), metrics (lag, failed commits) and stop request
            (set on a fatal Kafka error).
        stored_offsets: partition -> next offset recorded in LMDB for a topic.
        ownership: told (topic, partitions, owned) at assignments and revocations.
        restore: told (topic, partitions) at assignments, before the seek; returns the start
            offsets of the partitions whose shards it restored (0: the beginning).
    """

    def __init__(self, ctx: RunContext,
                 stored_offsets: Callable[[str], dict[int, int]],
                 ownership: Callable[[str, list[int], bool], None] | None = None,
                 restore: Callable[[str, list[int]], dict[int, int]] | None = None) -> None:
        self.ctx = ctx
        self.opts = ctx.options
        self._stored_offsets = stored_offsets
        #: called with newly assigned partitions before they are seeked: brings their shards
        #: up to date (shard backups) and returns where each restored partition starts
        self._restore = restore
        #: told (topic, partitions, owned) when partitions are assigned (True) or revoked /
        #: lost (False): the state marks their shards
        self._ownership = ownership
        #: the cooperative rebalance protocol (incremental assignment changes)
        self.cooperative = False
        self.consumer: Consumer | None = None
        #: partitions assigned now
        self.assigned: set[int] = set()
        #: when partitions were last assigned (monotonic seconds; --exit-when-idle counts
        #: from there: nothing can be fetched before)
        self.assigned_at = time.monotonic()
        self._seek_pending = bool(self.opts.seek_offsets or self.opts.seek_time)
        self._last_lag_update = 0.0
        #: partition -> offset its latest assignment started at (the lag before a fetch)
        self._assigned_from: dict[int, int] = {}

    def settings(self) -> dict[str, Any]:
        """The librdkafka settings: ours, then ``--kafka-config``, then those that must hold."""
        opts = self.opts
        settings: dict[str, Any] = {
            "auto.offset.reset": "earliest",
            "max.poll.interval.ms": int(max(300.0, opts.retry_max_seconds + 600.0) * 1000),
        }
        if opts.group_instance_id:
            # static membership: a restart within session.timeout.ms keeps the partitions
            settings["group.instance.id"] = opts.group_instance_id
        settings.update(opts.kafka_config)
        if opts.assignment_strategy:
            settings["partition.assignment.strategy"] = opts.assignment_strategy
        settings.update(
            {
                "bootstrap.servers": opts.bootstrap,
                "group.id": opts.group,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "client.id": f"streamstars-{socket.gethostname()}-{os.getpid()}",
                "error_cb": self._on_error,
            }
        )
        return settings

    def start(self) -> None:
        """Create the consumer and subscribe (partitions come with the first fetches)."""
        settings = self.settings()
        # partition.assignment.strategy=cooperative-sticky (--kafka-config): a rebalance
        # moves only the partitions that change owner, with incremental (un)assignments
        strategies = {s.strip() for s in
                      str(settings.get("partition.assignment.strategy", "")).split(",")}
        self.cooperative = strategies == {"cooperative-sticky"}
        self.consumer = Consumer(settings)
        self.consumer.subscribe([self.opts.topic], on_assign=self._on_assign,
                                on_revoke=self._on_revoke, on_lost=self._on_lost)

    def fetch(self, batch: int) -> list[Message]:
        """Up to ``batch`` messages already fetched (no waiting) when ``batch`` > 1, else (or
        when there are none) those of one poll of ``poll_seconds``."""
        assert self.consumer is not None
        messages = self.consumer.consume(num_messages=batch, timeout=0) if batch > 1 else []
        if not messages:
            msg = self.consumer.poll(self.opts.poll_seconds)
            messages = [] if msg is None else [msg]
        return list(messages)

    def commit(self, position: Position) -> None:
        """Commit the offset after ``position`` to Kafka; a failure is counted and logged
        (harmless: the LMDB store holds it)."""
        assert self.consumer is not None
        try:
            self.consumer.commit(offsets=[TopicPartition(position.topic, position.partition,
                                                         position.next_offset)],
                                 asynchronous=False)
        except KafkaException as exc:
            self.ctx.metrics.kafka_commit_failures.inc()
            log.warning("Kafka commit of %s[%d]@%d failed (the LMDB store holds it): %s",
                        position.topic, position.partition, position.next_offset, exc)

    def update_lag(self) -> None:
        """Refresh ``streamstars_consumer_lag`` (at most every 2 s; never raises)."""
        now = time.monotonic()
        if now - self._last_lag_update <= _LAG_INTERVAL:
            return
        self._last_lag_update = now
        if not self.assigned or self.consumer is None:
            return
        try:
            tps = [TopicPartition(self.opts.topic, p) for p in sorted(self.assigned)]
            positions = {tp.partition: tp.offset for tp in self.consumer.position(tps)}
            for tp in tps:
                low, high = self.consumer.get_watermark_offsets(tp, cached=True)
                pos = positions.get(tp.partition, -1)
                if pos is None or pos < 0:
                    # nothing consumed since the assignment (e.g. it started at the end):
                    # the position is where the assignment started it
                    start = self._assigned_from.get(tp.partition, OFFSET_BEGINNING)
                    pos = low if start == OFFSET_BEGINNING else start
                if high is not None and high >= 0 and pos is not None and pos >= 0:
                    self.ctx.metrics.lag.labels(self.opts.topic, str(tp.partition)).set(
                        max(0, high - pos)
                    )
        except Exception as exc:  # noqa: BLE001 - metrics must never stop ingestion
            log.debug("lag update failed: %s", exc)

    def close(self) -> None:
        """Leave the group (offsets were committed per message); errors are logged."""
        if self.consumer is None:
            return
        # leaving the group revokes every partition: the shards stay owned (a stopped
        # consumer's state is not stale until another consumer applies past it)
        self._ownership = None
        try:
            self.consumer.close()
        except Exception as exc:  # noqa: BLE001
            log.warning("closing the consumer: %s", exc)
        self.consumer = None

    # ------------------------------------------------------------------ callbacks
    def _on_error(self, err: KafkaError) -> None:
        log.warning("kafka: %s", err)
        if err.fatal():
            log.error("fatal Kafka error, stopping: %s", err)
            self.ctx.stop_requested.set()

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        restored = self._restore(self.opts.topic, [tp.partition for tp in partitions]) \
            if self._restore is not None and partitions else {}
        stored = self._stored_offsets(self.opts.topic)
        for tp in partitions:
            if tp.partition in restored:
                start = restored[tp.partition]
                tp.offset = start if start > 0 else OFFSET_BEGINNING
                where = (f"offset {start}" if start > 0 else "the beginning") + \
                    " (its shards brought up to their partition index)"
            elif tp.partition in stored:
                tp.offset = stored[tp.partition]
                where = f"offset {tp.offset} (from the LMDB store)"
            else:
                tp.offset = OFFSET_BEGINNING
                where = "the beginning (no offset in the store)"
            log.info("assigned %s[%d]: starting at %s", tp.topic, tp.partition, where)
        if self._seek_pending:
            self._apply_seek_overrides(consumer, partitions)
        self._assigned_from.update({tp.partition: tp.offset for tp in partitions})
        if self._ownership is not None and partitions:
            self._ownership(self.opts.topic, [tp.partition for tp in partitions], True)
        if self.cooperative:
            consumer.incremental_assign(partitions)
            self.assigned |= {tp.partition for tp in partitions}
        else:
            consumer.assign(partitions)
            self.assigned = {tp.partition for tp in partitions}
        self.assigned_at = time.monotonic()
        self.ctx.health.set_ready(True, f"consuming partitions {sorted(self.assigned)}")

    def _apply_seek_overrides(self, consumer: Consumer,
                              partitions: list[TopicPartition]) -> None:
        """``--seek-offset`` / ``--seek-time``: replay from there, once, at first assignment."""
        opts = self.opts
        self._seek_pending = False
        if opts.seek_time is not None:
            millis = int(opts.seek_time.timestamp() * 1000)
            query = [TopicPartition(tp.topic, tp.partition, millis) for tp in partitions]
            found = consumer.offsets_for_times(query, timeout=30)
            by_part = {tp.partition: tp.offset for tp in found}
            for tp in partitions:
                if by_part.get(tp.partition, -1) >= 0:
                    tp.offset = by_part[tp.partition]
                    log.info("replay: %s[%d] from offset %d (time %s)", tp.topic,
                             tp.partition, tp.offset, opts.seek_time.isoformat())
        for tp in partitions:
            if tp.partition in opts.seek_offsets:
                tp.offset = opts.seek_offsets[tp.partition]
                log.info("replay: %s[%d] from offset %d", tp.topic, tp.partition, tp.offset)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("partitions revoked: %s", sorted(tp.partition for tp in partitions))
        self._give_up(consumer, partitions, "rebalancing")

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.warning("partitions lost: %s", sorted(tp.partition for tp in partitions))
        self._give_up(consumer, partitions, "partitions lost")

    def _give_up(self, consumer: Consumer, partitions: list[TopicPartition],
                 why: str) -> None:
        """Stop consuming ``partitions`` (all of them with the eager protocol) and have the
        state mark their shards revoked (called between two messages: nothing in flight)."""
        gone = {tp.partition for tp in partitions}
        if self._ownership is not None and gone:
            self._ownership(self.opts.topic, sorted(gone), False)
        for partition in gone:
            # only a partition's owner reports its lag (the dashboard's per-partition panels)
            with contextlib.suppress(KeyError):
                self.ctx.metrics.lag.remove(self.opts.topic, str(partition))
        if self.cooperative:
            if partitions:
                consumer.incremental_unassign(partitions)
            self.assigned -= gone
        else:
            consumer.unassign()
            self.assigned = set()
        if not self.assigned:
            self.ctx.health.set_ready(False, why)
