"""Hostile messages on the visits topic, against a real broker (tansu) and real consumers.

The setting of the "hostile input" issue: ``streamstars simulate R --visits 8 --seed 1
--sources-per-visit 2000``, its visits published to a topic with hostile messages among them.
Every test checks that the hostile messages end up as dead letters (exactly once each, with
where they came from), that the consumer never stops or crash-loops on them, and that the
good visits are applied exactly once: the consumer's snapshot equals ``backfill`` of the same
visits and the application log (``STREAMSTARS_APPLICATION_LOG``) holds one application per
visit.
"""

from __future__ import annotations

import base64
import hashlib
import json
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from consumer_helpers import (
    ConsumerProcess,
    applied_visits,
    assert_same_catalogs,
    consumer_args,
    http_get,
    run_cli,
    snapshot_state,
    wait_until,
)
from crash_hooks import hooks_env
from kafka_broker import TansuBroker, free_port

from streamstars.events import VisitEvent

N_VISITS = 8
#: librdkafka's default message.max.bytes less the consumer's 1 KiB of framing headroom
DEFAULT_DEAD_LETTER_LIMIT = 1_000_000 - 1024


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The issue's survey: ``streamstars simulate R --visits 8 --seed 1
    --sources-per-visit 2000`` (``R``'s parent is the consumers' data root)."""
    out = tmp_path_factory.mktemp("data") / "R"
    done = run_cli("simulate", str(out), "--visits", str(N_VISITS), "--seed", "1",
                   "--sources-per-visit", "2000")
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def events(repo: Path) -> dict[int, VisitEvent]:
    """The visit events ``streamstars publish`` writes for the survey, by visit."""
    from streamstars.consumers.publisher import events_for_inventory
    from streamstars.io.discover import discover_repo

    found, skipped = events_for_inventory(discover_repo(repo))
    assert not skipped and len(found) == N_VISITS
    return {e.visit: e for e in found}


@pytest.fixture(scope="module")
def backfill_snapshot(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Snapshot of ``backfill`` over the survey: the catalogs of the good visits."""
    tmp = tmp_path_factory.mktemp("backfill")
    done = run_cli("backfill", str(repo), "--state", str(tmp / "state"), "--no-progress")
    assert done.returncode == 0, done.stderr
    return snapshot_state(tmp / "state", tmp / "snap")


# ------------------------------------------------------------------------------ helpers
class Consumer(ConsumerProcess):
    """A ``streamstars run`` subprocess logging its applications to ``app_log``."""

    def __init__(self, broker: TansuBroker, topic: str, state: Path, data_root: Path,
                 tmp: Path, app_log: Path, *extra: str) -> None:
        super().__init__([*consumer_args(broker, topic, state, data_root, tmp),
                          "--dead-letter-topic", f"{topic}.dead-letters", *extra],
                         tmp / f"consumer-{time.monotonic_ns()}.log", hooks_env(app_log))


def _topic(broker: TansuBroker, name: str,
           messages: list[tuple[bytes | None, bytes | None]]) -> None:
    """A one-partition topic holding ``messages`` (in order) and its dead-letter topic."""
    broker.create_topic(name, partitions=1)
    broker.create_topic(f"{name}.dead-letters", partitions=1)
    broker.produce(name, messages)


def _good(events: dict[int, VisitEvent]) -> list[tuple[bytes | None, bytes | None]]:
    return [(e.key, e.to_json()) for e in events.values()]


def _dead_letters(broker: TansuBroker, topic: str, expected: int) -> list[Any]:
    """Every dead letter of ``topic``: exactly ``expected`` of them (none doubled)."""
    found = broker.consume_all(f"{topic}.dead-letters", expected + 1, timeout=8)
    assert len(found) == expected, [m.value()[:300] for m in found]
    return found


def _check_exactly_once(state: Path, app_log: Path, events: dict[int, VisitEvent],
                        backfill_snapshot: Path, tmp: Path) -> None:
    """Every good visit applied once, and the catalogs are backfill's."""
    assert sorted(applied_visits(state)) == sorted(events)
    lines = [json.loads(line) for line in app_log.read_text().splitlines()]
    applications = Counter(r["visit"] for r in lines)
    assert applications == Counter({v: 1 for v in events}), applications
    assert all(r["status"] == "applied" for r in lines), lines
    assert_same_catalogs(snapshot_state(state, tmp / "snap"), backfill_snapshot)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("read_ahead", ["0", "1"])
def test_deeply_nested_json_is_dead_lettered_not_a_crash_loop(
    broker: TansuBroker, repo: Path, events: dict[int, VisitEvent], backfill_snapshot: Path,
    tmp_path: Path, read_ahead: str,
) -> None:
    """Defect 3: a deeply nested JSON event made the decoder raise RecursionError (exit 1 at
    the same offset on every restart).  The parser is bounded (size and depth): the event is
    dead-lettered, the other visits are applied, and a restart changes nothing."""
    topic = f"hostile-deep-{read_ahead}"
    visits = sorted(events)
    bare = b"[" * 100_000 + b"]" * 100_000
    # a well-formed event of visit 3 with a deep value in an optional field
    inner = json.loads(events[visits[2]].to_json())
    inner["producer"] = "x"
    text = json.dumps(inner).replace('"producer": "x"', '"producer": ' + "[" * 50_000
                                     + "]" * 50_000)
    nested = text.encode()
    good = _good(events)
    messages = [*good[:4], (b"1", bare), (events[visits[2]].key, nested), *good[4:]]
    _topic(broker, topic, messages)
    state, app_log = tmp_path / "state", tmp_path / "applications.jsonl"
    for _run in range(2):  # the second start must not meet the event again
        consumer = Consumer(broker, topic, state, repo.parent, tmp_path, app_log,
                            "--exit-when-idle", "2", "--read-ahead", read_ahead)
        assert consumer.wait(120) == 0, consumer.text()
        assert "Traceback" not in consumer.text()

    letters = [json.loads(m.value()) for m in _dead_letters(broker, topic, 2)]
    for letter, offset, payload in zip(letters, (4, 5), (bare, nested), strict=True):
        assert letter["schema"] == "streamstars-dead-letter/1"
        assert letter["error"]["reason"] == "malformed_event"
        assert "levels deep" in letter["error"]["message"]
        assert letter["source"]["topic"] == topic and letter["source"]["offset"] == offset
        assert letter["payload_bytes"] == len(payload)
        assert letter["payload_sha256"] == _sha256(payload)
        assert letter["payload_truncated"] is False
        assert letter["event_text"].encode() == payload
    _check_exactly_once(state, app_log, events, backfill_snapshot, tmp_path)


@pytest.mark.parametrize("limit", [None, 65536])
def test_large_events_get_dead_letters_that_fit(
    broker: TansuBroker, repo: Path, events: dict[int, VisitEvent], backfill_snapshot: Path,
    tmp_path: Path, limit: int | None,
) -> None:
    """Defect 4: a 900 kB non-UTF-8 event gave a dead letter (base64) larger than a message
    may be; its delivery was retried forever and the partition stalled.  Dead letters now fit
    the limit (``--dead-letter-max-bytes``, else the producer's message.max.bytes - 1 KiB):
    the payload is cut, its size and sha256 kept with the original offset."""
    topic = f"hostile-large-{limit or 'default'}"
    binary = bytes(range(256)) * 3515  # 899,840 bytes, not UTF-8
    escaped = b"\x01" * 900_000  # UTF-8, but 6 bytes per character as a JSON string
    good = _good(events)
    messages = [*good[:4], (b"hostile-1", binary), *good[4:6], (b"hostile-2", escaped),
                *good[6:]]
    _topic(broker, topic, messages)
    state, app_log = tmp_path / "state", tmp_path / "applications.jsonl"
    extra = ["--dead-letter-max-bytes", str(limit)] if limit else []
    consumer = Consumer(broker, topic, state, repo.parent, tmp_path, app_log,
                        "--exit-when-idle", "2", *extra)
    assert consumer.wait(120) == 0, consumer.text()

    raw = _dead_letters(broker, topic, 2)
    bound = limit or DEFAULT_DEAD_LETTER_LIMIT
    assert all(len(m.value()) <= bound for m in raw), [len(m.value()) for m in raw]
    first, second = (json.loads(m.value()) for m in raw)
    assert (first["source"]["offset"], second["source"]["offset"]) == (4, 7)
    assert first["source"]["key"] == "hostile-1" and raw[0].key() == b"hostile-1"
    for letter, payload in ((first, binary), (second, escaped)):
        assert letter["error"]["reason"] == "malformed_event"
        assert letter["source"]["topic"] == topic and letter["source"]["partition"] == 0
        assert letter["payload_truncated"] is True
        assert letter["payload_bytes"] == len(payload)
        assert letter["payload_sha256"] == _sha256(payload)
    kept = base64.b64decode(first["event_base64"])
    assert binary.startswith(kept) and len(kept) > bound // 2
    text = second["event_text"]
    assert escaped.startswith(text.encode()) and len(text) > bound // 8
    _check_exactly_once(state, app_log, events, backfill_snapshot, tmp_path)


def test_healthz_fails_while_a_dead_letter_cannot_be_delivered(
    broker: TansuBroker, repo: Path, events: dict[int, VisitEvent], backfill_snapshot: Path,
    tmp_path: Path,
) -> None:
    """Defect 4, health: while a message cannot be finished (here its dead letter cannot be
    delivered: the broker is frozen with SIGSTOP) for longer than ``--stall-seconds``,
    ``/healthz`` answers 503 with the reason and ``streamstars_progress_stalled`` is 1; once
    the broker answers again, the dead letter is delivered once and the consumer goes on."""
    topic = "hostile-stall"
    visits = sorted(events)
    missing = json.loads(events[visits[4]].to_json())
    missing["source_uris"] = [str(repo / "not-there-yet.parquet")]
    good = _good(events)
    messages = [*good[:4], (events[visits[4]].key, json.dumps(missing).encode()), *good[4:]]
    _topic(broker, topic, messages)
    state, app_log, port = tmp_path / "state", tmp_path / "applications.jsonl", free_port()
    consumer = Consumer(broker, topic, state, repo.parent, tmp_path, app_log,
                        "--exit-when-idle", "3", "--retry-max-seconds", "8",
                        "--stall-seconds", "12", "--metrics-port", str(port))
    assert broker.process is not None
    frozen = False
    try:
        # the missing file is retried for 7.5 s (attempts at 0, 0.5, 1.5, 3.5, 7.5 s): freeze
        # the broker meanwhile, so that its dead letter cannot be delivered
        wait_until(lambda: "transient error" in consumer.text(), 60, "the transient retries")
        assert http_get(port, "/healthz")[0] == 200
        broker.process.send_signal(signal.SIGSTOP)
        frozen = True
        wait_until(lambda: http_get(port, "/healthz")[0] == 503, 30, "/healthz to fail")
        status, body = http_get(port, "/healthz")
        assert status == 503 and "no progress" in body and f"{topic}[0]@4" in body, body
        assert "dead letter" in body, body
        assert "streamstars_progress_stalled 1.0" in http_get(port, "/metrics")[1]
    finally:
        if frozen:
            broker.process.send_signal(signal.SIGCONT)
    wait_until(lambda: http_get(port, "/healthz")[0] == 200, 60, "/healthz to recover")
    assert consumer.wait(120) == 0, consumer.text()

    letter = json.loads(_dead_letters(broker, topic, 1)[0].value())
    assert letter["error"]["reason"] == "transient_exhausted"
    assert letter["source"]["offset"] == 4 and letter["visit"] == visits[4]
    _check_exactly_once(state, app_log, events, backfill_snapshot, tmp_path)


def test_message_key_must_be_the_visit(
    broker: TansuBroker, repo: Path, events: dict[int, VisitEvent], backfill_snapshot: Path,
    tmp_path: Path,
) -> None:
    """Defect 16: the event contract keys every event by its visit id.  A message without a
    key (here a retract of an applied visit, and an apply), with another visit's key or with
    a non-canonical key is dead-lettered, not applied."""
    topic = "hostile-keys"
    visits = sorted(events)
    first, third = events[visits[0]], events[visits[2]]
    retract = json.dumps({"schema_version": 1, "action": "retract",
                          "visit": visits[0]}).encode()
    good = _good(events)
    messages = [
        *good[:2],
        (None, retract),                      # would remove visit 1 again
        (None, third.to_json()),
        (events[visits[1]].key, third.to_json()),
        (b"0" + third.key, third.to_json()),
        (first.key + b" ", retract),
        *good[2:],
    ]
    _topic(broker, topic, messages)
    state, app_log = tmp_path / "state", tmp_path / "applications.jsonl"
    consumer = Consumer(broker, topic, state, repo.parent, tmp_path, app_log,
                        "--exit-when-idle", "2")
    assert consumer.wait(120) == 0, consumer.text()

    letters = [json.loads(m.value()) for m in _dead_letters(broker, topic, 5)]
    assert [r["source"]["offset"] for r in letters] == [2, 3, 4, 5, 6]
    assert all(r["error"]["reason"] == "malformed_event" for r in letters)
    assert [r["source"]["key"] for r in letters[:2]] == [None, None]
    assert all("message has no key" in r["error"]["message"] for r in letters[:2])
    assert all("is not the visit id" in r["error"]["message"] for r in letters[2:])
    assert letters[0]["event"]["action"] == "retract"
    _check_exactly_once(state, app_log, events, backfill_snapshot, tmp_path)
