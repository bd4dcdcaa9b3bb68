"""Retries of the message in flight: transient errors with exponential backoff within a
budget, waits that give up as soon as a stop is requested, and how errors are classed.

* :class:`~streamstars.errors.TransientInputError` and ``OSError`` (file not there yet, I/O
  timeout) are retried for up to ``retry_max_seconds``, then :class:`RetriesExhausted`;
* :class:`~streamstars.errors.PermanentInputError` passes at once (a dead letter); any other
  :class:`~streamstars.errors.StreamstarsError` becomes one;
* :class:`~streamstars.errors.StateError`, LMDB errors (:class:`LmdbError`), a stop
  (:class:`Shutdown`) and a second signal (``KeyboardInterrupt``) stop the consumer;
* anything else is a bug or unforeseen input: :class:`UnexpectedError` (a dead letter, with
  the traceback logged).
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from typing import TypeVar

from streamstars.errors import (
    PermanentInputError,
    StateError,
    StreamstarsError,
    TransientInputError,
)
from streamstars.events import VisitEvent

from .context import RunContext

__all__ = ["LmdbError", "Retrier", "RetriesExhausted", "Shutdown", "UnexpectedError", "is_lmdb"]

log = logging.getLogger("streamstars.run")

T = TypeVar("T")


class Shutdown(Exception):
    """Raised inside retry loops when a stop was requested: abandon the visit in flight."""


class RetriesExhausted(Exception):
    """A transient error persisted for the whole retry budget."""

    def __init__(self, cause: BaseException, attempts: int) -> None:
        super().__init__(f"transient error persisted after {attempts} attempt(s): {cause}")
        self.cause = cause
        self.attempts = attempts


class UnexpectedError(PermanentInputError):
    """An unexpected exception while decoding or applying an event (a bug or unforeseen
    input)."""


class LmdbError(StateError):
    """An LMDB error other than a full map (which the store handles)."""


def is_lmdb(exc: BaseException) -> bool:
    """True for an ``lmdb.Error``."""
    try:
        import lmdb
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, lmdb.Error)


class Retrier:
    """Backoff and interruptible waits for the message in flight (its partition waits)."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.opts = ctx.options

    def run(self, event: VisitEvent, body: Callable[[], T]) -> T:
        """Run ``body``; retry transient errors with exponential backoff, within a budget.

        Raises:
            RetriesExhausted: a transient error outlived ``retry_max_seconds``.
            PermanentInputError: the event cannot be applied (also :class:`UnexpectedError`).
            StateError, LmdbError, Shutdown, KeyboardInterrupt: the consumer must stop.
        """
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
                if isinstance(exc, OSError) and is_lmdb(exc):
                    raise
                elapsed = time.monotonic() - started
                if elapsed + delay > opts.retry_max_seconds:
                    raise RetriesExhausted(exc, attempts) from exc
                self.ctx.metrics.retries.inc()
                self.ctx.health.waiting_for(f"retrying a transient error (attempt {attempts}): "
                                        f"{str(exc)[:300]}")
                log.warning("%s: transient error (attempt %d, retrying in %.1f s): %s",
                            event.describe(), attempts, delay, exc)
                self.sleep(delay)
                delay = self.next_delay(delay)
            except (StateError, KeyboardInterrupt, Shutdown):
                raise
            except StreamstarsError as exc:
                raise PermanentInputError(f"{event.describe()}: {exc}") from exc
            except Exception as exc:
                if is_lmdb(exc):
                    raise LmdbError(str(exc)) from exc
                log.error("%s: unexpected error, dead-lettering:\n%s", event.describe(),
                          traceback.format_exc())
                raise UnexpectedError(f"{event.describe()}: {type(exc).__name__}: {exc}") \
                    from exc

    def next_delay(self, delay: float) -> float:
        """The backoff after ``delay``: doubled, at most ``retry_max_backoff_seconds``."""
        return min(delay * 2.0, self.opts.retry_max_backoff_seconds)

    def sleep(self, seconds: float) -> None:
        """Wait, but give up the visit in flight as soon as a stop is requested.

        Raises:
            Shutdown: a stop was requested (before or while waiting).
        """
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if self.ctx.stop_requested.is_set():
                raise Shutdown
            if left <= 0:
                return
            self.ctx.health.beat()
            self.ctx.stop_requested.wait(min(left, 0.5))
