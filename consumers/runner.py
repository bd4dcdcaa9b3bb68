"""``streamstars run``: the long-running Kafka consumer that applies visit events.

Effectively once per visit
--------------------------
Auto-commit is off.  For each message, the visit is read and selected outside any transaction,
then applied in ONE LMDB write transaction that also stores the partition's next offset
(:class:`streamstars.ingest.KafkaOffset`); only then is the offset committed to Kafka.  On
partition assignment the consumer seeks every partition to the offset stored in LMDB (the
beginning when the store has none), so the Kafka commit is only a convenience for monitoring
tools: after any crash the store resumes exactly after the last visit it holds.  Duplicate
and replayed events are counted no-ops (same content hash -> "skipped").

Errors
------
* :class:`~streamstars.errors.TransientInputError` and ``OSError`` (file not there yet, I/O
  timeout) are retried with exponential backoff for up to ``retry_max_seconds``, then
  dead-lettered;
* :class:`~streamstars.errors.PermanentInputError` (malformed event, forbidden path, unreadable
  or invalid parquet, missing columns, conflicting content) is dead-lettered at once;
* :class:`~streamstars.errors.StateError` and LMDB errors stop the consumer (exit code 3)
  without committing, so nothing is lost (a reference catalog that becomes unreadable
  mid-stream is one: the visit is not applied);
* a configured reference catalog is validated before the first event
  (:func:`streamstars.references.attach_references`): a
  :class:`~streamstars.errors.RefcatError` exits with code 2, a store caching another catalog
  with code 3 (run ``streamstars refresh-refs``).

A dead letter is a JSON record (event, error, time, origin) produced to the dead-letter topic
and acknowledged by the broker *before* the event's offset is recorded in LMDB.  It always
fits in one message (:mod:`.dead_letters` cuts the event to the limit, and halves the limit
when the broker still refuses it as too large); other delivery failures are retried while the
partition waits, and ``/healthz`` fails once a message has been in flight for longer than
``stall_seconds`` (:class:`~.metrics.HealthState`).

Hostile events
--------------
Events are decoded with a bounded parser (size and nesting depth,
:func:`streamstars.events.loads_bounded`), a message without a key is malformed
(:func:`streamstars.events.parse_message`), and an unexpected exception while decoding an
event is dead-lettered (``unexpected``) like one while applying it: no event can stop the
consumer or make it crash at the same offset again after a restart.

Read-ahead
----------
Messages already fetched are taken in batches (up to ``read_ahead + 1``, without waiting;
one blocking ``poll`` when there are none).  Inside a batch the next visit is read and
selected in a background thread while the current one is applied, so a backlog is consumed
at the writer's pace.  Nothing else changes: visits are applied and committed one by one, in
order; a visit whose read-ahead failed is read again by the normal path (with its retries);
messages left in a batch at a stop are neither applied nor committed.  No Kafka callback can
run between two messages of a batch (callbacks only run inside ``consume``/``poll``).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

from streamstars import __version__
from streamstars.config import BuildStarsConfig, load_config
from streamstars.errors import (
    ConfigError,
    PermanentInputError,
    RefcatError,
    StateError,
    StreamstarsError,
    TransientInputError,
)
from streamstars.events import (
    ForbiddenPathError,
    MalformedEventError,
    VisitEvent,
    inline_metadata,
    now_iso,
    parse_message,
    resolve_uri,
)
from streamstars.visit import VisitMetadata

from .dead_letters import (
    DEAD_LETTER_SCHEMA,
    LIBRDKAFKA_MESSAGE_MAX_BYTES,
    DeadLetter,
    build_dead_letter,
    dead_letter_limit,
    shrink_limit,
)
from .faults import Faults, instrument_store
from .kafka_config import redacted
from .metrics import ConsumerMetrics, HealthServer, HealthState

__all__ = ["DEAD_LETTER_SCHEMA", "RunOptions", "Runner", "run_consumer"]

log = logging.getLogger("streamstars.run")

# Exit codes of `streamstars run`.
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_STATE = 3
EXIT_KAFKA = 4


@dataclass
class RunOptions:
    """Everything ``streamstars run`` is told (see ``docs/operations.md``)."""

    bootstrap: str
    topic: str
    state: Path
    group: str = "streamstars"
    config_path: Path | None = None
    data_roots: list[Path] = field(default_factory=list)
    kafka_config: dict[str, str] = field(default_factory=dict)
    dead_letter_topic: str | None = None
    snapshot_dir: Path | None = None
    snapshot_every_visits: int | None = None
    snapshot_every_seconds: float | None = None
    snapshot_formats: tuple[str, ...] = ("fits", "parquet")
    snapshot_on_exit: bool = False
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    retry_initial_seconds: float = 0.5
    retry_max_backoff_seconds: float = 30.0
    retry_max_seconds: float = 300.0
    exit_when_idle_seconds: float | None = None
    seek_offsets: dict[int, int] = field(default_factory=dict)
    seek_time: datetime | None = None
    poll_seconds: float = 0.5
    #: visits read and selected ahead of the one being applied (0: none)
    read_ahead: int = 1
    #: /healthz fails when one message has been in flight for longer than this (seconds);
    #: None: ``retry_max_seconds`` + 300
    stall_seconds: float | None = None
    #: largest dead-letter value (bytes); None: the producer's message.max.bytes - 1 KiB
    dead_letter_max_bytes: int | None = None

    @property
    def effective_stall_seconds(self) -> float:
        """The stall threshold of ``/healthz`` (see ``stall_seconds``)."""
        if self.stall_seconds is not None:
            return self.stall_seconds
        return self.retry_max_seconds + 300.0
    #: Butler repository resolving events that name datasets (schema version 2)
    butler: str | None = None


#: At most this many already-fetched messages are taken at once (see "Read-ahead").
_BATCH = 16


class _Shutdown(Exception):
    """Raised inside retry loops when a stop was requested: abandon the visit in flight."""


@dataclass
class _Outcome:
    status: str
    n_sources: int = 0
    n_selected: int = 0
    seconds: float = 0.0
    #: rows dropped for unusable coordinates, by reason (applied / replaced visits)
    dropped: dict[str, int] = field(default_factory=dict)


class Runner:
    """One consumer process: a store, a Kafka consumer, a dead-letter producer, metrics."""

    def __init__(self, options: RunOptions) -> None:
        self.opts = options
        self.metrics = ConsumerMetrics()
        self.health = HealthState(stall_seconds=options.effective_stall_seconds)
        self.metrics.track(self.health)
        self.dead_letter_max_bytes = 0  # set from the producer settings in run()
        self.stop_requested = threading.Event()
        self.faults = Faults()
        self.store: Any = None
        self.references: Any = None  # the reference catalog visits cache stars from
        self.consumer: Any = None
        self.producer: Any = None
        self.http: HealthServer | None = None
        self.assigned: set[int] = set()
        self._seek_pending = bool(options.seek_offsets or options.seek_time)
        self._signals = 0
        self._last_message = time.monotonic()
        self._changes_since_snapshot = 0
        self._last_snapshot = time.monotonic()
        self._snapshot_thread: threading.Thread | None = None
        self._last_lag_update = 0.0
        self.processed = 0
        #: (topic, partition, offset) -> the visit read ahead for that message
        self._ahead: dict[tuple[str, int, int], Future[Any]] = {}
        self._ahead_pool: ThreadPoolExecutor | None = None
        #: resolves Butler events (streamstars.butler.read.EventResolver) with --butler
        self.resolver: Any = None

    # ------------------------------------------------------------------ setup / teardown
    def _open_store(self) -> None:
        from streamstars.state.store import StarStore

        opts = self.opts
        config: BuildStarsConfig | None
        if opts.config_path is not None:
            config = load_config(opts.config_path)
        elif (opts.state / "data.mdb").exists():
            config = None  # the configuration the store was built with
        else:
            config = BuildStarsConfig()
        from streamstars.references import attach_references, open_reference_source

        # validate the reference catalog before the store is touched (when the config is
        # given), and that the store caches the same catalog, before any event is consumed
        if opts.butler:
            from streamstars.butler.read import EventResolver
            from streamstars.butler.repo import open_butler

            self.resolver = EventResolver(open_butler(opts.butler))
        source = open_reference_source(config.fgcmLoadReferenceCatalog, opts.butler) \
            if config else None
        self.store = StarStore.open(opts.state, config)
        self.references = attach_references(self.store, source, butler=opts.butler)
        instrument_store(self.store, self.faults)
        self.metrics.visits_stored.set(len(self.store.applied_visits()))

    def _client_settings(self) -> dict[str, Any]:
        opts = self.opts
        settings: dict[str, Any] = {
            "auto.offset.reset": "earliest",
            "max.poll.interval.ms": int(max(300.0, opts.retry_max_seconds + 600.0) * 1000),
        }
        settings.update(opts.kafka_config)
        settings.update(
            {
                "bootstrap.servers": opts.bootstrap,
                "group.id": opts.group,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "client.id": f"streamstars-{socket.gethostname()}-{os.getpid()}",
                "error_cb": self._on_kafka_error,
            }
        )
        return settings

    def _producer_settings(self) -> dict[str, Any]:
        consumer_only = {
            "auto.offset.reset", "max.poll.interval.ms", "session.timeout.ms",
            "heartbeat.interval.ms", "group.id", "enable.auto.commit",
            "enable.auto.offset.store", "fetch.wait.max.ms", "partition.assignment.strategy",
            "group.instance.id", "fetch.min.bytes", "fetch.max.bytes", "isolation.level",
            "auto.commit.interval.ms", "enable.partition.eof", "max.partition.fetch.bytes",
            "check.crcs", "queued.min.messages", "queued.max.messages.kbytes",
            "group.protocol.type", "coordinator.query.interval.ms",
        }
        settings: dict[str, Any] = {
            k: v for k, v in self.opts.kafka_config.items() if k not in consumer_only
        }
        settings.update({"bootstrap.servers": self.opts.bootstrap, "acks": "all"})
        return settings

    def _on_kafka_error(self, err: Any) -> None:
        log.warning("kafka: %s", err)
        if getattr(err, "fatal", lambda: False)():
            log.error("fatal Kafka error, stopping: %s", err)
            self.stop_requested.set()

    def _install_signals(self) -> None:
        def handler(signum: int, _frame: FrameType | None) -> None:
            self._signals += 1
            name = signal.Signals(signum).name
            if self._signals == 1:
                log.info("%s received: finishing the visit in flight, then stopping", name)
                self.stop_requested.set()
                self.health.set_ready(False, f"stopping ({name})")
            else:
                log.warning("%s received again: abandoning the visit in flight", name)
                raise KeyboardInterrupt

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, handler)
            signal.signal(signal.SIGINT, handler)

    # ------------------------------------------------------------------ assignment
    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        from confluent_kafka import OFFSET_BEGINNING

        stored = self.store.stored_offsets(self.opts.topic)
        for tp in partitions:
            if tp.partition in stored:
                tp.offset = stored[tp.partition]
                where = f"offset {tp.offset} (from the LMDB store)"
            else:
                tp.offset = OFFSET_BEGINNING
                where = "the beginning (no offset in the store)"
            log.info("assigned %s[%d]: starting at %s", tp.topic, tp.partition, where)
        if self._seek_pending:
            self._apply_seek_overrides(consumer, partitions)
        consumer.assign(partitions)
        self.assigned = {tp.partition for tp in partitions}
        # --exit-when-idle counts from the assignment: nothing could be fetched before it
        self._last_message = time.monotonic()
        self.health.set_ready(True, f"consuming partitions {sorted(self.assigned)}")

    def _apply_seek_overrides(self, consumer: Any, partitions: list[Any]) -> None:
        """``--seek-offset`` / ``--seek-time``: replay from there, once, at first assignment."""
        from confluent_kafka import TopicPartition

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

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        log.info("partitions revoked: %s", sorted(tp.partition for tp in partitions))
        consumer.unassign()
        self.assigned = set()
        self.health.set_ready(False, "rebalancing")

    def _on_lost(self, consumer: Any, partitions: list[Any]) -> None:
        log.warning("partitions lost: %s", sorted(tp.partition for tp in partitions))
        consumer.unassign()
        self.assigned = set()
        self.health.set_ready(False, "partitions lost")

    # ------------------------------------------------------------------ main loop
    def run(self) -> int:
        """Consume until stopped; returns the process exit code."""
        from confluent_kafka import Consumer, KafkaError, Producer

        opts = self.opts
        self._install_signals()
        if opts.metrics_port is not None:
            self.http = HealthServer(self.metrics, self.health, opts.metrics_host,
                                     opts.metrics_port)
            self.http.start()
            log.info("metrics on http://%s:%d/metrics", opts.metrics_host, self.http.port)
        try:
            self._open_store()
        except StreamstarsError as exc:
            log.error("cannot open the state %s: %s", opts.state, exc)
            if self.store is not None:
                self.store.close()
                self.store = None
            self._stop_http()
            return EXIT_USAGE if isinstance(exc, RefcatError | ConfigError) else EXIT_STATE
        log.info("kafka client settings from --kafka-config: %s", redacted(opts.kafka_config))
        try:
            self.dead_letter_max_bytes = dead_letter_limit(self._producer_settings(),
                                                           opts.dead_letter_max_bytes)
        except StreamstarsError as exc:
            if opts.dead_letter_topic:
                log.error("%s", exc)
                self.store.close()
                self.store = None
                self._stop_http()
                return EXIT_USAGE
            self.dead_letter_max_bytes = LIBRDKAFKA_MESSAGE_MAX_BYTES  # only logged
        self.consumer = Consumer(self._client_settings())
        if opts.dead_letter_topic:
            self.producer = Producer(self._producer_settings())
            log.info("dead letters go to %s, at most %d bytes each", opts.dead_letter_topic,
                     self.dead_letter_max_bytes)
        self.consumer.subscribe([opts.topic], on_assign=self._on_assign,
                                on_revoke=self._on_revoke, on_lost=self._on_lost)
        log.info("consuming %s as group %s, state %s, data roots %s", opts.topic, opts.group,
                 opts.state, [str(p) for p in opts.data_roots])
        code = EXIT_OK
        if opts.read_ahead > 0:
            self._ahead_pool = ThreadPoolExecutor(max_workers=1,
                                                  thread_name_prefix="read-ahead")
        try:
            while not self.stop_requested.is_set():
                self.health.beat()
                batch = self._next_messages()
                if not batch:
                    self._idle_work()
                    if self._idle_exit_due():
                        log.info("idle for %.1f s: exiting", opts.exit_when_idle_seconds)
                        break
                    continue
                stop = False
                for k, msg in enumerate(batch):
                    err = msg.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            continue
                        log.warning("consumer error: %s", err)
                        if err.fatal():
                            code, stop = EXIT_KAFKA, True
                            break
                        continue
                    if self.stop_requested.is_set():
                        stop = True
                        break
                    self._last_message = time.monotonic()
                    self._read_ahead(batch[k + 1:])
                    self.health.begin(f"{msg.topic()}[{msg.partition()}]@{msg.offset()}")
                    try:
                        self.handle_message(msg)
                    except _Shutdown:
                        log.info("stop requested: visit at %s[%d]@%d abandoned (not applied, "
                                 "not committed; it will be consumed again)", msg.topic(),
                                 msg.partition(), msg.offset())
                        stop = True
                        break
                    finally:
                        self.health.end()
                    self._idle_work()
                self._ahead.clear()  # what a stop left behind is consumed again later
                if stop:
                    break
        except (StateError, _LmdbError) as exc:
            log.error("state error, stopping without committing: %s", exc)
            code = EXIT_STATE
        except KeyboardInterrupt:
            log.warning("interrupted")
        finally:
            self._shutdown()
        return code

    def _next_messages(self) -> list[Any]:
        """The messages already fetched (up to ``_BATCH``, no waiting), or those of one
        blocking poll."""
        batch = self.consumer.consume(num_messages=_BATCH, timeout=0) \
            if self.opts.read_ahead > 0 else []
        if not batch:
            msg = self.consumer.poll(self.opts.poll_seconds)
            batch = [] if msg is None else [msg]
        return list(batch)

    def _read_ahead(self, following: list[Any]) -> None:
        """Keep the next ``read_ahead`` visits of the batch being read in the background."""
        if self._ahead_pool is None:
            return
        wanted = self.opts.read_ahead
        for msg in following:
            if wanted <= 0:
                return
            if msg.error() is not None:
                continue
            key = (msg.topic(), msg.partition(), msg.offset())
            wanted -= 1
            if key in self._ahead:
                continue
            try:
                event = parse_message(msg.value(), msg.key())
            except Exception:  # noqa: BLE001 - the normal path dead-letters it
                continue
            if event.action != "retract" and not self._applied_from(event):
                self._ahead[key] = self._ahead_pool.submit(self._prepare_event, event)

    def _idle_exit_due(self) -> bool:
        limit = self.opts.exit_when_idle_seconds
        return (
            limit is not None
            and bool(self.assigned)
            and time.monotonic() - self._last_message > limit
        )

    def _idle_work(self) -> None:
        now = time.monotonic()
        if now - self._last_lag_update > 2.0:
            self._last_lag_update = now
            self._update_lag()
        self._maybe_snapshot()

    def _update_lag(self) -> None:
        from confluent_kafka import TopicPartition

        if not self.assigned:
            return
        try:
            tps = [TopicPartition(self.opts.topic, p) for p in sorted(self.assigned)]
            positions = {tp.partition: tp.offset for tp in self.consumer.position(tps)}
            for tp in tps:
                _low, high = self.consumer.get_watermark_offsets(tp, cached=True)
                pos = positions.get(tp.partition, -1)
                if high is not None and high >= 0 and pos is not None and pos >= 0:
                    self.metrics.lag.labels(self.opts.topic, str(tp.partition)).set(
                        max(0, high - pos)
                    )
        except Exception as exc:  # noqa: BLE001 - metrics must never stop ingestion
            log.debug("lag update failed: %s", exc)

    # ------------------------------------------------------------------ one message
    def handle_message(self, msg: Any) -> None:
        """Apply, skip or dead-letter one message, then record and commit its offset."""
        from streamstars.ingest import KafkaOffset

        topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
        kafka_offset = KafkaOffset(topic, partition, offset + 1)
        event: VisitEvent | None = None
        self.faults.visit = None
        try:
            event = parsed = self._parse(msg)
            self.faults.visit = parsed.visit
            self.faults.point("before_apply")
            outcome = self._with_retries(parsed, lambda: self._apply(parsed, kafka_offset))
        except PermanentInputError as exc:
            self._dead_letter(msg, event, exc, permanent=True)
            self.store.record_offset(topic, partition, offset + 1)
            outcome = _Outcome("dead_lettered")
        except _RetriesExhausted as exc:
            self._dead_letter(msg, event, exc.cause, permanent=False, attempts=exc.attempts)
            self.store.record_offset(topic, partition, offset + 1)
            outcome = _Outcome("dead_lettered")
        self.faults.point("after_lmdb_commit")
        self._commit(topic, partition, offset + 1)
        self.faults.point("after_kafka_commit")
        self.processed += 1
        self._count(event, outcome)

    def _parse(self, msg: Any) -> VisitEvent:
        """The message's event; whatever goes wrong decoding it becomes a dead letter."""
        try:
            return parse_message(msg.value(), msg.key())
        except StreamstarsError:
            raise
        except Exception as exc:  # e.g. MemoryError: never let an event crash the consumer
            log.error("%s[%d]@%d: unexpected error decoding the event, dead-lettering:\n%s",
                      msg.topic(), msg.partition(), msg.offset(), traceback.format_exc())
            raise _UnexpectedError(f"{type(exc).__name__} while decoding the event: {exc}") \
                from exc

    def _count(self, event: VisitEvent | None, outcome: _Outcome) -> None:
        m = self.metrics
        status = outcome.status
        if status in ("applied", "replaced"):
            m.applied.labels("replace" if status == "replaced" else "apply").inc()
        elif status == "retracted":
            m.retracted.inc()
        elif status == "skipped":
            m.skipped.labels("duplicate").inc()
        elif status == "absent":
            m.skipped.labels("retract_absent").inc()
        if status in ("applied", "replaced", "retracted"):
            self._changes_since_snapshot += 1
            delta = -1 if status == "retracted" else (1 if status == "applied" else 0)
            m.visits_stored.inc(delta)
        for reason, count in outcome.dropped.items():
            m.rows_dropped.labels(reason).inc(count)
        if status in ("applied", "replaced", "skipped"):
            m.sources_read.inc(outcome.n_sources)
            m.observations_selected.inc(outcome.n_selected if status != "skipped" else 0)
            m.apply_seconds.observe(outcome.seconds)
            stamp = event.published_at or event.finished_at if event is not None else None
            if stamp and status != "skipped":
                try:
                    latency = time.time() - datetime.fromisoformat(stamp).timestamp()
                    m.event_latency.observe(max(0.0, latency))
                except ValueError:
                    pass
        if event is not None and status != "dead_lettered":
            log.info("%s: %s (%d sources, %d selected, %.2f s)", event.describe(), status,
                     outcome.n_sources, outcome.n_selected, outcome.seconds)

    def _apply(self, event: VisitEvent, kafka_offset: Any) -> _Outcome:
        """Resolve the event's files, prepare and apply the visit in one LMDB transaction."""
        from streamstars.ingest import apply_prepared, retract_visit

        start = time.perf_counter()
        if self._applied_from(event):
            # the visit holds exactly these Butler datasets (immutable): nothing to read
            self.store.record_offset(kafka_offset.topic, kafka_offset.partition,
                                     kafka_offset.next_offset)
            return _Outcome("skipped", seconds=time.perf_counter() - start)
        if event.action == "retract":
            result = retract_visit(self.store, event.visit, kafka_offset=kafka_offset)
            self.faults.record_application(event.visit, result.status, kafka_offset.next_offset)
            return _Outcome(result.status, result.n_sources, result.n_selected,
                            time.perf_counter() - start)
        ahead = self._ahead.pop((kafka_offset.topic, kafka_offset.partition,
                                 kafka_offset.next_offset - 1), None)
        prepared = None
        if ahead is not None:
            try:
                prepared = ahead.result()
                self.metrics.read_ahead.labels("used").inc()
            except Exception as exc:  # noqa: BLE001 - read again below, with the retries
                self.metrics.read_ahead.labels("failed").inc()
                log.debug("%s: read-ahead failed (%s); reading it again", event.describe(), exc)
        if prepared is None or prepared.visit != event.visit:
            prepared = self._prepare_event(event)
        self.faults.timer("during_apply", default_ms=50.0)
        result = apply_prepared(self.store, prepared, replace=event.action == "replace",
                                kafka_offset=kafka_offset, references=self.references)
        self.faults.record_application(event.visit, result.status, kafka_offset.next_offset)
        return _Outcome(result.status, result.n_sources, result.n_selected,
                        time.perf_counter() - start, result.dropped)

    def _applied_from(self, event: VisitEvent) -> bool:
        """The store holds the visit from exactly the Butler datasets the event names."""
        if event.butler_datasets is None or event.action == "retract":
            return False
        from streamstars.butler.read import event_dataset_ids

        record = self.store.visit_record(event.visit)
        return record is not None and record.dataset_ids == event_dataset_ids(event)

    def _prepare_event(self, event: VisitEvent) -> Any:
        """Resolve the event's files and metadata, read and select the visit (no store
        access: safe in the read-ahead thread)."""
        from streamstars.ingest import VisitInput, prepare_visit

        if event.butler_datasets is not None:
            if self.resolver is None:
                raise MalformedEventError(
                    f"visit {event.visit}: the event names Butler datasets; run the consumer "
                    "with --butler REPO to resolve them")
            return self.resolver.prepare(event, self.store.config)
        roots = self.opts.data_roots
        paths = [resolve_uri(u, roots, what=f"visit {event.visit} source table")
                 for u in event.source_uris]
        meta_path = (
            resolve_uri(event.metadata_uri, roots, what=f"visit {event.visit} visitSummary")
            if event.metadata_uri is not None
            else None
        )
        for path in [*paths, *([meta_path] if meta_path else [])]:
            if not path.exists():
                raise TransientInputError(f"visit {event.visit}: {path} does not exist (yet)")
        metadata = self._metadata(event, meta_path)
        return prepare_visit(VisitInput(event.visit, paths, metadata), self.store.config)

    def _metadata(self, event: VisitEvent, meta_path: Path | None) -> VisitMetadata:
        if meta_path is not None:
            from streamstars.io.visitmeta import read_visit_summary

            meta = read_visit_summary(meta_path, reference_ccd=self.store.config.referenceCCD)
        else:
            meta = inline_metadata(event.metadata_values or {})
        if meta.visit != event.visit:
            raise MalformedEventError(
                f"visit {event.visit}: its metadata describes visit {meta.visit}"
            )
        if meta.physical_filter != event.physical_filter or meta.band != event.band:
            raise MalformedEventError(
                f"visit {event.visit}: event says band {event.band!r} / physical_filter "
                f"{event.physical_filter!r} but its metadata says {meta.band!r} / "
                f"{meta.physical_filter!r}"
            )
        return meta

    def _with_retries(self, event: VisitEvent, body: Callable[[], _Outcome]) -> _Outcome:
        """Run ``body``; retry transient errors with exponential backoff, within a budget."""
        opts = self.opts
        delay = opts.retry_initial_seconds
        started = time.monotonic()
        attempts = 0
        while True:
            attempts += 1
            try:
                return body()
            except PermanentInputError:
                raise
            except (TransientInputError, OSError) as exc:
                if isinstance(exc, OSError) and _is_lmdb(exc):
                    raise
                elapsed = time.monotonic() - started
                if elapsed + delay > opts.retry_max_seconds:
                    raise _RetriesExhausted(exc, attempts) from exc
                self.metrics.retries.inc()
                self.health.waiting_for(f"retrying a transient error (attempt {attempts}): "
                                        f"{str(exc)[:300]}")
                log.warning("%s: transient error (attempt %d, retrying in %.1f s): %s",
                            event.describe(), attempts, delay, exc)
                self._sleep(delay)
                delay = min(delay * 2.0, opts.retry_max_backoff_seconds)
            except (StateError, KeyboardInterrupt, _Shutdown):
                raise
            except StreamstarsError as exc:
                raise PermanentInputError(f"{event.describe()}: {exc}") from exc
            except Exception as exc:
                if _is_lmdb(exc):
                    raise _LmdbError(str(exc)) from exc
                log.error("%s: unexpected error, dead-lettering:\n%s", event.describe(),
                          traceback.format_exc())
                raise _UnexpectedError(f"{event.describe()}: {type(exc).__name__}: {exc}") \
                    from exc

    def _sleep(self, seconds: float) -> None:
        """Wait, but give up the visit in flight as soon as a stop is requested."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if self.stop_requested.is_set():
                raise _Shutdown
            if left <= 0:
                return
            self.health.beat()
            self.stop_requested.wait(min(left, 0.5))

    # ------------------------------------------------------------------ dead letters / commit
    def _dead_letter(self, msg: Any, event: VisitEvent | None, exc: BaseException,
                     *, permanent: bool, attempts: int = 1) -> None:
        reason = _reason(exc)
        error = {
            "type": type(exc).__name__,
            "reason": reason,
            "message": str(exc),
            "permanent": permanent,
            "attempts": attempts,
        }
        dead_lettered_at = now_iso()

        def build(max_bytes: int) -> DeadLetter:
            return build_dead_letter(
                source={
                    "topic": msg.topic(),
                    "partition": msg.partition(),
                    "offset": msg.offset(),
                    "timestamp_ms": msg.timestamp()[1],
                },
                key=msg.key(),
                value=msg.value(),
                visit=event.visit if event is not None else None,
                action=event.action if event is not None else None,
                error=error,
                consumer={
                    "group": self.opts.group,
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "version": __version__,
                },
                dead_lettered_at=dead_lettered_at,
                max_bytes=max_bytes,
            )

        letter = build(self.dead_letter_max_bytes)
        shown = str(exc)
        if len(shown) > 1000:
            shown = f"{shown[:1000]}... [{len(shown) - 1000} more characters]"
        log.error("dead letter (%s) for %s[%d]@%d (%d bytes%s): %s", reason, msg.topic(),
                  msg.partition(), msg.offset(), len(letter.value),
                  ", event truncated" if letter.truncated else "", shown)
        if self.producer is not None and self.opts.dead_letter_topic:
            letter = self._produce_dead_letter(letter, build, reason)
        if letter.truncated:
            self.metrics.dead_letters_truncated.inc()
        self.metrics.dead_lettered.labels(reason).inc()

    def _produce_dead_letter(self, letter: DeadLetter, build: Callable[[int], DeadLetter],
                             reason: str) -> DeadLetter:
        """Produce ``letter`` and wait for the broker's acknowledgement; returns what was
        delivered.  A letter refused as too large is rebuilt with half the limit at once;
        other failures are retried with backoff until delivered or a stop is requested
        (``_Shutdown``).  A letter is produced again only after the previous attempt has
        failed for good (delivery report or exception), so it is not delivered twice."""
        from confluent_kafka import KafkaError, KafkaException

        topic = self.opts.dead_letter_topic
        limit = self.dead_letter_max_bytes
        delay = self.opts.retry_initial_seconds
        failing_since = time.monotonic()
        reports: list[Any] = []
        self.health.waiting_for(f"delivering its dead letter to {topic}")

        def on_delivery(err: Any, _msg: Any) -> None:
            reports.append(err)

        while True:
            reports.clear()
            error: Any = None
            try:
                self.producer.produce(topic, key=letter.key, value=letter.value,
                                      headers=[("streamstars-error", reason.encode())],
                                      on_delivery=on_delivery)
            except KafkaException as exc:
                error = exc.args[0] if exc.args else exc
            except BufferError as exc:
                error = exc
            if error is None:
                while not reports:  # until the delivery report, success or failure
                    self.producer.flush(0.5)
                    if self.stop_requested.is_set() and not reports:
                        raise _Shutdown
                    self.health.beat()
                error = reports[0]
            if error is None:
                return letter
            self.metrics.dead_letter_failures.inc()
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
            self.health.waiting_for(
                f"dead-letter delivery to {topic} failing for "
                f"{time.monotonic() - failing_since:.0f} s: {error}"
            )
            log.warning("dead-letter delivery to %s failed (%s); retrying in %.1f s", topic,
                        error, delay)
            self._sleep(delay)
            delay = min(delay * 2.0, self.opts.retry_max_backoff_seconds)

    def _commit(self, topic: str, partition: int, next_offset: int) -> None:
        from confluent_kafka import KafkaException, TopicPartition

        try:
            self.consumer.commit(offsets=[TopicPartition(topic, partition, next_offset)],
                                 asynchronous=False)
        except KafkaException as exc:
            self.metrics.kafka_commit_failures.inc()
            log.warning("Kafka commit of %s[%d]@%d failed (the LMDB store holds it): %s",
                        topic, partition, next_offset, exc)

    # ------------------------------------------------------------------ snapshots
    def _maybe_snapshot(self, force: bool = False) -> None:
        opts = self.opts
        if opts.snapshot_dir is None or self._changes_since_snapshot == 0:
            return
        if self._snapshot_thread is not None and self._snapshot_thread.is_alive():
            return
        due = force
        if opts.snapshot_every_visits and self._changes_since_snapshot >= \
                opts.snapshot_every_visits:
            due = True
        if opts.snapshot_every_seconds and \
                time.monotonic() - self._last_snapshot >= opts.snapshot_every_seconds:
            due = True
        if not due:
            return
        self._changes_since_snapshot = 0
        self._last_snapshot = time.monotonic()
        self._snapshot_thread = threading.Thread(target=self._snapshot, name="snapshot",
                                                 daemon=True)
        self._snapshot_thread.start()
        if force:
            self._snapshot_thread.join()

    def _snapshot(self) -> None:
        """Write a snapshot from one LMDB read transaction (ingestion goes on meanwhile)."""
        from streamstars.snapshot import write_store_snapshot

        assert self.opts.snapshot_dir is not None
        start = time.perf_counter()
        self.faults.timer("during_snapshot", default_ms=100.0)
        try:
            summary = write_store_snapshot(
                self.store, self.opts.snapshot_dir, formats=self.opts.snapshot_formats,
                extra_metadata={"kafka_topic": self.opts.topic,
                                "kafka_group": self.opts.group},
            )
        except Exception as exc:  # noqa: BLE001 - a failed snapshot must not stop ingestion
            self.metrics.snapshot_failures.inc()
            log.error("snapshot to %s failed: %s", self.opts.snapshot_dir, exc)
            return
        seconds = time.perf_counter() - start
        self.metrics.snapshot_seconds.observe(seconds)
        self.metrics.last_snapshot_time = time.time()
        self.metrics.stars.set(summary.n_stars)
        log.info("snapshot %s: %d visits, %d stars, %d observations in %.2f s",
                 self.opts.snapshot_dir, summary.n_visits, summary.n_stars,
                 summary.n_observations, seconds)

    # ------------------------------------------------------------------ shutdown
    def _shutdown(self) -> None:
        self.health.set_ready(False, "stopped")
        if self._snapshot_thread is not None:
            self._snapshot_thread.join()
        if self.opts.snapshot_on_exit and self.store is not None:
            try:
                self._maybe_snapshot(force=True)
            except Exception as exc:  # noqa: BLE001
                log.error("final snapshot failed: %s", exc)
        if self._ahead_pool is not None:
            self._ahead_pool.shutdown(wait=True, cancel_futures=True)
            self._ahead.clear()
        if self.consumer is not None:
            try:
                self.consumer.close()  # leaves the group; offsets were committed per visit
            except Exception as exc:  # noqa: BLE001
                log.warning("closing the consumer: %s", exc)
        if self.producer is not None:
            self.producer.flush(10)
        if self.store is not None:
            self.store.close()
            self.store = None
        self._stop_http()
        log.info("stopped after %d message(s)", self.processed)

    def _stop_http(self) -> None:
        if self.http is not None:
            self.http.stop()
            self.http = None


class _RetriesExhausted(Exception):
    def __init__(self, cause: BaseException, attempts: int) -> None:
        super().__init__(f"transient error persisted after {attempts} attempt(s): {cause}")
        self.cause = cause
        self.attempts = attempts


class _UnexpectedError(PermanentInputError):
    """An unexpected exception while applying an event (a bug or unforeseen input)."""


class _LmdbError(StateError):
    """An LMDB error other than a full map (which the store handles)."""


def _is_lmdb(exc: BaseException) -> bool:
    try:
        import lmdb
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, lmdb.Error)


def _reason(exc: BaseException) -> str:
    """A short, bounded label for the dead-letter metric."""
    if isinstance(exc, ForbiddenPathError):
        return "forbidden_path"
    if isinstance(exc, MalformedEventError):
        return "malformed_event"
    if isinstance(exc, TransientInputError | OSError):
        return "transient_exhausted"
    if isinstance(exc, _UnexpectedError):
        return "unexpected"
    from streamstars.errors import (
        InputFileError,
        MissingMetadataError,
        VisitConflictError,
    )

    if isinstance(exc, VisitConflictError):
        return "conflict"
    if isinstance(exc, MissingMetadataError):
        return "missing_metadata"
    if isinstance(exc, InputFileError):
        return "invalid_input"
    return "permanent"


def parse_seek_offsets(values: Sequence[str]) -> dict[int, int]:
    """``PARTITION:OFFSET`` strings -> {partition: offset}."""
    out: dict[int, int] = {}
    for value in values:
        part, _, off = value.partition(":")
        try:
            out[int(part)] = int(off)
        except ValueError as exc:
            raise ValueError(f"--seek-offset takes PARTITION:OFFSET, got {value!r}") from exc
    return out


def run_consumer(options: RunOptions, extra_env: Mapping[str, str] | None = None) -> int:
    """Run a consumer with ``options`` until it stops; returns the exit code."""
    if extra_env:
        os.environ.update(extra_env)
    return Runner(options).run()
