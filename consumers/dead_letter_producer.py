"""Dead letters on their way: the record of a message that cannot be applied is produced to
the dead-letter topic and acknowledged by the broker before the message's offset is recorded.

A dead letter always fits in one message (:mod:`.dead_letters` cuts the event to the limit,
and the limit is halved when the broker still refuses the letter as too large); other delivery
failures are retried with backoff while the partition waits, until delivered or a stop is
requested.  A letter is produced again only after the previous attempt failed for good, so it
is not delivered twice by one process.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from streamstars import __version__
from streamstars.errors import (
    FootprintMissError,
    InputFileError,
    MissingMetadataError,
    StreamstarsError,
    TransientInputError,
    VisitConflictError,
)
from streamstars.events import (
    ForbiddenPathError,
    MalformedEventError,
    ShardEventError,
    VisitEvent,
    now_iso,
)

from .context import RunContext
from .dead_letters import (
    LIBRDKAFKA_MESSAGE_MAX_BYTES,
    DeadLetter,
    build_dead_letter,
    dead_letter_limit,
    shrink_limit,
)
from .retries import Retrier, Shutdown, UnexpectedError

__all__ = ["DeadLetterProducer", "reason_of"]

log = logging.getLogger("streamstars.run")

#: Settings of ``--kafka-config`` that only a consumer understands (librdkafka warns about
#: them on a producer).
_CONSUMER_ONLY = frozenset({
    "auto.offset.reset", "max.poll.interval.ms", "session.timeout.ms",
    "heartbeat.interval.ms", "group.id", "enable.auto.commit",
    "enable.auto.offset.store", "fetch.wait.max.ms", "partition.assignment.strategy",
    "group.instance.id", "fetch.min.bytes", "fetch.max.bytes", "isolation.level",
    "auto.commit.interval.ms", "enable.partition.eof", "max.partition.fetch.bytes",
    "check.crcs", "queued.min.messages", "queued.max.messages.kbytes",
    "group.protocol.type", "coordinator.query.interval.ms",
})


def reason_of(exc: BaseException) -> str:
    """A short, bounded label of why a message is dead-lettered (the metric's label and the
    record's ``error.reason``, docs/events.md)."""
    if isinstance(exc, ForbiddenPathError):
        return "forbidden_path"
    if isinstance(exc, ShardEventError):
        return "shard_nside_mismatch"
    if isinstance(exc, FootprintMissError):
        return "footprint_missed_shard"
    if isinstance(exc, MalformedEventError):
        return "malformed_event"
    if isinstance(exc, TransientInputError | OSError):
        return "transient_exhausted"
    if isinstance(exc, UnexpectedError):
        return "unexpected"
    if isinstance(exc, VisitConflictError):
        return "conflict"
    if isinstance(exc, MissingMetadataError):
        return "missing_metadata"
    if isinstance(exc, InputFileError):
        return "invalid_input"
    return "permanent"


class DeadLetterProducer:
    """Builds, logs, counts and (with a dead-letter topic) delivers dead letters."""

    def __init__(self, ctx: RunContext, retrier: Retrier) -> None:
        self.ctx = ctx
        self.opts = ctx.options
        self.topic = self.opts.dead_letter_topic or None
        self.retrier = retrier
        #: the largest dead letter (bytes), set by :meth:`configure`
        self.max_bytes = LIBRDKAFKA_MESSAGE_MAX_BYTES
        self.producer: Producer | None = None

    def settings(self) -> dict[str, Any]:
        """The producer's librdkafka settings: ``--kafka-config`` without the consumer-only
        keys, then bootstrap and ``acks=all``."""
        settings: dict[str, Any] = {
            k: v for k, v in self.opts.kafka_config.items() if k not in _CONSUMER_ONLY
        }
        settings.update({"bootstrap.servers": self.opts.bootstrap, "acks": "all"})
        return settings

    def configure(self) -> None:
        """Fix the size limit of dead letters (``--dead-letter-max-bytes``, else the
        producer's ``message.max.bytes`` less 1 KiB).

        Raises:
            ConfigError: the limit is not usable and dead letters go to a topic (when they are
                only logged, the default limit is used).
        """
        try:
            self.max_bytes = dead_letter_limit(self.settings(), self.opts.dead_letter_max_bytes)
        except StreamstarsError:
            if self.topic:
                raise
            self.max_bytes = LIBRDKAFKA_MESSAGE_MAX_BYTES  # only logged

    def start(self) -> None:
        """Create the producer (when dead letters go to a topic)."""
        if self.topic:
            self.producer = Producer(self.settings())
            log.info("dead letters go to %s, at most %d bytes each", self.topic,
                     self.max_bytes)

    def close(self) -> None:
        """Deliver what is still queued (at most 10 s)."""
        if self.producer is not None:
            self.producer.flush(10)
            self.producer = None

    def send(self, msg: Message, event: VisitEvent | None, exc: BaseException, *,
             permanent: bool, attempts: int = 1) -> None:
        """Dead-letter ``msg`` for ``exc``: log it and, with a topic, deliver it (waiting
        for the broker's acknowledgement).

        Raises:
            Shutdown: a stop was requested while the delivery was failing.
        """
        reason = reason_of(exc)
        build = self._builder(msg, event, {
            "type": type(exc).__name__,
            "reason": reason,
            "message": str(exc),
            "permanent": permanent,
            "attempts": attempts,
        })
        letter = build(self.max_bytes)
        shown = str(exc)
        if len(shown) > 1000:
            shown = f"{shown[:1000]}... [{len(shown) - 1000} more characters]"
        log.error("dead letter (%s) for %s[%d]@%d (%d bytes%s): %s", reason, msg.topic(),
                  msg.partition(), msg.offset(), len(letter.value),
                  ", event truncated" if letter.truncated else "", shown)
        if self.producer is not None:
            letter = self._deliver(self.producer, letter, build, reason)
        if letter.truncated:
            self.ctx.metrics.dead_letters_truncated.inc()
        self.ctx.metrics.dead_lettered.labels(reason).inc()

    def _builder(self, msg: Message, event: VisitEvent | None,
                 error: dict[str, Any]) -> Callable[[int], DeadLetter]:
        """Builds the dead letter of ``msg`` within a size limit (the same record, stamped
        now, whatever limit it is rebuilt with)."""
        dead_lettered_at = now_iso()
        consumer = {"group": self.opts.group, "host": socket.gethostname(),
                    "pid": os.getpid(), "version": __version__}
        source = {"topic": msg.topic(), "partition": msg.partition(), "offset": msg.offset(),
                  "timestamp_ms": msg.timestamp()[1]}

        def build(max_bytes: int) -> DeadLetter:
            return build_dead_letter(
                source=source, key=msg.key(), value=msg.value(),
                visit=event.visit if event is not None else None,
                action=event.action if event is not None else None,
                error=error, consumer=consumer, dead_lettered_at=dead_lettered_at,
                max_bytes=max_bytes,
            )

        return build

    def _deliver(self, producer: Producer, letter: DeadLetter,
                 build: Callable[[int], DeadLetter], reason: str) -> DeadLetter:
        """Produce ``letter`` until the broker acknowledges it; returns what was delivered.
        A letter refused as too large is rebuilt with half the limit at once; other failures
        are retried with backoff until delivered or a stop is requested (``Shutdown``)."""
        assert self.topic is not None
        limit = self.max_bytes
        delay = self.opts.retry_initial_seconds
        failing_since = time.monotonic()
        self.ctx.health.waiting_for(f"delivering its dead letter to {self.topic}")
        while True:
            error = self._produce_once(producer, letter, reason)
            if error is None:
                return letter
            self.ctx.metrics.dead_letter_failures.inc()
            code = error.code() if isinstance(error, KafkaError) else None
            if code in (KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE):
                smaller = shrink_limit(limit, len(letter.value))
                if smaller is not None:
                    log.warning("dead letter of %d bytes refused as too large (%s); "
                                "rebuilding it within %d bytes", len(letter.value), error,
                                smaller)
                    limit = smaller
                    letter = build(limit)
                    continue
            self.ctx.health.waiting_for(
                f"dead-letter delivery to {self.topic} failing for "
                f"{time.monotonic() - failing_since:.0f} s: {error}"
            )
            log.warning("dead-letter delivery to %s failed (%s); retrying in %.1f s",
                        self.topic, error, delay)
            self.retrier.sleep(delay)
            delay = self.retrier.next_delay(delay)

    def _produce_once(self, producer: Producer, letter: DeadLetter,
                      reason: str) -> KafkaError | BaseException | None:
        """One attempt: None once the broker acknowledged the letter, else why not (the
        delivery report's error, or the exception of ``produce``)."""
        assert self.topic is not None
        reports: list[KafkaError | None] = []

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            reports.append(err)

        try:
            producer.produce(self.topic, key=letter.key, value=letter.value,
                             headers=[("streamstars-error", reason.encode())],
                             on_delivery=on_delivery)
        except KafkaException as exc:
            return exc.args[0] if exc.args else exc  # type: ignore[no-any-return]
        except BufferError as exc:
            return exc
        while not reports:  # until the delivery report, success or failure
            producer.flush(0.5)
            if self.ctx.stop_requested.is_set() and not reports:
                raise Shutdown
            self.ctx.health.beat()
        return reports[0]
