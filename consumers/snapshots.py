"""Periodic snapshots of the consumer: every ``--snapshot-every-visits`` changes and/or
``--snapshot-every-seconds``, and optionally at exit.  A snapshot is computed from one LMDB
read transaction in a background thread (ingestion goes on) and renamed into place
atomically; a failed snapshot is counted and logged, never stops ingestion."""

from __future__ import annotations

import logging
import threading
import time

from .context import RunContext
from .hooks import ConsumerHooks
from .visit_store import ConsumerStore

__all__ = ["SnapshotScheduler"]

log = logging.getLogger("streamstars.run")


class SnapshotScheduler:
    """Decides when a snapshot is due and writes it in a thread (one at a time)."""

    def __init__(self, ctx: RunContext, store: ConsumerStore, hooks: ConsumerHooks) -> None:
        self.opts = ctx.options
        self.metrics = ctx.metrics
        self.store = store
        self.hooks = hooks
        # a shared snapshot (--snapshot-shared) is checked once even without a change: the
        # shards this state holds since before the start may be missing from it or written
        # with other settings (comparing costs their offsets only)
        self._changes = 1 if ctx.options.snapshot_shared else 0
        self._last = time.monotonic()
        self._thread: threading.Thread | None = None

    def changed(self) -> None:
        """One visit was applied, replaced or retracted."""
        self._changes += 1

    def maybe_start(self, force: bool = False) -> None:
        """Start a snapshot when one is due (``force``: whenever anything changed, and wait
        for it)."""
        opts = self.opts
        if opts.snapshot_dir is None or self._changes == 0:
            return
        if self._thread is not None and self._thread.is_alive():
            return
        due = force
        if opts.snapshot_every_visits and self._changes >= opts.snapshot_every_visits:
            due = True
        if opts.snapshot_every_seconds and \
                time.monotonic() - self._last >= opts.snapshot_every_seconds:
            due = True
        if not due:
            return
        self._changes = 0
        self._last = time.monotonic()
        self._thread = threading.Thread(target=self._write, name="snapshot", daemon=True)
        self._thread.start()
        if force:
            self._thread.join()

    def close(self, final: bool) -> None:
        """Wait for a snapshot in progress; with ``final``, write a last one if anything
        changed since (a failure is logged)."""
        if self._thread is not None:
            self._thread.join()
        if final:
            try:
                self.maybe_start(force=True)
            except Exception as exc:  # noqa: BLE001
                log.error("final snapshot failed: %s", exc)

    def _write(self) -> None:
        """Write a snapshot from one LMDB read transaction (ingestion goes on meanwhile)."""
        start = time.perf_counter()
        self.hooks.snapshot_started()
        try:
            summary = self.store.write_snapshot()
        except Exception as exc:  # noqa: BLE001 - a failed snapshot must not stop ingestion
            self.metrics.snapshot_failures.inc()
            log.error("snapshot to %s failed: %s", self.opts.snapshot_dir, exc)
            return
        seconds = time.perf_counter() - start
        if summary is None:  # a shared snapshot already complete with these partitions
            log.info("snapshot %s: unchanged (%.2f s)", self.opts.snapshot_dir, seconds)
            return
        self.metrics.snapshot_seconds.observe(seconds)
        self.metrics.last_snapshot_time = time.time()
        self.metrics.stars.set(summary.n_stars)
        self.metrics.margin_violations.set(len(summary.violations))
        log.info("snapshot %s: %d visits, %d stars, %d observations in %.2f s",
                 self.opts.snapshot_dir, summary.n_visits, summary.n_stars,
                 summary.n_observations, seconds)
