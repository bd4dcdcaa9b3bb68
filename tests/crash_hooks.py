"""Consumer hooks of the crash tests (``STREAMSTARS_CONSUMER_HOOKS=crash_hooks``, with this
directory on ``PYTHONPATH``: :func:`hooks_env` sets both).

``STREAMSTARS_TEST_KILL`` names where the consumer SIGKILLs itself, as comma-separated
``POINT:N`` items (the N-th time the point is reached in this process, 1-based):

``before_apply``         an event was parsed, nothing written yet;
``during_apply:N:MS``    a timer fires MS milliseconds after the N-th apply started (read,
                         select, association or LMDB commit, wherever it is by then);
``lmdb_commit``          a timer armed just before an LMDB commit (the index's intent, a shard's
                         transaction, the index's completion with the offset) fires within
                         0.5 ms, i.e. during ``mdb_txn_commit`` (which fsyncs) or right after
                         it, before anything else runs;
``after_lmdb_commit``    the visit is committed in every shard and its offset in the index,
                         Kafka not yet;
``after_kafka_commit``   both committed;
``during_snapshot:N:MS`` MS milliseconds into the N-th periodic snapshot.

``STREAMSTARS_APPLICATION_LOG`` names a file where each application that changed the store
(status applied, replaced or retracted) is appended as one JSON line, plus a line
``{"kill": POINT, "visit": V}`` written (and fsynced) right before a self-kill, so that a test
can count applications per visit across crashes; with ``--shard-backups``, each shard made
current at an assignment adds ``{"restored": SHARD, "source": "backup"|"local"|"replay",
"offset": NEXT_OFFSET}`` (in order with the applications).
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from streamstars.consumers.hooks import ENV_HOOKS, ConsumerHooks
from streamstars.consumers.kafka_client import Position
from streamstars.events import VisitEvent
from streamstars.state import StarStore, StateDirectory

ENV_KILL = "STREAMSTARS_TEST_KILL"
ENV_APPLICATION_LOG = "STREAMSTARS_APPLICATION_LOG"


def hooks_env(app_log: Path | None = None, kill: str | None = None) -> dict[str, str]:
    """Environment variables that make a ``streamstars run`` subprocess use these hooks
    (logging its applications to ``app_log``, killing itself as ``kill`` says)."""
    tests = str(Path(__file__).resolve().parent)
    path = os.environ.get("PYTHONPATH")
    env = {ENV_HOOKS: "crash_hooks",
           "PYTHONPATH": tests if not path else f"{tests}{os.pathsep}{path}"}
    if app_log is not None:
        env[ENV_APPLICATION_LOG] = str(app_log)
    if kill is not None:
        env[ENV_KILL] = kill
    return env


def consumer_hooks() -> CrashHooks:
    """The hooks ``streamstars run`` loads (from the environment variables above)."""
    return CrashHooks()


class CrashHooks(ConsumerHooks):
    """Parsed ``STREAMSTARS_TEST_KILL`` plan; kills and logs at the consumer's steps."""

    def __init__(self, spec: str | None = None, log_path: str | None = None) -> None:
        spec = os.environ.get(ENV_KILL, "") if spec is None else spec
        self.log_path = os.environ.get(ENV_APPLICATION_LOG) if log_path is None else log_path
        self.plan: dict[str, tuple[int, float]] = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            parts = item.split(":")
            name = parts[0]
            nth = int(parts[1]) if len(parts) > 1 else 1
            delay_ms = float(parts[2]) if len(parts) > 2 else 0.0
            self.plan[name] = (nth, delay_ms)
        self.seen: Counter[str] = Counter()
        #: the visit of the message in flight (None before its event is decoded)
        self.visit: int | None = None

    @property
    def active(self) -> bool:
        """True when any kill is planned."""
        return bool(self.plan)

    # ------------------------------------------------------------------ the consumer's steps
    def store_opened(self, store: StateDirectory) -> None:
        """Arm the ``lmdb_commit`` point on the write transactions of the state's index and of
        every shard store it opens (when planned)."""
        if "lmdb_commit" in self.plan:
            store.index.env = _EnvProxy(store.index.env, self)  # type: ignore[assignment]
            store.shard_opened = self.shard_opened

    def shard_opened(self, store: StarStore) -> None:
        store.env = _EnvProxy(store.env, self)  # type: ignore[assignment]

    def event_parsed(self, event: VisitEvent) -> None:
        self.visit = event.visit
        self.point("before_apply")

    def apply_started(self, event: VisitEvent) -> None:
        self.timer("during_apply", default_ms=50.0)

    def visit_applied(self, event: VisitEvent, status: str, next_offset: int) -> None:
        self.record_application(event.visit, status, next_offset, event.shard)

    def offset_stored(self, position: Position) -> None:
        self.point("after_lmdb_commit")

    def offset_committed(self, position: Position) -> None:
        self.point("after_kafka_commit")
        self.visit = None  # the message is finished

    def snapshot_started(self) -> None:
        self.timer("during_snapshot", default_ms=100.0)

    def shard_restored(self, pixel: int, source: str, offset: int) -> None:
        self._write({"restored": pixel, "source": source, "offset": offset,
                     "pid": os.getpid()})

    # ------------------------------------------------------------------ kills and the log
    def _write(self, record: dict[str, Any]) -> None:
        if not self.log_path:
            return
        with open(self.log_path, "a") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def record_application(self, visit: int, status: str, offset: int | None,
                           shard: int | None = None) -> None:
        """Log one application that changed the store (when the log is enabled); ``shard``:
        the shard of a shard event (schema version 3)."""
        if status in ("applied", "replaced", "retracted"):
            record: dict[str, Any] = {"visit": visit, "status": status, "offset": offset,
                                      "pid": os.getpid()}
            if shard is not None:
                record["shard"] = shard
            self._write(record)

    def _die(self, point: str) -> None:
        self._write({"kill": point, "visit": self.visit, "pid": os.getpid()})
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(10)  # never reached

    def _due(self, point: str) -> tuple[bool, float]:
        if point not in self.plan:
            return False, 0.0
        self.seen[point] += 1
        nth, delay_ms = self.plan[point]
        return self.seen[point] == nth, delay_ms

    def point(self, point: str) -> None:
        """Kill the process now if ``point`` is due."""
        due, _ = self._due(point)
        if due:
            self._die(point)

    def timer(self, point: str, default_ms: float = 0.0) -> None:
        """If ``point`` is due, kill the process after its delay (from another thread)."""
        due, delay_ms = self._due(point)
        if not due:
            return
        delay = (delay_ms or default_ms) / 1000.0
        self._write({"kill": point, "visit": self.visit, "pid": os.getpid(), "armed": True})

        def fire() -> None:
            time.sleep(delay)
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=fire, daemon=True).start()


class _Proxy:
    """Passes every attribute through to the wrapped LMDB object."""

    def __init__(self, wrapped: Any, hooks: CrashHooks) -> None:
        self._wrapped = wrapped
        self._hooks = hooks

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)


class _TxnProxy(_Proxy):
    """Wraps an ``lmdb.Transaction`` context so a kill timer is armed right before commit."""

    def __enter__(self) -> Any:
        return self._wrapped.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        if exc[0] is None:
            self._hooks.timer("lmdb_commit", default_ms=random.uniform(0.0, 0.5))
        return self._wrapped.__exit__(*exc)


class _EnvProxy(_Proxy):
    """Wraps an ``lmdb.Environment`` so that write transactions get :class:`_TxnProxy`."""

    def begin(self, *args: Any, **kwargs: Any) -> Any:
        txn = self._wrapped.begin(*args, **kwargs)
        if kwargs.get("write"):
            return _TxnProxy(txn, self._hooks)
        return txn
