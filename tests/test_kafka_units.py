"""Consumer pieces that need no broker: client properties, metrics/health server, faults."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from streamstars.consumers.faults import Faults
from streamstars.consumers.kafka_config import load_kafka_properties, redacted
from streamstars.consumers.metrics import ConsumerMetrics, HealthServer, HealthState
from streamstars.consumers.runner import parse_seek_offsets
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
    faults = Faults("after_lmdb_commit:3,during_apply:2:15", str(tmp_path / "log"))
    assert faults.plan == {"after_lmdb_commit": (3, 0.0), "during_apply": (2, 15.0)}
    faults.point("after_lmdb_commit")  # 1st and 2nd time: not due
    faults.point("after_lmdb_commit")
    faults.point("before_apply")  # not planned
    inert = Faults("", "")
    assert not inert.active
    inert.record_application(1, "applied", 2)  # no log configured: nothing happens
    faults.record_application(7, "applied", 3)
    faults.record_application(7, "skipped", 4)
    assert (tmp_path / "log").read_text().count('"visit": 7') == 1


def test_seek_offsets() -> None:
    assert parse_seek_offsets(["0:12", "3:0"]) == {0: 12, 3: 0}
    with pytest.raises(ValueError, match="PARTITION:OFFSET"):
        parse_seek_offsets(["zero"])
