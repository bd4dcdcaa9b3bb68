"""Prometheus metrics of the consumer (served by :mod:`.http_server`).

Every metric lives in the consumer's own :class:`prometheus_client.CollectorRegistry` (no global
state, so several consumers can live in one test process).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from streamstars.events import VisitEvent

from .health import HealthState

__all__ = ["ConsumerMetrics", "Outcome"]

_APPLY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_LATENCY_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0)


@dataclass
class Outcome:
    """What one message did: ``status`` is an :class:`~streamstars.ingest.ApplyResult` status
    (``applied``, ``replaced``, ``retracted``, ``skipped``, ``absent``) or ``dead_lettered``."""

    status: str
    n_sources: int = 0
    n_selected: int = 0
    seconds: float = 0.0
    #: rows dropped for unusable coordinates, by reason (applied / replaced visits)
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        """True when the store's visits changed (applied, replaced or retracted)."""
        return self.status in ("applied", "replaced", "retracted")


class ConsumerMetrics:
    """The consumer's metrics (Prometheus naming: ``_total`` counters, ``_seconds`` units)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.applied = Counter(
            "streamstars_visits_applied", "Visits applied (new or replaced)", ["action"],
            registry=r,
        )
        self.retracted = Counter(
            "streamstars_visits_retracted", "Visits retracted from the store", registry=r
        )
        self.skipped = Counter(
            "streamstars_visits_skipped",
            "Events that changed nothing (duplicate or replayed event, retract of an absent "
            "visit)",
            ["reason"],
            registry=r,
        )
        self.dead_lettered = Counter(
            "streamstars_visits_dead_lettered",
            "Events sent to the dead-letter topic",
            ["reason"],
            registry=r,
        )
        self.retries = Counter(
            "streamstars_transient_retries",
            "Retries after transient errors (file not there yet, I/O timeout)",
            registry=r,
        )
        self.sources_read = Counter(
            "streamstars_sources_read", "Source-table rows read", registry=r
        )
        self.observations_selected = Counter(
            "streamstars_observations_selected", "Observations selected and stored", registry=r
        )
        self.rows_dropped = Counter(
            "streamstars_rows_dropped",
            "Source rows that passed every other cut but were dropped for unusable coordinates "
            "(reason nonFiniteRaDec: non-finite ra/dec; raDecOutOfRange: outside [0, 360) x "
            "[-90, 90]), by the visits applied",
            ["reason"],
            registry=r,
        )
        for reason in ("nonFiniteRaDec", "raDecOutOfRange"):  # exported from the start, at 0
            self.rows_dropped.labels(reason)
        self.read_ahead = Counter(
            "streamstars_visits_read_ahead",
            "Visits read and selected while the previous one was applied, by whether the "
            "result was used or read again (failed read-ahead)",
            ["outcome"],
            registry=r,
        )
        self.dead_letter_failures = Counter(
            "streamstars_dead_letter_delivery_failures",
            "Dead letters the producer or the broker did not accept (retried; the partition "
            "waits meanwhile)",
            registry=r,
        )
        self.dead_letters_truncated = Counter(
            "streamstars_dead_letters_truncated",
            "Dead letters whose event was cut to fit the dead-letter size limit",
            registry=r,
        )
        self.in_flight_seconds = Gauge(
            "streamstars_message_in_flight_seconds",
            "Seconds the message being handled has been in flight (0: none)",
            registry=r,
        )
        self.stalled = Gauge(
            "streamstars_progress_stalled",
            "1 while /healthz fails because the consumer makes no progress (a message in "
            "flight, or the main loop not turning, for more than the stall threshold)",
            registry=r,
        )
        self.kafka_commit_failures = Counter(
            "streamstars_kafka_commit_failures",
            "Kafka offset commits that failed (harmless: LMDB holds the offsets)",
            registry=r,
        )
        self.stars = Gauge(
            "streamstars_stars", "Stars in the catalog at the last snapshot", registry=r
        )
        self.margin_violations = Gauge(
            "streamstars_margin_violations",
            "Shard margin violations found by the last snapshot (chains reaching past "
            "shardMargin: stars near a shard border may differ; docs/snapshot-format.md)",
            registry=r,
        )
        self.visits_stored = Gauge(
            "streamstars_visits_stored", "Visits held by the store", registry=r
        )
        self.apply_seconds = Histogram(
            "streamstars_visit_apply_seconds",
            "Time to read, select and apply one visit (one LMDB transaction)",
            buckets=_APPLY_BUCKETS,
            registry=r,
        )
        self.event_latency = Histogram(
            "streamstars_event_latency_seconds",
            "From the event's published_at (else finished_at) to the visit being applied",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.lag = Gauge(
            "streamstars_consumer_lag",
            "Messages behind the high watermark, per partition",
            ["topic", "partition"],
            registry=r,
        )
        self.snapshot_seconds = Histogram(
            "streamstars_snapshot_seconds",
            "Duration of a snapshot",
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
            registry=r,
        )
        self.snapshot_failures = Counter(
            "streamstars_snapshot_failures", "Snapshots that failed", registry=r
        )
        self.last_snapshot_time: float | None = None
        self.snapshot_age = Gauge(
            "streamstars_snapshot_age_seconds",
            "Seconds since the last successful snapshot (-1: none yet)",
            registry=r,
        )
        self.snapshot_age.set_function(self._snapshot_age)
        self.query_cache_warm_seconds = Counter(
            "streamstars_query_cache_warm_seconds",
            "Time spent warming the queries' density-cut cache (--warm-query-cache)",
            registry=r,
        )
        self.query_cache_warm_pixels = Counter(
            "streamstars_query_cache_warm_pixels",
            "Density pixels whose cut the warm-up derived (--warm-query-cache)",
            registry=r,
        )
        self.shard_backups = Counter(
            "streamstars_shard_backups",
            "Shard backups written to --shard-backups (one shard each)",
            registry=r,
        )
        self.shard_backup_failures = Counter(
            "streamstars_shard_backup_failures",
            "Shard backups (or partition indexes) that could not be written (retried; the "
            "consumer goes on applying)",
            registry=r,
        )
        self.shard_backup_rejected = Counter(
            "streamstars_shard_backup_rejected",
            "Shard backups rejected at a restore (partial: no manifest; corrupt: checksum; "
            "another shard or configuration): an older one, the local copy or a replay is used",
            registry=r,
        )
        self.shard_restores = Counter(
            "streamstars_shard_restores",
            "Shards of an assigned partition made current, by source (backup: installed from "
            "a backup; local: the state's own copy was as new; replay: replayed from the "
            "partition's start)",
            ["source"],
            registry=r,
        )
        for source in ("backup", "local", "replay"):  # exported from the start, at 0
            self.shard_restores.labels(source)
        self.last_shard_backup_time: float | None = None
        self.shard_backup_age = Gauge(
            "streamstars_shard_backup_age_seconds",
            "Seconds since this consumer's last successful shard backup (-1: none yet)",
            registry=r,
        )
        self.shard_backup_age.set_function(self._shard_backup_age)
        self.up_since = time.time()

    def _snapshot_age(self) -> float:
        if self.last_snapshot_time is None:
            return -1.0
        return time.time() - self.last_snapshot_time

    def _shard_backup_age(self) -> float:
        if self.last_shard_backup_time is None:
            return -1.0
        return time.time() - self.last_shard_backup_time

    def track(self, health: HealthState) -> None:
        """Compute ``streamstars_message_in_flight_seconds`` and
        ``streamstars_progress_stalled`` from ``health`` at every scrape."""
        self.in_flight_seconds.set_function(health.in_flight_seconds)
        self.stalled.set_function(lambda: 0.0 if health.healthy()[0] else 1.0)

    def exposition(self) -> bytes:
        """The text exposition of every metric."""
        return bytes(generate_latest(self.registry))

    def count(self, outcome: Outcome, event: VisitEvent | None) -> None:
        """Count one message's outcome (``event``: its event, when it could be decoded)."""
        status = outcome.status
        if status in ("applied", "replaced"):
            self.applied.labels("replace" if status == "replaced" else "apply").inc()
        elif status == "retracted":
            self.retracted.inc()
        elif status == "skipped":
            self.skipped.labels("duplicate").inc()
        elif status == "absent":
            self.skipped.labels("retract_absent").inc()
        if outcome.changed:
            self.visits_stored.inc(-1 if status == "retracted" else (1 if status == "applied"
                                                                      else 0))
        for reason, count in outcome.dropped.items():
            self.rows_dropped.labels(reason).inc(count)
        if status in ("applied", "replaced", "skipped"):
            self.sources_read.inc(outcome.n_sources)
            self.observations_selected.inc(outcome.n_selected if status != "skipped" else 0)
            self.apply_seconds.observe(outcome.seconds)
            stamp = event.published_at or event.finished_at if event is not None else None
            if stamp and status != "skipped":
                try:
                    latency = time.time() - datetime.fromisoformat(stamp).timestamp()
                    self.event_latency.observe(max(0.0, latency))
                except ValueError:
                    pass
