"""The tansu test broker works: produce/consume, fast group join, restart."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from kafka_broker import FAST_CONSUMER_CONFIG, TansuBroker


@pytest.mark.kafka  # starts its own broker
def test_produce_consume_and_fast_group_join(tmp_path: Path) -> None:
    from confluent_kafka import Consumer, TopicPartition

    with TansuBroker.start(log_path=tmp_path / "tansu.log") as broker:
        broker.create_topic("t", partitions=2)
        broker.produce("t", [(str(i).encode(), f"v{i}".encode()) for i in range(10)])
        consumer = Consumer(
            {
                "bootstrap.servers": broker.bootstrap,
                "group.id": "g",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                **FAST_CONSUMER_CONFIG,
            }
        )
        start = time.monotonic()
        consumer.subscribe(["t"])
        got = []
        while len(got) < 10 and time.monotonic() - start < 20:
            msg = consumer.poll(0.2)
            if msg is not None and not msg.error():
                got.append(msg)
                consumer.commit(msg, asynchronous=False)
        elapsed = time.monotonic() - start
        committed = consumer.committed([TopicPartition("t", 0), TopicPartition("t", 1)], 5)
        consumer.close()
        assert sorted(m.value() for m in got) == sorted(f"v{i}".encode() for i in range(10))
        assert elapsed < 8, f"group join too slow: {elapsed:.1f} s"
        assert sum(tp.offset for tp in committed) == 10

        # A restarted broker answers again on the same port (with empty in-memory storage).
        broker.restart()
        broker.create_topic("t", partitions=1)
        broker.produce("t", [(b"k", b"after-restart")])
        assert [m.value() for m in broker.consume_all("t", 1)] == [b"after-restart"]
