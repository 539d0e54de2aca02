"""The publisher's key partitioning is the producer's own (G4: a cart's results share a
partition whoever publishes them: the fast path, a catch-up, the relay through `send`),
and its cheap size bound never lets through a message `send` would refuse."""

from __future__ import annotations

import asyncio
import random

from aiokafka.partitioner import DefaultPartitioner, murmur2
from hypothesis import given
from hypothesis import strategies as st

from worker import partitioning
from worker.publisher import _FRAMING, Publisher, _headers_size
from worker.records import OutboxMessage
from worker.results import message_bytes


@given(st.binary(max_size=700))
def test_murmur2_is_aiokafkas(data: bytes) -> None:
    assert partitioning.murmur2(data) == murmur2(data)


@given(st.binary(min_size=1, max_size=200), st.integers(min_value=1, max_value=300))
def test_a_key_goes_where_the_default_partitioner_sends_it(key: bytes, count: int) -> None:
    partitions = list(range(count))
    expected = DefaultPartitioner()(key, partitions, partitions)
    assert partitioning.partition_for(key, partitions) == expected


def test_murmur2_is_aiokafkas_at_every_length() -> None:
    # Every tail and word count, past the precompiled layouts (128 words) too, with the
    # words' high bits set (the lanes' multiplications must not carry into each other).
    rng = random.Random(13)
    for length in range(0, 1100):
        for data in (rng.randbytes(length), b"\xff" * length):
            assert partitioning.murmur2(data) == murmur2(data)


def test_known_values_of_kafkas_murmur2() -> None:
    # Kafka's own test vectors (clients' UtilsTest.testMurmur2), as signed ints there.
    vectors = {b"21": -973932308, b"foobar": -790332482, b"a-little-bit-long-string": -985981536}
    for data, signed in vectors.items():
        assert partitioning.murmur2(data) == signed & 0xFFFFFFFF


@given(
    st.none() | st.binary(max_size=300),
    st.none() | st.binary(max_size=300),
    st.lists(st.tuples(st.text(max_size=20), st.none() | st.binary(max_size=200)), max_size=8),
)
def test_the_publishers_size_bound_is_never_below_aiokafkas_estimate(
    key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes | None]]
) -> None:
    # A message within the bound skips the estimate (`Publisher._hand_over`): the bound
    # must not let through one that `send` would refuse as over `max_request_size`.
    bound = len(value or b"") + len(key or b"") + _headers_size(headers) + _FRAMING
    assert bound >= message_bytes(key, value, tuple(headers))


@given(st.lists(st.binary(max_size=80) | st.sampled_from([b"", b"a", b"cart-1", b"\xff" * 41])))
def test_murmur2_many_is_aiokafkas_on_keys_of_mixed_lengths(keys: list[bytes]) -> None:
    assert partitioning.murmur2_many(keys) == [murmur2(k) for k in keys]


def test_murmur2_many_on_a_batch_of_long_and_repeated_keys() -> None:
    rng = random.Random(7)
    keys = [rng.randbytes(rng.choice([0, 3, 36, 41, 600])) for _ in range(2000)]
    keys += [b"\xff" * n for n in range(40)] + keys[:50]
    assert partitioning.murmur2_many(keys) == [murmur2(k) for k in keys]


class _Producer:
    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts

    async def partitions_for(self, topic: str) -> set[int]:
        return set(range(self.counts[topic]))


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["results", "dlq"]),
            st.none() | st.sampled_from([b"", b"c1", b"c2", b"cart-3"]) | st.binary(max_size=50),
            st.integers(1, 3),
        ),
        max_size=30,
    ),
    st.integers(1, 40),
    st.integers(1, 7),
)
def test_the_publishers_partitions_are_the_default_partitioners(
    records: list[tuple[str, bytes | None, int]], results: int, dlq: int
) -> None:
    """`Publisher._partitions` (murmur2 for all keys at once, a record's items following one
    another with one key object) puts every keyed message where aiokafka's partitioner would."""
    messages = [
        OutboxMessage(topic, key, b"v")
        for topic, key, items in records
        for _ in range(items)  # a record's items share one key object
    ]
    publisher = object.__new__(Publisher)
    publisher._producer = _Producer({"results": results, "dlq": dlq})  # type: ignore[assignment]
    got = asyncio.run(publisher._partitions(messages))
    partitioner = DefaultPartitioner()
    for m, partition in zip(messages, got, strict=True):
        if m.key is None:
            assert partition is None
        else:
            ids = list(range(results if m.topic == "results" else dlq))
            assert partition == partitioner(m.key, ids, ids)
