"""Helpers of the tests that run consumers (``tests/consumers``, ``tests/butler``).

The ``streamstars`` command line as a subprocess, a consumer's snapshot compared with
``backfill``'s, the visits a store applied, polling, and the consumer's HTTP endpoints.  The
module-scoped ``broker`` fixture they use is in ``tests/conftest.py``.

Usage (``tests/`` is on ``sys.path`` under pytest)::

    from consumer_helpers import assert_same_catalogs, snapshot_state, wait_until
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

#: provenance keys in which a consumer's snapshot differs from ``backfill``'s of the same visits
SNAPSHOT_IGNORE = ("created", "kafka_offsets", "kafka_topic", "kafka_group")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m streamstars.cli ARGS`` run to completion, its output captured as text."""
    return subprocess.run([sys.executable, "-m", "streamstars.cli", *args], capture_output=True,
                          text=True)


def snapshot_state(state: Path, out: Path) -> Path:
    """``streamstars snapshot OUT --state STATE`` (asserted to succeed); returns ``out``."""
    done = run_cli("snapshot", str(out), "--state", str(state))
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
