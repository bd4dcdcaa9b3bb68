"""Consumer pieces that need no broker: client properties, metrics/health server, hooks."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from consumer_helpers import http_get
from crash_hooks import CrashHooks, hooks_env

from streamstars.consumers.dead_letters import (
    DEAD_LETTER_SCHEMA,
    MAX_ERROR_CHARS,
    MAX_KEY_BYTES,
    DeadLetter,
    build_dead_letter,
    dead_letter_limit,
    shrink_limit,
)
from streamstars.consumers.health import HealthState
from streamstars.consumers.hooks import ENV_HOOKS, NO_HOOKS, load_hooks
from streamstars.consumers.http_server import HealthServer
from streamstars.consumers.kafka_config import load_kafka_properties, redacted
from streamstars.consumers.metrics import ConsumerMetrics
from streamstars.consumers.options import parse_seek_offsets
from streamstars.errors import ConfigError


def test_kafka_properties_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "client.properties"
    path.write_text("# comment\n! other\n\nsecurity.protocol = SASL_SSL\n"
                    "sasl.password=s3cr=t\n")
    os.chmod(path, 0o644)
    settings = load_kafka_properties(path)
    assert settings == {"security.protocol": "SASL_SSL", "sasl.password": "s3cr=t"}
    assert "s3cr=t" not in redacted(settings)
    assert "chmod 600" in caplog.text and "s3cr=t" not in caplog.text
    path.write_text("sasl.password s3cret\n")
    with pytest.raises(ConfigError) as info:
        load_kafka_properties(path)
    assert "s3cret" not in str(info.value) and ":1:" in str(info.value)
    assert load_kafka_properties(None) == {}


def test_metrics_and_health_endpoints() -> None:
    metrics, health = ConsumerMetrics(), HealthState()
    server = HealthServer(metrics, health, "127.0.0.1", 0)
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        metrics.applied.labels("apply").inc(3)
        metrics.lag.labels("visits", "0").set(5)
        body = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
        assert 'streamstars_visits_applied_total{action="apply"} 3.0' in body
        assert 'streamstars_consumer_lag{partition="0",topic="visits"} 5.0' in body
        assert "streamstars_snapshot_age_seconds -1.0" in body
        assert urllib.request.urlopen(base + "/healthz", timeout=5).status == 200
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(base + "/readyz", timeout=5)
        assert info.value.code == 503
        health.set_ready(True, "consuming")
        assert urllib.request.urlopen(base + "/readyz", timeout=5).status == 200
        assert server.server.server_address[0] == "127.0.0.1"
    finally:
        server.stop()


def test_fault_plan_parsing_and_inert_default(tmp_path: Path) -> None:
    faults = CrashHooks("after_lmdb_commit:3,during_apply:2:15", str(tmp_path / "log"))
    assert faults.plan == {"after_lmdb_commit": (3, 0.0), "during_apply": (2, 15.0)}
    faults.point("after_lmdb_commit")  # 1st and 2nd time: not due
    faults.point("after_lmdb_commit")
    faults.point("before_apply")  # not planned
    inert = CrashHooks("", "")
    assert not inert.active
    inert.record_application(1, "applied", 2)  # no log configured: nothing happens
    faults.record_application(7, "applied", 3)
    faults.record_application(7, "skipped", 4)
    assert (tmp_path / "log").read_text().count('"visit": 7') == 1


def test_hooks_are_loaded_only_when_named(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Production consumers get the no-op hooks; a test names a module that provides its own;
    a name that cannot be loaded is a setting error (exit code 2 of ``run``)."""
    assert load_hooks({}) is NO_HOOKS and load_hooks({ENV_HOOKS: " "}) is NO_HOOKS
    env = hooks_env(tmp_path / "log", "before_apply:2")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    hooks = load_hooks()
    assert isinstance(hooks, CrashHooks) and hooks.plan == {"before_apply": (2, 0.0)}
    assert hooks.log_path == str(tmp_path / "log")
    for bad in ("no_such_module_here", "json"):  # missing; no consumer_hooks()
        with pytest.raises(ConfigError, match=ENV_HOOKS):
            load_hooks({ENV_HOOKS: bad})


def test_seek_offsets() -> None:
    assert parse_seek_offsets(["0:12", "3:0"]) == {0: 12, 3: 0}
    with pytest.raises(ValueError, match="PARTITION:OFFSET"):
        parse_seek_offsets(["zero"])


def _letter(value: bytes | None, max_bytes: int, key: bytes | None = b"7",
            message: str = "boom") -> tuple[DeadLetter, dict[str, Any]]:
    letter = build_dead_letter(
        source={"topic": "visits", "partition": 2, "offset": 41, "timestamp_ms": 5},
        key=key, value=value, visit=None, action=None,
        error={"type": "MalformedEventError", "reason": "malformed_event", "message": message,
               "permanent": True, "attempts": 1},
        consumer={"group": "g", "host": "h", "pid": 1, "version": "0"},
        dead_lettered_at="2025-06-02T03:16:04.512Z", max_bytes=max_bytes,
    )
    return letter, json.loads(letter.value)


@pytest.mark.parametrize("max_bytes", [8192, 65536, 998976])
def test_dead_letters_fit_their_limit(max_bytes: int) -> None:
    binary = bytes(range(256)) * 4000  # 1 MB, not UTF-8
    escaped = "\x01é😀" * 200_000  # every character needs a JSON escape
    for payload in (binary, escaped.encode()):
        letter, record = _letter(payload, max_bytes, message="m" * 100_000)
        assert len(letter.value) <= max_bytes and letter.truncated
        assert record["payload_truncated"] is True
        assert record["payload_bytes"] == len(payload)
        assert record["payload_sha256"] == hashlib.sha256(payload).hexdigest()
        assert record["source"] == {"topic": "visits", "partition": 2, "offset": 41,
                                    "timestamp_ms": 5, "key": "7"}
        assert record["error"]["message"].endswith(f"[{100_000 - MAX_ERROR_CHARS} more "
                                                   "characters]")
        if payload is binary:
            kept = base64.b64decode(record["event_base64"])
        else:
            kept = record["event_text"].encode()
        assert payload.startswith(kept) and len(kept) > 0
        # the kept prefix uses the room left: one more unit would not fit
        assert len(letter.value) > max_bytes - 64


def test_dead_letter_keeps_a_small_event_whole() -> None:
    event = {"schema_version": 1, "action": "retract", "visit": 7}
    letter, record = _letter(json.dumps(event).encode(), 8192)
    assert not letter.truncated and record["event"] == event and letter.key == b"7"
    assert record["schema"] == DEAD_LETTER_SCHEMA and record["payload_truncated"] is False
    _, record = _letter(b"\xff\xfe", 8192, key=None)
    assert record["event_base64"] == "//4=" and record["source"]["key"] is None
    _, record = _letter(None, 8192)  # tombstone
    assert record["event_text"] == "" and record["payload_bytes"] == 0
    # a key longer than MAX_KEY_BYTES is shown shortened and not reused
    long_key = b"k" * (MAX_KEY_BYTES + 1)
    letter, record = _letter(b"{}", 8192, key=long_key)
    assert letter.key is None and record["source"]["key"] == "k" * MAX_KEY_BYTES
    assert record["source"]["key_bytes"] == MAX_KEY_BYTES + 1
    assert record["source"]["key_sha256"] == hashlib.sha256(long_key).hexdigest()


def test_dead_letter_limit_from_the_producer_settings() -> None:
    assert dead_letter_limit({}, None) == 1_000_000 - 1024
    assert dead_letter_limit({"message.max.bytes": "200000"}, None) == 200_000 - 1024
    assert dead_letter_limit({"message.max.bytes": "200000"}, 65536) == 65536
    assert dead_letter_limit({}, 5_000_000) == 1_000_000 - 1024  # never above the producer's
    with pytest.raises(ConfigError, match="at least 8192"):
        dead_letter_limit({"message.max.bytes": "5000"}, None)
    with pytest.raises(ConfigError, match="message.max.bytes"):
        dead_letter_limit({"message.max.bytes": "lots"}, None)
    # after a broker refusal: half of what was refused, down to a floor
    assert shrink_limit(998976, 998000) == 499000
    assert shrink_limit(3000, 2500) == 2048
    assert shrink_limit(2048, 2048) is None


def test_healthz_fails_when_a_message_is_stuck() -> None:
    metrics, health = ConsumerMetrics(), HealthState(stall_seconds=0.3)
    metrics.track(health)
    server = HealthServer(metrics, health, "127.0.0.1", 0)
    server.start()

    try:
        health.begin("visits[0]@4")
        assert http_get(server.port, "/healthz")[0] == 200
        health.waiting_for("dead-letter delivery to visits.dead-letters failing for 3 s: x")
        time.sleep(0.4)
        status, body = http_get(server.port, "/healthz")
        assert status == 503
        assert body.startswith("no progress: visits[0]@4 in flight for 0 s (threshold 0.3 s)")
        assert "dead-letter delivery" in body
        scrape = http_get(server.port, "/metrics")[1]
        assert "streamstars_progress_stalled 1.0" in scrape
        in_flight = [line for line in scrape.splitlines()
                     if line.startswith("streamstars_message_in_flight_seconds ")]
        assert float(in_flight[0].split()[1]) >= 0.4
        health.end()
        assert http_get(server.port, "/healthz") == (200, "ok\n")
        assert "streamstars_progress_stalled 0.0" in http_get(server.port, "/metrics")[1]
        time.sleep(0.4)  # nothing in flight and the main loop not turning: stalled too
        assert http_get(server.port, "/healthz")[1].startswith("main loop stalled")
    finally:
        server.stop()


def test_read_ahead_reads_only_what_applying_would_read(tmp_path: Path) -> None:
    """The read-ahead prepares the visits applying will read: not a retraction, nor an event
    its ``needs_reading`` refuses (a Butler event naming the datasets its visit was applied
    from, ``ConsumerStore.applied_from``)."""
    from confluent_kafka import Message

    from streamstars.config import BuildStarsConfig
    from streamstars.consumers.kafka_client import position_of
    from streamstars.consumers.prepare import EventPreparer
    from streamstars.consumers.read_ahead import ReadAhead
    from streamstars.events import VisitEvent

    def event(visit: int, action: str = "apply") -> VisitEvent:
        # files that do not exist: preparing the visit fails (counted as "failed")
        return VisitEvent(action=action, visit=visit,  # type: ignore[arg-type]
                          instrument="LSSTCam", band="r", physical_filter="r_57",
                          source_uris=(str(tmp_path / f"{visit}.parquet"),),
                          metadata_uri=str(tmp_path / f"{visit}.fits"),
                          finished_at="2024-12-02T03:14:15Z")

    events = [event(7), event(8), event(9, "retract")]
    messages = [Message(topic="visits", partition=0, offset=k, key=e.key, value=e.to_json())
                for k, e in enumerate(events)]
    metrics = ConsumerMetrics()
    preparer = EventPreparer([tmp_path])
    ahead = ReadAhead(3, lambda e: preparer.prepare(e, BuildStarsConfig()), metrics,
                      needs_reading=lambda e, _p: e.action != "retract" and e.visit != 8)
    ahead.start()
    try:
        ahead.submit(messages)
        for msg, e in zip(messages, events, strict=True):
            assert ahead.event(position_of(msg)) == e
            assert ahead.take(position_of(msg), e) is None
    finally:
        ahead.close()
    counted = metrics.registry.get_sample_value
    assert counted("streamstars_visits_read_ahead_total", {"outcome": "failed"}) == 1  # visit 7
    assert not counted("streamstars_visits_read_ahead_total", {"outcome": "used"})


class _Message:
    """What the runner reads of a Kafka message (a real one needs a broker)."""

    def __init__(self, topic: str, partition: int, offset: int) -> None:
        self._where = (topic, partition, offset)

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return self._where[0]

    def partition(self) -> int:
        return self._where[1]

    def offset(self) -> int:
        return self._where[2]

    def value(self) -> bytes:
        return b"{}"

    def key(self) -> bytes:
        return b"64/1"


def test_an_event_of_a_partition_no_longer_assigned_is_not_applied(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A batch fetched before a rebalance may still hold messages of a partition this consumer
    lost (a stale assignment): they are neither applied nor committed — the partition's new
    owner consumes them — and counted as skipped (``stale_assignment``)."""
    from streamstars.consumers.options import RunOptions
    from streamstars.consumers.runner import Runner

    runner = Runner(RunOptions(bootstrap="127.0.0.1:9", topic="t", state=tmp_path / "S"))
    handled: list[int] = []
    runner.handle_message = lambda msg: handled.append(msg.partition())  # type: ignore[method-assign]
    runner.kafka.assigned = {0}
    batch: list[Any] = [_Message("t", 1, 5), _Message("t", 0, 7), _Message("t", 1, 6)]
    with caplog.at_level("WARNING", logger="streamstars.run"):
        assert runner._handle_batch(batch) is None
    assert handled == [0]
    assert sum("partition 1 is not assigned to this consumer" in r.getMessage()
               for r in caplog.records) == 2
    skipped = runner.metrics.skipped.labels(reason="stale_assignment")._value.get()
    assert skipped == 2
