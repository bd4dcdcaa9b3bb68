"""Kafka's Java default partitioner: murmur2 of the key, positive, modulo the partitions."""

from __future__ import annotations

import pytest

from streamstars.consumers.partitioner import kafka_partition, murmur2, shard_partition

#: Kafka's own test vectors: apache/kafka
#: ``clients/src/test/java/org/apache/kafka/common/utils/UtilsTest.java``, ``testMurmur2``
#: (Java ``int`` results of ``Utils.murmur2``).
JAVA_MURMUR2 = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}

#: librdkafka's vectors for its Java-compatible ``murmur2`` partitioner: confluentinc/librdkafka
#: ``src/rdmurmur2.c``, ``unittest_murmur2`` (``java_murmur2_results``, the Java ``int`` as
#: 32-bit hex; keys of every length modulo 4, the empty key).
LIBRDKAFKA_MURMUR2 = {
    b"kafka": 0xD067CF64,
    b"giberish123456789": 0x8F552B0C,
    b"1234": 0x9FC97B14,
    b"234": 0xE7C009CA,
    b"34": 0x873930DA,
    b"4": 0x5A4B5CA1,
    b"PreAmbleWillBeRemoved,ThePrePartThatIs": 0x78424F1C,
    b"reAmbleWillBeRemoved,ThePrePartThatIs": 0x4A62B377,
    b"eAmbleWillBeRemoved,ThePrePartThatIs": 0xE0E4E09E,
    b"AmbleWillBeRemoved,ThePrePartThatIs": 0x62B8B43F,
    b"": 0x106E08D9,
}


@pytest.mark.parametrize(("key", "expected"), sorted(JAVA_MURMUR2.items()))
def test_murmur2_equals_kafkas_java_values(key: bytes, expected: int) -> None:
    assert murmur2(key) == expected


@pytest.mark.parametrize(("key", "expected"), sorted(LIBRDKAFKA_MURMUR2.items()))
def test_murmur2_equals_librdkafkas_values(key: bytes, expected: int) -> None:
    assert murmur2(key) & 0xFFFFFFFF == expected
    assert -(1 << 31) <= murmur2(key) < (1 << 31)  # a Java int


def test_partition_is_the_positive_hash_modulo_the_partitions() -> None:
    # -973932308 & 0x7fffffff = 1173551340; "abc" hashes positive
    assert kafka_partition(b"21", 7) == 1173551340 % 7
    assert kafka_partition(b"abc", 10) == 479470107 % 10
    assert kafka_partition(b"", 3) == (murmur2(b"") & 0x7FFFFFFF) % 3
    assert {kafka_partition(b"32/%d" % p, 1) for p in range(100)} == {0}
    assert shard_partition(32, 1234, 8) == kafka_partition(b"32/1234", 8)
    # every tail length (0..3 bytes after the 4-byte blocks) and every partition is reached
    spread = {kafka_partition(b"32/%d" % p, 16) for p in range(12 * 32 * 32)}
    assert spread == set(range(16))
    with pytest.raises(ValueError, match="at least one partition"):
        kafka_partition(b"1", 0)
