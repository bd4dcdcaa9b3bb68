"""``streamstars run``: the long-running Kafka consumer that applies visit events.

:class:`Runner` keeps the loop: fetch a batch, and for each message decode its event, apply
it (or dead-letter it), record its offset in LMDB, commit it to Kafka.  The rest is done by
named parts:

* :mod:`.kafka_client`: Kafka consumer settings, assignment (seek to the LMDB offsets,
  ``--seek-*``), fetching, commits, lag;
* :mod:`.visit_store`: the LMDB store (open + reference catalog, apply / retract with the
  offset in one transaction, offsets, the snapshots' read transaction, whether a Butler
  event's datasets are the ones its visit was applied from);
* :mod:`.prepare`: an event's visit read and selected (no store): a file event's files and
  metadata, a Butler event's datasets (``--butler REPO``);
* :mod:`.read_ahead`: the next visits of a batch prepared in a background thread;
* :mod:`.retries`: transient errors retried with backoff, and how errors are classed;
* :mod:`.dead_letter_producer`: dead letters built, logged and delivered before the offset;
* :mod:`.snapshots`: periodic snapshots in a background thread;
* :mod:`.shard_backups`: shard backups between messages and the restore of an assigned
  partition's shards (``--shard-backups``);
* :mod:`.metrics`, :mod:`.health`, :mod:`.http_server`: Prometheus metrics,
  progress/readiness, ``/metrics`` ``/healthz`` ``/readyz``;
* :mod:`.signals`: SIGTERM/SIGINT (stop after the visit in flight, or abandon it);
* :mod:`.hooks`: the steps reported to test hooks (none in production);
* :mod:`.context`: what they share (options, stop request, health, metrics).

Effectively once per visit
--------------------------
Auto-commit is off.  For each message, the visit is read and selected outside any transaction,
then applied in ONE LMDB write transaction that also stores the partition's next offset; only
then is the offset committed to Kafka.  On partition assignment the consumer seeks every
partition to the offset stored in LMDB (the beginning when the store has none), so the Kafka
commit is only a convenience for monitoring tools: after any crash the store resumes exactly
after the last visit it holds.  Duplicate and replayed events are counted no-ops (same content
hash -> "skipped"); so is an event naming exactly the Butler datasets its visit was applied from,
without reading them (datasets are immutable).

Errors
------
A transient error (file not there yet, I/O timeout) is retried for up to
``retry_max_seconds``, then dead-lettered; a permanent one (malformed event, forbidden path,
unreadable or invalid files, conflicting content) is dead-lettered at once
(:mod:`.retries`).  A :class:`~streamstars.errors.StateError` or an LMDB error stops the
consumer (exit code 3) without committing, so nothing is lost (a reference catalog that
becomes unreadable mid-stream is one).  A configured reference catalog is validated before
the first event: a :class:`~streamstars.errors.RefcatError` exits with code 2, a store caching
another catalog with code 3 (run ``streamstars refresh-refs``).

Consumers in a group (shard events)
-----------------------------------
An event routed to one sky shard (schema version 3, ``publish --partitions``) is applied to
that shard only: the visit is read and routed, the shard's rows (possibly none) are written in
ONE transaction of the shard's store together with the partition's next offset, then the
state's index lists the shard for the visit and advances the partition's *watermark* (every
event of the partition below it is done in this state).  On assignment a partition is seeked
to its watermark; an event below its shard's own offset is skipped (the stop fell between the
shard's commit and the index's: the index is repaired).  Several consumers in one group, each
with its own state directory, share the partitions; ``streamstars snapshot --state A --state
B`` combines their shards (docs/operations.md "Scale-out").  A row routed to a shard the
event's footprint lacks is dead-lettered (``footprint_missed_shard``).  Version-1/2 events are
applied to every shard they touch, as before.  With ``--shard-backups`` the consumer backs
its shards up every ``--backup-every-visits`` visits and, when a partition is assigned,
restores its shards from the newest backups before seeking (:mod:`.shard_backups`).

Hostile events
--------------
Events are decoded with a bounded parser (size and nesting depth,
:func:`streamstars.events.loads_bounded`) and validated by the event JSON Schema; a message
without a key is malformed (:func:`streamstars.events.parse_message`), and an unexpected
exception while decoding an event is dead-lettered (``unexpected``) like one while applying
it: no event can stop the consumer or make it crash at the same offset again after a restart.
"""

from __future__ import annotations

import logging
import time
import traceback
from typing import TYPE_CHECKING

import lmdb
from confluent_kafka import KafkaError, Message

from streamstars.errors import (
    ConfigError,
    PermanentInputError,
    RefcatError,
    StateError,
    StreamstarsError,
)
from streamstars.events import VisitEvent, parse_message
from streamstars.ingest import PreparedVisit

from .context import RunContext
from .dead_letter_producer import DeadLetterProducer
from .hooks import NO_HOOKS, ConsumerHooks
from .http_server import HealthServer
from .kafka_client import KafkaClient, Position, position_of
from .kafka_config import redacted
from .metrics import Outcome
from .options import EXIT_KAFKA, EXIT_OK, EXIT_STATE, EXIT_USAGE, RunOptions
from .prepare import EventPreparer
from .read_ahead import ReadAhead
from .retries import Retrier, RetriesExhausted, Shutdown, UnexpectedError
from .shard_backups import ShardBackups
from .signals import StopSignals
from .snapshots import SnapshotScheduler
from .visit_store import ConsumerStore

if TYPE_CHECKING:
    from streamstars.queries import QueryCacheWarmer

__all__ = ["Runner"]

log = logging.getLogger("streamstars.run")

#: At most this many already-fetched messages are taken at once (see :mod:`.read_ahead`).
_BATCH = 16
#: ``--warm-query-cache``: seconds without a message before the query cache is warmed
WARM_IDLE_SECONDS = 1.0
#: seconds before a failed warm-up is tried again
_WARM_RETRY_SECONDS = 60.0


class Runner:
    """One consumer process: its parts, and the loop that drives them.

    Args:
        options: what ``streamstars run`` was told.
        hooks: steps reported to tests (:mod:`.hooks`); none by default.
    """

    def __init__(self, options: RunOptions, hooks: ConsumerHooks = NO_HOOKS) -> None:
        self.opts = options
        self.hooks = hooks
        self.ctx = ctx = RunContext(options)
        self.stop_requested, self.health, self.metrics = \
            ctx.stop_requested, ctx.health, ctx.metrics
        self.signals = StopSignals(ctx)
        self.store = ConsumerStore(options)
        self.preparer = EventPreparer(options.data_roots, options.butler)
        self.backups = ShardBackups(ctx, self.store, lambda: self.kafka.assigned, hooks) \
            if options.shard_backups is not None else None
        self.kafka = KafkaClient(ctx, self.store.stored_offsets, self.store.mark_partitions,
                                 restore=self.backups.restore if self.backups else None)
        self.retrier = Retrier(ctx)
        self.dead_letters = DeadLetterProducer(ctx, self.retrier)
        self.read_ahead = ReadAhead(options.read_ahead, self._prepare, self.metrics,
                                    needs_reading=self._needs_reading)
        self.snapshots = SnapshotScheduler(ctx, self.store, hooks)
        self.http: HealthServer | None = None
        self.processed = 0
        self._last_message = time.monotonic()
        self.warmer: QueryCacheWarmer | None = None
        self._warm_seen = 0  # self.processed when the warmer was last told of changes
        self._warm_retry_at = 0.0

    # ------------------------------------------------------------------ start / stop
    def run(self) -> int:
        """Consume until stopped; returns the process exit code."""
        opts = self.opts
        self.signals.install()
        if opts.metrics_port is not None:
            self.http = HealthServer(self.metrics, self.health, opts.metrics_host,
                                     opts.metrics_port)
            self.http.start()
            log.info("metrics on http://%s:%d/metrics", opts.metrics_host, self.http.port)
        code = self._open()
        if code is not None:
            self._stop_http()
            return code
        self.kafka.start()
        self.dead_letters.start()
        self.read_ahead.start()
        log.info("consuming %s as group %s, state %s, data roots %s", opts.topic, opts.group,
                 opts.state, [str(p) for p in opts.data_roots])
        code = EXIT_OK
        try:
            code = self._loop()
        except StateError as exc:  # also an LMDB error (retries.LmdbError)
            log.error("state error, stopping without committing: %s", exc)
            code = EXIT_STATE
        except KeyboardInterrupt:
            log.warning("interrupted")
        finally:
            self._shutdown()
        return code

    def _open(self) -> int | None:
        """Open the Butler repository (``--butler``) and the store, check the dead-letter
        settings; an exit code on failure."""
        opts = self.opts
        try:
            self.preparer.open()
            self.store.open()
            self.hooks.store_opened(self.store.star_store)
            self.metrics.visits_stored.set(self.store.visit_count())
        except StreamstarsError as exc:
            log.error("cannot open the state %s: %s", opts.state, exc)
            self.store.close()
            return EXIT_USAGE if isinstance(exc, RefcatError | ConfigError) else EXIT_STATE
        log.info("kafka client settings from --kafka-config: %s", redacted(opts.kafka_config))
        try:
            self.dead_letters.configure()
        except StreamstarsError as exc:
            log.error("%s", exc)
            self.store.close()
            return EXIT_USAGE
        return None

    def _shutdown(self) -> None:
        self.health.set_ready(False, "stopped")
        self.snapshots.close(final=self.opts.snapshot_on_exit and self.store.is_open)
        self.read_ahead.close()
        self.kafka.close()
        self.dead_letters.close()
        self.store.close()
        self._stop_http()
        log.info("stopped after %d message(s); %d visit(s) read and selected, reused for %d "
                 "other shard event(s)", self.processed, self.preparer.prepared,
                 self.preparer.reused)

    def _stop_http(self) -> None:
        if self.http is not None:
            self.http.stop()
            self.http = None

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> int:
        """Fetch and handle batches until a stop; returns the exit code."""
        while not self.stop_requested.is_set():
            self.health.beat()
            batch = self.kafka.fetch(_BATCH if self.read_ahead.enabled else 1)
            if not batch:
                self._idle_work()
                if self._idle_exit_due():
                    self._finish_warm_up()
                    log.info("idle for %.1f s: exiting", self.opts.exit_when_idle_seconds)
                    break
                continue
            code = self._handle_batch(batch)
            if code is not None:
                return code
        return EXIT_OK

    def _handle_batch(self, batch: list[Message]) -> int | None:
        """Handle the messages of a batch in order; an exit code when the consumer must
        stop (a stop request, a fatal Kafka error)."""
        try:
            for k, msg in enumerate(batch):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        continue
                    log.warning("consumer error: %s", err)
                    if err.fatal():
                        return EXIT_KAFKA
                    continue
                if self.stop_requested.is_set():
                    return EXIT_OK
                self._last_message = time.monotonic()
                position = position_of(msg)
                if position.partition not in self.kafka.assigned:
                    # fetched before the partition was revoked or lost (a stale assignment):
                    # its shards are another consumer's now; consumed again by their owner
                    log.warning("%s: partition %d is not assigned to this consumer (stale "
                                "assignment): the event is not applied", position,
                                position.partition)
                    self.metrics.skipped.labels(reason="stale_assignment").inc()
                    continue
                self.read_ahead.submit(batch[k + 1:])
                self.health.begin(str(position))
                try:
                    self.handle_message(msg)
                except Shutdown:
                    log.info("stop requested: visit at %s abandoned (not applied, not "
                             "committed; it will be consumed again)", position)
                    return EXIT_OK
                finally:
                    self.health.end()
                self._idle_work()
            return None
        finally:
            self.read_ahead.clear()  # what a stop left behind is consumed again later

    def _idle_exit_due(self) -> bool:
        limit = self.opts.exit_when_idle_seconds
        since = max(self._last_message, self.kafka.assigned_at)
        return limit is not None and bool(self.kafka.assigned) and \
            time.monotonic() - since > limit

    def _idle_work(self) -> None:
        self.kafka.update_lag()
        self.snapshots.maybe_start()
        if self.backups is not None:
            self.backups.maybe_backup()
        if self.opts.warm_query_cache \
                and time.monotonic() - self._last_message >= WARM_IDLE_SECONDS:
            self._warm_step()  # at most one density pixel: a message waits no longer

    def _warm_step(self) -> bool:
        """One step of the query-cache warm-up (:class:`QueryCacheWarmer`): True when more
        may be left.  A failure is logged and tried again a minute later."""
        if self.warmer is None:
            if not self.store.is_open:
                return False
            from streamstars.queries import QueryCacheWarmer  # imports scipy: only when asked

            self.warmer = QueryCacheWarmer(self.store.star_store)
        if self.processed != self._warm_seen:  # any commit may have changed a shard
            self._warm_seen = self.processed
            self.warmer.changed()
        if not self.warmer.pending or time.monotonic() < self._warm_retry_at:
            return False
        pixels, seconds = self.warmer.total.pixels_derived, self.warmer.total.seconds
        try:
            finished = self.warmer.step()
        except (StreamstarsError, lmdb.Error, OSError) as exc:
            log.warning("query cache warm-up failed (tried again in %.0f s): %s",
                        _WARM_RETRY_SECONDS, exc)
            self._warm_retry_at = time.monotonic() + _WARM_RETRY_SECONDS
            return False
        self.metrics.query_cache_warm_pixels.inc(self.warmer.total.pixels_derived - pixels)
        self.metrics.query_cache_warm_seconds.inc(self.warmer.total.seconds - seconds)
        if finished is not None:
            log.info("query cache warmed: %s", finished.describe())
        return self.warmer.pending

    def _finish_warm_up(self) -> None:
        """``--exit-when-idle``: complete the warm-up before exiting (unless stopped)."""
        while self.opts.warm_query_cache and not self.stop_requested.is_set() \
                and self._warm_step():
            pass

    # ------------------------------------------------------------------ one message
    def handle_message(self, msg: Message) -> None:
        """Apply, skip or dead-letter one message, then record and commit its offset."""
        position = position_of(msg)
        event: VisitEvent | None = None
        try:
            parsed = self.read_ahead.event(position)  # decoded by the read-ahead, or now
            event = parsed = parsed if parsed is not None else self._parse(msg, position)
            self.hooks.event_parsed(parsed)
            outcome = self.retrier.run(parsed, lambda: self._apply(parsed, position))
        except PermanentInputError as exc:
            self.dead_letters.send(msg, event, exc, permanent=True)
            self.store.record_offset(position)
            outcome = Outcome("dead_lettered")
        except RetriesExhausted as exc:
            self.dead_letters.send(msg, event, exc.cause, permanent=False,
                                   attempts=exc.attempts)
            self.store.record_offset(position)
            outcome = Outcome("dead_lettered")
        self.hooks.offset_stored(position)
        self.kafka.commit(position)
        self.hooks.offset_committed(position)
        self.processed += 1
        self.metrics.count(outcome, event)
        if self.backups is not None:
            self.backups.applied(event, outcome, position)
        if outcome.changed:
            self.snapshots.changed()
        if event is not None and outcome.status != "dead_lettered":
            log.info("%s: %s (%d sources, %d selected, %.2f s)", event.describe(),
                     outcome.status, outcome.n_sources, outcome.n_selected, outcome.seconds)

    def _parse(self, msg: Message, position: Position) -> VisitEvent:
        """The message's event; whatever goes wrong decoding it becomes a dead letter."""
        try:
            return parse_message(msg.value(), msg.key())
        except StreamstarsError:
            raise
        except Exception as exc:  # e.g. MemoryError: never let an event crash the consumer
            log.error("%s: unexpected error decoding the event, dead-lettering:\n%s",
                      position, traceback.format_exc())
            raise UnexpectedError(f"{type(exc).__name__} while decoding the event: {exc}") \
                from exc

    def _apply(self, event: VisitEvent, position: Position) -> Outcome:
        """Prepare (or take from the read-ahead) and apply the event's visit, or retract it,
        in one LMDB transaction with the offset after ``position``."""
        start = time.perf_counter()
        if event.shard is not None:
            return self._apply_shard(event, position, start)
        if self.store.applied_from(event):
            # the visit holds exactly these Butler datasets (immutable): nothing to read
            self.store.record_offset(position)
            return Outcome("skipped", seconds=time.perf_counter() - start)
        if event.action == "retract":
            result = self.store.retract(event.visit, position)
        else:
            prepared = self.read_ahead.take(position, event) or self._prepare(event)
            self.hooks.apply_started(event)
            result = self.store.apply(prepared, replace=event.action == "replace",
                                      position=position)
        self.hooks.visit_applied(event, result.status, position.next_offset)
        return Outcome(result.status, result.n_sources, result.n_selected,
                       time.perf_counter() - start, result.dropped)

    def _apply_shard(self, event: VisitEvent, position: Position, start: float) -> Outcome:
        """A shard event (schema version 3): skipped when its shard is past it, else the
        visit read (or taken from the read-ahead), routed, and the shard's part applied with
        the partition's next offset in the shard's transaction (or removed from the shard)."""
        self.store.check_shard_event(event)
        if self.store.shard_event_done(event, position):
            return Outcome("skipped", seconds=time.perf_counter() - start)
        if event.action == "retract":
            result = self.store.retract_shard(event, position)
        else:
            prepared = self.read_ahead.take(position, event) or self._prepare(event)
            self.hooks.apply_started(event)
            result = self.store.apply_shard(prepared, event, position)
        self.hooks.visit_applied(event, result.status, position.next_offset)
        return Outcome(result.status, result.n_sources, result.n_selected,
                       time.perf_counter() - start, result.dropped)

    def _needs_reading(self, event: VisitEvent, position: Position) -> bool:
        """Whether applying ``event`` (at ``position``) reads files (what the read-ahead
        prepares): not for a retraction, nor for datasets the visit was already applied from,
        nor for a shard event its shard is past (e.g. replayed after a restore)."""
        if event.action == "retract":
            return False
        if event.shard is not None:
            return event.shard_nside == self.store.star_store.shard_nside and \
                not self.store.shard_past(event, position)
        return not self.store.applied_from(event)

    def _prepare(self, event: VisitEvent) -> PreparedVisit:
        """Read and select the event's visit (no store writes: safe in the read-ahead)."""
        return self.preparer.prepare(event, self.store.config)
