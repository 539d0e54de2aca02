"""`ReleaseConsumer` over a fake Kafka source, a recording processor and publisher."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

from aiokafka.structs import TopicPartition

from tests.unit.fake_source import FakeRecord, FakeSource
from worker.config import Settings
from worker.consumer import ReleaseConsumer
from worker.records import OutboxMessage, RawRecord
from worker.release import BatchReport

TOPIC = "cart.abandoned"


class RecordingProcessor:
    """Commits every batch at once; remembers what it was given."""

    def __init__(self) -> None:
        self.records: list[RawRecord] = []

    async def process(self, records: Sequence[RawRecord]) -> BatchReport:
        self.records.extend(records)
        report = BatchReport(records=len(records))
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            report.next_offsets[tp] = max(report.next_offsets.get(tp, 0), r.offset + 1)
        return report


class NullPublisher:
    async def publish(self, messages: Sequence[OutboxMessage]) -> None:
        pass

    async def flush(self, timeout_s: float) -> None:
        pass


def _settings(**overrides: object) -> Settings:
    values: dict[str, object] = {"lanes": 2, "batch_max_records": 10, "commit_interval_ms": 10}
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


async def _no_stored_offsets(topic: str) -> Mapping[int, int]:
    return {}


def _consumer(source: FakeSource, **settings: object) -> tuple[ReleaseConsumer, RecordingProcessor]:
    processor = RecordingProcessor()
    consumer = ReleaseConsumer(
        source, processor, NullPublisher(), _settings(**settings), _no_stored_offsets
    )
    return consumer, processor


def _records(partition: int, offsets: Sequence[int], bad: int | None = None) -> list[FakeRecord]:
    return [FakeRecord(TOPIC, partition, o, unreadable=o == bad) for o in offsets]


async def test_stop_ends_run_while_the_fetch_waits_for_a_rebalance() -> None:
    source = FakeSource(TOPIC)
    source.append(0, _records(0, range(5)))
    consumer, processor = _consumer(source)
    await consumer.on_assigned(source.assign({0}))
    source.rebalancing = True  # getmany now waits for the next assignment, without end
    running = asyncio.create_task(consumer.run())
    await source.fetching.wait()
    consumer.stop()
    async with asyncio.timeout(5):
        await running
    assert processor.records == []
