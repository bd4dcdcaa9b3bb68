"""Prometheus metrics and the ``/metrics`` ``/healthz`` ``/readyz`` HTTP endpoint of the consumer.

Every metric lives in the consumer's own :class:`prometheus_client.CollectorRegistry` (no global
state, so several consumers can live in one test process).  The HTTP server binds to
``127.0.0.1`` unless told otherwise.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = ["ConsumerMetrics", "HealthServer", "HealthState"]

_APPLY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_LATENCY_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0)


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
        self.up_since = time.time()

    def _snapshot_age(self) -> float:
        if self.last_snapshot_time is None:
            return -1.0
        return time.time() - self.last_snapshot_time

    def track(self, health: HealthState) -> None:
        """Compute ``streamstars_message_in_flight_seconds`` and
        ``streamstars_progress_stalled`` from ``health`` at every scrape."""
        self.in_flight_seconds.set_function(health.in_flight_seconds)
        self.stalled.set_function(lambda: 0.0 if health.healthy()[0] else 1.0)

    def exposition(self) -> bytes:
        """The text exposition of every metric."""
        return bytes(generate_latest(self.registry))


class HealthState:
    """What ``/healthz`` and ``/readyz`` report.

    The consumer is healthy while it makes progress.  It is not (``/healthz`` answers 503 with
    the reason) when, for more than ``stall_seconds``:

    * one message has been in flight -- fetched, and neither applied, skipped nor
      dead-lettered with its offset recorded (stuck reading a file, dead-letter delivery
      failing, ...); messages behind it in its partition wait meanwhile; or
    * no message is in flight and the main loop has not turned.
    """

    def __init__(self, stall_seconds: float = 600.0) -> None:
        self.stall_seconds = stall_seconds
        self.last_loop = time.monotonic()
        self.ready = False
        self.reason = "starting"
        self.lock = threading.Lock()
        self._in_flight: str | None = None
        self._in_flight_since = 0.0
        self._waiting_for = ""

    def beat(self) -> None:
        """The main loop is alive."""
        self.last_loop = time.monotonic()

    def set_ready(self, ready: bool, reason: str) -> None:
        """Record readiness and why."""
        with self.lock:
            self.ready = ready
            self.reason = reason

    def begin(self, message: str) -> None:
        """A message (``topic[partition]@offset``) is now in flight."""
        with self.lock:
            self._in_flight = message
            self._in_flight_since = time.monotonic()
            self._waiting_for = "being applied"

    def waiting_for(self, what: str) -> None:
        """What the message in flight is waiting for (shown by ``/healthz`` when stalled)."""
        with self.lock:
            self._waiting_for = what

    def end(self) -> None:
        """The message in flight is done (its offset is recorded)."""
        with self.lock:
            self._in_flight = None
        self.beat()

    def in_flight_seconds(self) -> float:
        """How long the current message has been in flight, in seconds (0 when none)."""
        with self.lock:
            if self._in_flight is None:
                return 0.0
            return time.monotonic() - self._in_flight_since

    def healthy(self) -> tuple[bool, str]:
        """``(True, "ok")``, or ``(False, reason)`` when no progress was made for longer than
        ``stall_seconds`` (see the class)."""
        now = time.monotonic()
        with self.lock:
            if self._in_flight is not None:
                stuck = now - self._in_flight_since
                if stuck > self.stall_seconds:
                    return False, (
                        f"no progress: {self._in_flight} in flight for {stuck:.0f} s "
                        f"(threshold {self.stall_seconds:g} s), {self._waiting_for}"
                    )
                return True, "ok"
        idle = now - self.last_loop
        if idle > self.stall_seconds:
            return False, f"main loop stalled for {idle:.0f} s"
        return True, "ok"


class HealthServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on a background thread."""

    def __init__(
        self, metrics: ConsumerMetrics, health: HealthState, host: str, port: int
    ) -> None:
        self.metrics = metrics
        self.health = health
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, outer.metrics.exposition(), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    ok, why = outer.health.healthy()
                    self._send(200 if ok else 503, (why + "\n").encode(), "text/plain")
                elif path == "/readyz":
                    with outer.health.lock:
                        ok, why = outer.health.ready, outer.health.reason
                    self._send(200 if ok else 503, (why + "\n").encode(), "text/plain")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return int(self.server.server_address[1])

    def start(self) -> None:
        """Serve in the background."""
        self.thread.start()

    def stop(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()
