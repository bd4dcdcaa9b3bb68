"""Which partition a keyed message goes to: Kafka's Java default partitioner.

The Java producer puts a message with a key on partition
``toPositive(murmur2(key)) % partitions`` (``toPositive(x) = x & 0x7fffffff``;
``Utils.murmur2`` is MurmurHash2, 32 bits, seed ``0x9747b28c``); librdkafka's ``murmur2``
and ``murmur2_random`` partitioners do the same.  The publisher of version-3 events chooses the
partition of every (visit, shard) event this way itself, so the partition of a shard
(:func:`shard_partition`) is a function anyone can compute -- consumers, operators, another
client -- and agrees with what any Java-compatible producer would choose for the same key.
"""

from __future__ import annotations

from streamstars.events import shard_key

__all__ = ["kafka_partition", "murmur2", "shard_partition"]

_MASK = 0xFFFFFFFF
_SEED = 0x9747B28C
_M = 0x5BD1E995
_R = 24


def murmur2(data: bytes) -> int:
    """Kafka's ``Utils.murmur2`` of ``data``: MurmurHash2 (32 bits, seed ``0x9747b28c``),
    returned as Java's signed 32-bit ``int``."""
    length = len(data)
    h = (_SEED ^ length) & _MASK
    whole = length - length % 4
    for i in range(0, whole, 4):
        k = int.from_bytes(data[i:i + 4], "little")
        k = (k * _M) & _MASK
        k ^= k >> _R
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    tail = data[whole:]
    if tail:
        h ^= int.from_bytes(tail, "little")
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def kafka_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's Java default partitioner gives a message with ``key`` on a topic
    of ``partitions`` partitions: ``(murmur2(key) & 0x7fffffff) % partitions``.

    Raises:
        ValueError: ``partitions`` < 1.
    """
    if partitions < 1:
        raise ValueError(f"a topic has at least one partition, got {partitions}")
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def shard_partition(nside: int, pixel: int, partitions: int) -> int:
    """The partition of the events of shard ``pixel`` at ``nside`` (key ``b"nside/pixel"``)
    on a topic of ``partitions`` partitions."""
    return kafka_partition(shard_key(nside, pixel), partitions)
