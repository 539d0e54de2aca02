"""The producer's key partitioning, computed faster than aiokafka computes it.

aiokafka's `DefaultPartitioner` (the Java client's): murmur2 of the key, its sign bit
cleared, modulo the number of partitions, indexing the partitions sorted by id. Its
murmur2 is pure Python, byte by byte; this one reads the key's 32-bit words in one
`struct` call. tests/unit/test_partitioning.py checks both agree on arbitrary keys.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

# One compiled struct per word count of the usual key lengths (a cartId is at most 128
# characters, up to 512 bytes of UTF-8).
_WORDS = [struct.Struct(f"<{n}I") for n in range(129)]


def murmur2(
    data: bytes, _words: list[struct.Struct] = _WORDS, m: int = 0x5BD1E995, mask: int = 0xFFFFFFFF
) -> int:
    """MurmurHash2 of `data`, as `aiokafka.partitioner.murmur2` (Kafka's `Utils.murmur2`)."""
    length = len(data)
    h = 0x9747B28C ^ length
    words = length >> 2
    layout = _words[words] if words < len(_words) else struct.Struct(f"<{words}I")
    for k in layout.unpack_from(data):
        k = (k * m) & mask
        h = ((h * m) & mask) ^ (((k ^ (k >> 24)) * m) & mask)
    tail = length & 3
    if tail:
        end = length & ~3
        if tail == 3:
            h ^= data[end + 2] << 16
        if tail >= 2:
            h ^= data[end + 1] << 8
        h = ((h ^ data[end]) * m) & mask
    h ^= h >> 13
    h = (h * m) & mask
    return h ^ (h >> 15)


def partition_for(key: bytes, partitions: Sequence[int]) -> int:
    """The partition the producer's default partitioner gives `key` among `partitions`
    (sorted by id, every partition of the topic)."""
    return partitions[(murmur2(key) & 0x7FFFFFFF) % len(partitions)]
