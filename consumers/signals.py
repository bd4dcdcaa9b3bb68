"""SIGTERM/SIGINT for the consumer: the first asks for a clean stop, the second abandons the
visit in flight (``KeyboardInterrupt``; its LMDB transaction is aborted, never half-applied)."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from .context import RunContext

__all__ = ["StopSignals"]

log = logging.getLogger("streamstars.run")


class StopSignals:
    """Turns SIGTERM/SIGINT into ``stop_requested`` (first signal) or ``KeyboardInterrupt``
    (any later one), and readiness into "stopping"."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.received = 0

    def install(self) -> None:
        """Install the handlers (only possible from the main thread; elsewhere, e.g. a test
        running the consumer in a thread, nothing is installed)."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)
            signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.received += 1
        name = signal.Signals(signum).name
        if self.received == 1:
            log.info("%s received: finishing the visit in flight, then stopping", name)
            self.ctx.stop_requested.set()
            self.ctx.health.set_ready(False, f"stopping ({name})")
        else:
            log.warning("%s received again: abandoning the visit in flight", name)
            raise KeyboardInterrupt
