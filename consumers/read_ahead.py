"""Read-ahead: while one visit is applied, the next ones of the fetched batch are read and
selected in a background thread, so a backlog is consumed at the writer's pace.

Nothing else changes: visits are applied and committed one by one, in order; a visit whose
read-ahead failed is read again by the normal path (with its retries); what a stop leaves
behind is neither applied nor committed.  No Kafka callback can run between two messages of a
batch (callbacks only run inside ``consume``/``poll``).  The events decoded here are handed to
the normal path, which does not decode them again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from confluent_kafka import Message

from streamstars.events import VisitEvent, parse_message
from streamstars.ingest import PreparedVisit

from .kafka_client import Position, position_of
from .metrics import ConsumerMetrics

__all__ = ["ReadAhead"]

log = logging.getLogger("streamstars.run")


class ReadAhead:
    """Up to ``depth`` visits of the current batch prepared ahead (0: none).

    Args:
        depth: visits read ahead of the one being applied (``--read-ahead``).
        prepare: reads and selects the visit of an event (no store access).
        metrics: counts read-aheads used or failed.
        needs_reading: whether an event's visit, at its position, is read when applied
            (called here, in the consumer's thread); default: every event but a retraction.
    """

    def __init__(self, depth: int, prepare: Callable[[VisitEvent], PreparedVisit],
                 metrics: ConsumerMetrics,
                 needs_reading: Callable[[VisitEvent, Position], bool] | None = None
                 ) -> None:
        self.depth = depth
        self.prepare = prepare
        self.metrics = metrics
        self.needs_reading = needs_reading or _not_a_retraction
        self._pool: ThreadPoolExecutor | None = None
        self._events: dict[Position, VisitEvent] = {}
        self._prepared: dict[Position, Future[PreparedVisit]] = {}

    @property
    def enabled(self) -> bool:
        """True when visits are read ahead (``depth`` > 0)."""
        return self.depth > 0

    def start(self) -> None:
        """Start the background thread (when enabled)."""
        if self.enabled and self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead")

    def submit(self, following: Sequence[Message]) -> None:
        """Keep the next ``depth`` visits of ``following`` (the rest of the batch) being read
        in the background; events that cannot be decoded are left to the normal path."""
        if self._pool is None:
            return
        wanted = self.depth
        for msg in following:
            if wanted <= 0:
                return
            if msg.error() is not None:
                continue
            position = position_of(msg)
            wanted -= 1
            if position in self._events:
                continue
            try:
                event = parse_message(msg.value(), msg.key())
            except Exception:  # noqa: BLE001 - the normal path dead-letters it
                continue
            self._events[position] = event
            if self.needs_reading(event, position):
                self._prepared[position] = self._pool.submit(self.prepare, event)

    def event(self, position: Position) -> VisitEvent | None:
        """The event of the message at ``position`` if it was decoded here."""
        return self._events.get(position)

    def take(self, position: Position, event: VisitEvent) -> PreparedVisit | None:
        """The visit of ``event`` read ahead (waiting for it if need be), or None when it
        was not read ahead or its reading failed (then read it again, with retries)."""
        future = self._prepared.pop(position, None)
        if future is None:
            return None
        try:
            prepared = future.result()
        except Exception as exc:  # noqa: BLE001 - read again by the caller, with the retries
            self.metrics.read_ahead.labels("failed").inc()
            log.debug("%s: read-ahead failed (%s); reading it again", event.describe(), exc)
            return None
        self.metrics.read_ahead.labels("used").inc()
        return prepared if prepared.visit == event.visit else None

    def clear(self) -> None:
        """Forget the batch (what a stop left behind is consumed again later)."""
        self._events.clear()
        self._prepared.clear()

    def close(self) -> None:
        """Stop the background thread (cancelling what has not started)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self.clear()


def _not_a_retraction(event: VisitEvent, _position: Position) -> bool:
    return event.action != "retract"
