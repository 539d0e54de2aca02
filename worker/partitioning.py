"""The producer's key partitioning, computed faster than aiokafka computes it.

aiokafka's `DefaultPartitioner` (the Java client's): murmur2 of the key, its sign bit
cleared, modulo the number of partitions, indexing the partitions sorted by id. Its
murmur2 is pure Python, byte by byte; this one reads the key's 32-bit words in one
`struct` call. tests/unit/test_partitioning.py checks both agree on arbitrary keys.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

# Compiled structs and lane masks per word count of the usual key lengths (a cartId is at
# most 128 characters, up to 512 bytes of UTF-8).
_WORDS = [struct.Struct(f"<{n}I") for n in range(129)]
_LANES = [struct.Struct(f"<{n}Q") for n in range(129)]
_LANE_MASKS = [int.from_bytes(b"\xff\xff\xff\xff\0\0\0\0" * n, "little") for n in range(129)]


def murmur2(
    data: bytes,
    _words: list[struct.Struct] = _WORDS,
    _lanes: list[struct.Struct] = _LANES,
    _masks: list[int] = _LANE_MASKS,
    m: int = 0x5BD1E995,
    mask: int = 0xFFFFFFFF,
) -> int:
    """MurmurHash2 of `data`, as `aiokafka.partitioner.murmur2` (Kafka's `Utils.murmur2`).

    A key's words are mixed (`k *= m; k ^= k >> 24; k *= m`, modulo 2**32) all at once: each
    32-bit word in its own 64-bit lane of one integer, so one multiplication by m (below
    2**31) mixes every lane without carrying into the next, and masking each lane to its
    low 32 bits is the modulo (what `k >> 24` shifts in from the next lane is masked off).
    Only the chain through h is word by word."""
    length = len(data)
    h = 0x9747B28C ^ length
    words = length >> 2
    if words:
        if words < len(_words):
            layout, lanes, lane_mask = _words[words], _lanes[words], _masks[words]
        else:
            layout, lanes = struct.Struct(f"<{words}I"), struct.Struct(f"<{words}Q")
            lane_mask = int.from_bytes(b"\xff\xff\xff\xff\0\0\0\0" * words, "little")
        x = (int.from_bytes(lanes.pack(*layout.unpack_from(data)), "little") * m) & lane_mask
        x = (((x ^ (x >> 24)) & lane_mask) * m) & lane_mask
        for k in lanes.unpack(x.to_bytes(8 * words, "little")):
            h = ((h * m) ^ k) & mask
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


def murmur2_many(keys: Sequence[bytes], m: int = 0x5BD1E995) -> list[int]:
    """`murmur2` of each key, computed for all keys of a length at once.

    Python's integers make one murmur2 of a cartId cost ~30,000-40,000 instructions (every
    product of two 32-bit numbers is a multi-digit integer); a batch of results has a key
    per record. Keys of one length go through the same steps, so each key gets a 64-bit
    lane of one integer, and each step of murmur2 is done once for all of them: a product
    of a lane (below 2**32) and m (below 2**31) stays below 2**63, so it never carries into
    the next lane, and masking every lane to its low 32 bits is the modulo (what a right
    shift brings in from the next lane is masked off too). tests/unit/test_partitioning.py
    holds it to aiokafka's murmur2 on keys of mixed lengths."""
    by_length: dict[int, list[int]] = {}
    for n, key in enumerate(keys):
        by_length.setdefault(len(key), []).append(n)
    hashes = [0] * len(keys)
    for length, indexes in by_length.items():
        count = len(indexes)
        lane = struct.Struct(f"<{count}Q")
        ones = int.from_bytes(b"\x01\0\0\0\0\0\0\0" * count, "little")
        mask = 0xFFFFFFFF * ones  # each lane's low 32 bits
        h = (0x9747B28C ^ length) * ones
        group = [keys[n] for n in indexes]
        words = length >> 2
        if words:
            # The keys' words, key after key: word j of every key is every `words`-th value.
            flat = struct.unpack(f"<{count * words}I", b"".join(k[: words * 4] for k in group))
            for j in range(words):
                k = (int.from_bytes(lane.pack(*flat[j::words]), "little") * m) & mask
                k = (((k ^ (k >> 24)) & mask) * m) & mask
                h = ((h * m) ^ k) & mask
        tail = length & 3
        if tail:
            end = length & ~3
            h ^= int.from_bytes(
                lane.pack(*[int.from_bytes(k[end:], "little") for k in group]), "little"
            )
            h = (h * m) & mask
        h = (h ^ (h >> 13)) & mask
        h = (h * m) & mask
        h = (h ^ (h >> 15)) & mask
        for n, value in zip(indexes, lane.unpack(h.to_bytes(8 * count, "little")), strict=True):
            hashes[n] = value
    return hashes


def partition_for(key: bytes, partitions: Sequence[int]) -> int:
    """The partition the producer's default partitioner gives `key` among `partitions`
    (sorted by id, every partition of the topic)."""
    return partition_of(murmur2(key), partitions)


def partition_of(key_hash: int, partitions: Sequence[int]) -> int:
    """`partition_for` of the key whose `murmur2` is `key_hash` (from `murmur2_many`)."""
    return partitions[(key_hash & 0x7FFFFFFF) % len(partitions)]
