"""Reading a topic back from its start (no group, nothing committed): how the demo, the
bench and the tests read the worker's results."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition


class TopicReader:
    """Every partition of one topic, assigned and positioned at its beginning."""

    def __init__(self, consumer: AIOKafkaConsumer, partitions: list[TopicPartition]) -> None:
        self._consumer = consumer
        self._partitions = partitions

    async def batch(
        self, timeout_ms: int = 200, max_records: int | None = None
    ) -> list[ConsumerRecord]:
        """The records that arrived next, from every partition (none after `timeout_ms`)."""
        batch = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        return list(itertools.chain.from_iterable(batch.values()))

    async def at_end(self) -> bool:
        """Whether every partition was read up to its high-water mark (the last fetch's)."""
        for tp in self._partitions:
            high = self._consumer.highwater(tp)
            if high is None or await self._consumer.position(tp) < high:
                return False
        return True


@asynccontextmanager
async def reading(
    bootstrap: str, topic: str, partitions: int | None = None, **options: Any
) -> AsyncIterator[TopicReader]:
    """A reader of `topic` from its start: partitions 0..`partitions`-1, or all the broker
    lists. `options` go to the `AIOKafkaConsumer` (fetch sizes, waits)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, **options)
    await consumer.start()
    try:
        if partitions is None:
            numbers = await _partitions(consumer, topic)
        else:
            numbers = list(range(partitions))
        tps = [TopicPartition(topic, p) for p in numbers]
        consumer.assign(tps)
        await consumer.seek_to_beginning()
        yield TopicReader(consumer, tps)
    finally:
        await consumer.stop()


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> list[int]:
    for _ in range(50):
        found = consumer.partitions_for_topic(topic)
        if found:
            return sorted(found)
        await consumer.topics()
        await asyncio.sleep(0.1)
    raise RuntimeError(f"topic {topic} has no partitions")
