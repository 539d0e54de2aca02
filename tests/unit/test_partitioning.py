"""The publisher's key partitioning is the producer's own (G4: a cart's results share a
partition whoever publishes them: the fast path, a catch-up, the relay through `send`),
and its cheap size bound never lets through a message `send` would refuse."""

from __future__ import annotations

from aiokafka.partitioner import DefaultPartitioner, murmur2
from hypothesis import given
from hypothesis import strategies as st

from worker import partitioning
from worker.publisher import _FRAMING, _headers_size
from worker.results import message_bytes


@given(st.binary(max_size=700))
def test_murmur2_is_aiokafkas(data: bytes) -> None:
    assert partitioning.murmur2(data) == murmur2(data)


@given(st.binary(min_size=1, max_size=200), st.integers(min_value=1, max_value=300))
def test_a_key_goes_where_the_default_partitioner_sends_it(key: bytes, count: int) -> None:
    partitions = list(range(count))
    expected = DefaultPartitioner()(key, partitions, partitions)
    assert partitioning.partition_for(key, partitions) == expected


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
