"""Helpers of the tests that run consumers (``tests/consumers``, ``tests/butler``).

The ``streamstars`` command line as a subprocess, a consumer's snapshot compared with
``backfill``'s, the visits a store applied, polling, the consumer's HTTP endpoints, and
:class:`GroupConsumer` (a ``streamstars run --group`` subprocess) with the application logs of
the crash hooks.  The
module-scoped ``broker`` fixture they use is in ``tests/conftest.py``.

Usage (``tests/`` is on ``sys.path`` under pytest)::

    from consumer_helpers import assert_same_catalogs, snapshot_state, wait_until
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pytest
    from kafka_broker import TansuBroker

    from streamstars.simulate import SimulatedSurvey

#: provenance keys in which a consumer's snapshot differs from ``backfill``'s of the same visits
SNAPSHOT_IGNORE = ("created", "kafka_offsets", "kafka_topic", "kafka_group")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m streamstars.cli ARGS`` run to completion, its output captured as text."""
    return subprocess.run([sys.executable, "-m", "streamstars.cli", *args], capture_output=True,
                          text=True)


def snapshot_state(state: Path, out: Path) -> Path:
    """``streamstars snapshot OUT --state STATE`` (asserted to succeed); returns ``out``."""
    return snapshot_states(out, state)


def snapshot_states(out: Path, *states: Path) -> Path:
    """``streamstars snapshot OUT --state A --state B ...`` (asserted to succeed); returns
    ``out``."""
    done = run_cli("snapshot", str(out), *(a for s in states for a in ("--state", str(s))))
    assert done.returncode == 0, done.stderr
    return out


def assert_same_catalogs(a: Path, b: Path) -> None:
    """The snapshots ``a`` and ``b`` hold the same catalogs (:data:`SNAPSHOT_IGNORE` aside)."""
    from streamstars.io.snapshot_files import compare_snapshots

    # the shards' generations (their stores' instances) differ between two states
    diffs = compare_snapshots(a, b, ignore_metadata_keys=SNAPSHOT_IGNORE,
                              ignore_manifest_keys=("shards",))
    assert not diffs, f"{len(diffs)} difference(s), first: {diffs[0][:2000]}"


def applied_visits(state: Path) -> dict[int, str]:
    """The visits applied to the state directory ``state`` (empty while it does not exist
    yet)."""
    from streamstars.state import StateDirectory

    if not (state / "manifest.json").exists():
        return {}
    with StateDirectory.open(state, readonly=True) as directory:
        return directory.applied_visits()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` every 0.1 s until it holds.

    Raises:
        AssertionError: it still did not hold after ``timeout`` seconds (``what`` names it).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def http_get(port: int, path: str) -> tuple[int, str]:
    """``GET http://127.0.0.1:PORT/PATH``: the status and body, error statuses included."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


class ConsumerProcess:
    """A ``streamstars run`` subprocess started with ``args`` (after ``streamstars run``), its
    output in ``log_path``."""

    def __init__(self, args: list[str], log_path: Path,
                 env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self.log = open(log_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "streamstars.cli", "run", *args],
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})

    def wait(self, timeout: float) -> int:
        """The exit code; a consumer still running after ``timeout`` is killed (a failure)."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"the consumer did not finish in {timeout} s:\n"
                                 f"{self.text()[-4000:]}") from None
        finally:
            self.log.close()

    def kill(self) -> None:
        """SIGKILL (a crash), then reap it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.wait(10)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (a clean stop), then its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def text(self) -> str:
        return self.log_path.read_text()


def consumer_args(broker: TansuBroker, topic: str, state: Path, data_root: Path, tmp: Path,
                  group: str | None = None) -> list[str]:
    """``streamstars run`` options every test consumer has: the broker (with the tests'
    client properties), the topic, the group (default ``g-TOPIC``), the state and the data
    root."""
    from kafka_broker import write_kafka_config

    return ["--bootstrap-servers", broker.bootstrap, "--topic", topic,
            "--group", group or f"g-{topic}", "--state", str(state),
            "--data-root", str(data_root),
            "--kafka-config", str(write_kafka_config(tmp / "kafka.properties"))]


class GroupConsumer(ConsumerProcess):
    """A ``streamstars run --group`` subprocess with its own state directory (output in a log
    file beside it; ``extra`` arguments appended)."""

    def __init__(self, broker: TansuBroker, topic: str, group: str, state: Path,
                 survey: SimulatedSurvey, config_file: Path, tmp: Path, *extra: str,
                 env: dict[str, str] | None = None) -> None:
        self.state = state
        super().__init__(
            [*consumer_args(broker, topic, state, survey.out_dir.parent, tmp, group),
             "--config", str(config_file), "--dead-letter-topic", f"{topic}.dead-letters",
             *extra],
            tmp / f"{state.name}-{time.monotonic_ns()}.log", env)

    def assigned(self) -> bool:
        return "assigned " in self.text()

    def settled(self) -> bool:
        """The consumer's last assignment is one partition, with no revocation after it."""
        lines = [line for line in self.text().splitlines()
                 if "assigned " in line or "partitions revoked" in line]
        if not lines or "assigned " not in lines[-1]:
            return False
        tail = [line for line in reversed(lines) if "assigned " in line]
        return len(tail) >= 1 and (len(lines) == 1 or "partitions revoked" in lines[-2])


def applications(app_log: Path) -> list[dict[str, Any]]:
    """The lines of a crash-hooks application log (``crash_hooks.hooks_env``), in order; none
    while it does not exist."""
    if not app_log.exists():
        return []
    return [json.loads(line) for line in app_log.read_text().splitlines()]


#: meta keys that differ between two copies of one shard with the same data
_COPY_META = (b"created", b"instance")


def shard_tables(state: Path) -> dict[int, dict[str, dict[bytes, bytes]]]:
    """Every key and value of every sub-database of every shard store of the state directory
    ``state`` (shard pixel -> sub-database -> {key: value}), without the meta values that name
    a copy rather than its data (creation time, instance id): two shards built from the same
    events in the same order are equal here."""
    import lmdb

    from streamstars.state.schema import ALL_DBS

    out: dict[int, dict[str, dict[bytes, bytes]]] = {}
    for data in sorted(state.glob("shards/*/*/data.mdb")):
        env = lmdb.open(str(data.parent), readonly=True, lock=False, max_dbs=len(ALL_DBS) + 2)
        try:
            tables: dict[str, dict[bytes, bytes]] = {}
            with env.begin() as txn:
                names = [bytes(k) for k, _ in txn.cursor()]
                for name in names:
                    db = env.open_db(name, txn=txn, create=False)
                    tables[name.decode()] = {bytes(k): bytes(v) for k, v in txn.cursor(db=db)
                                             if not (name == b"meta" and bytes(k) in _COPY_META)}
            out[int(data.parent.name)] = tables
        finally:
            env.close()
    return out


# ------------------------------------------------------------------ the group tests' inputs
def group_survey(tmp_path_factory: pytest.TempPathFactory, n_visits: int) -> SimulatedSurvey:
    """The small simulated survey of the consumer-group tests (seed 23, 1500 sources a
    visit)."""
    from streamstars.simulate import simulate_survey

    data = tmp_path_factory.mktemp("data")
    return simulate_survey(data / "repo", n_visits=n_visits, seed=23, sources_per_visit=1500,
                           write_refcat=False)


def shard_config_file(tmp_path_factory: pytest.TempPathFactory, nside: int) -> Path:
    """A configuration file setting ``shardNside``."""
    path = tmp_path_factory.mktemp("config") / "streamstars.toml"
    path.write_text(f"shardNside = {nside}\n")
    return path


def backfill_catalogs(survey: SimulatedSurvey, config_file: Path,
                      tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``backfill`` of the survey in one process, then its snapshot: the expected catalogs."""
    tmp = tmp_path_factory.mktemp("backfill")
    done = run_cli("backfill", str(survey.out_dir), "--state", str(tmp / "state"),
                   "--config", str(config_file), "--no-progress")
    assert done.returncode == 0, done.stderr
    return snapshot_state(tmp / "state", tmp / "snap")
