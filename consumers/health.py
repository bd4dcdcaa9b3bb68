"""Whether the consumer makes progress (``/healthz``) and is ready (``/readyz``)."""

from __future__ import annotations

import threading
import time

__all__ = ["HealthState"]


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
