"""`ReleaseConsumer` over a fake Kafka source, a recording processor and publisher."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace

from aiokafka.structs import TopicPartition

from tests.unit.fake_source import FakeRecord, FakeSource
from worker.config import Settings
from worker.consumer import Lane, ReleaseConsumer
from worker.records import OutboxMessage, Publication, RawRecord
from worker.release import BatchReport

TOPIC = "cart.abandoned"


class RecordingProcessor:
    """Commits every batch at once; remembers what it was given."""

    def __init__(self) -> None:
        self.records: list[RawRecord] = []
        self.reached: dict[int, asyncio.Event] = {}  # next offset -> set once committed

    async def process(self, records: Sequence[RawRecord]) -> BatchReport:
        self.records.extend(records)
        report = BatchReport(records=len(records))
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            report.next_offsets[tp] = max(report.next_offsets.get(tp, 0), r.next_offset)
            self.reached.setdefault(r.next_offset, asyncio.Event()).set()
        return report

    def seen(self) -> list[tuple[int, int, bool]]:
        """(offset, next offset, unreadable) of every record, in the order processed."""
        return [(r.offset, r.next_offset, r.unreadable) for r in self.records]


class NullPublisher:
    async def publish(self, messages: Sequence[OutboxMessage]) -> None:
        pass

    async def publish_fresh(self, publications: Sequence[Publication]) -> None:
        pass

    async def flush(self, timeout_s: float) -> None:
        pass

    async def recover(self, partitions: Sequence[tuple[str, int]], timeout_s: float) -> None:
        pass

    async def release(self, partitions: Sequence[tuple[str, int]], timeout_s: float) -> None:
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
    async with consuming(consumer):
        await source.fetching.wait()
    assert processor.records == []


@asynccontextmanager
async def consuming(consumer: ReleaseConsumer) -> AsyncIterator[None]:
    """Run the consumer for the block; then stop it, which must end `run()` within 5 s."""
    running = asyncio.create_task(consumer.run())
    try:
        yield
    finally:
        consumer.stop()
        async with asyncio.timeout(5):
            await running


async def _consume_up_to(source: FakeSource, next_offset: int) -> RecordingProcessor:
    consumer, processor = _consumer(source)
    await consumer.on_assigned(source.assign({0}))
    reached = processor.reached.setdefault(next_offset, asyncio.Event())
    async with consuming(consumer):
        async with asyncio.timeout(10):
            await reached.wait()
    return processor


async def test_an_unreadable_record_after_a_gap_is_dead_lettered_once() -> None:
    # Offsets 3 and 4 are gone (a transaction marker, compaction); 5 cannot be decoded.
    source = FakeSource(TOPIC)
    source.append(0, _records(0, [0, 1, 2]), _records(0, [5], bad=5), _records(0, [6, 7]))
    processor = await _consume_up_to(source, 8)
    assert processor.seen() == [
        (0, 1, False),
        (1, 2, False),
        (2, 3, False),
        (3, 6, True),  # one record for offsets 3-5 (it was three: 3, 4 and 5)
        (6, 7, False),
        (7, 8, False),
    ]


async def test_an_unreadable_record_inside_a_batch_takes_only_its_batch_with_it() -> None:
    # aiokafka parses a batch from its first record: 3 and 4 cannot be read past 2.
    source = FakeSource(TOPIC)
    source.append(0, _records(0, [0, 1, 2, 3, 4], bad=2), _records(0, [5, 6]))
    processor = await _consume_up_to(source, 7)
    assert processor.seen() == [
        (0, 1, False),
        (1, 2, False),
        (2, 5, True),
        (5, 6, False),
        (6, 7, False),
    ]


async def test_an_unreadable_record_at_the_end_of_the_log_spans_to_the_high_watermark() -> None:
    source = FakeSource(TOPIC)
    source.append(0, _records(0, [0]), _records(0, [10], bad=10))
    processor = await _consume_up_to(source, 11)
    assert processor.seen() == [(0, 1, False), (1, 11, True)]


async def test_a_long_compacted_gap_costs_few_fetches() -> None:
    source = FakeSource(TOPIC)
    source.append(0, _records(0, [0]), _records(0, [100_000], bad=100_000), _records(0, [100_001]))
    processor = await _consume_up_to(source, 100_002)
    assert processor.seen() == [(0, 1, False), (1, 100_001, True), (100_001, 100_002, False)]
    assert source.fetch_count < 100


def _sized(offset: int, size: int) -> RawRecord:
    return RawRecord(TOPIC, 0, offset, b"k", b"x" * (size - 1))


def test_a_lane_is_full_by_bytes_before_it_is_full_by_records() -> None:
    lane = Lane(0, capacity=100, capacity_bytes=3000)
    lane.add(_sized(o, 1000) for o in range(2))
    assert not lane.full
    lane.add([_sized(2, 1000)])
    assert lane.full
    assert lane.bytes == 3000


def test_a_batch_is_bounded_in_bytes_and_an_oversized_record_is_a_batch_of_its_own() -> None:
    lane = Lane(0, capacity=100, capacity_bytes=10_000)
    lane.add([_sized(0, 400), _sized(1, 400), _sized(2, 400), _sized(3, 5000), _sized(4, 10)])
    assert [r.offset for r in lane.take(10, 1000)] == [0, 1]
    assert [r.offset for r in lane.take(10, 1000)] == [2]
    assert [r.offset for r in lane.take(10, 1000)] == [3]
    assert [r.offset for r in lane.take(10, 1000)] == [4]
    assert lane.bytes == 0


class BlockedProcessor(RecordingProcessor):
    """Holds every batch until released, so the lanes fill up."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def process(self, records: Sequence[RawRecord]) -> BatchReport:
        await self.release.wait()
        return await super().process(records)


async def test_records_in_memory_stay_within_the_byte_bounds_also_around_an_unreadable_record() -> (
    None
):
    # Four partitions share one lane; the first one starts with an unreadable record, so a
    # fetch fails and the consumer reads each partition on its own. Before, it read every
    # partition once, whatever its lane already held.
    source = FakeSource(TOPIC)
    for partition in range(4):
        records = [
            FakeRecord(TOPIC, partition, o, value=b"x" * 999, unreadable=partition == o == 0)
            for o in range(40)
        ]
        source.append(partition, *([r] for r in records))
    processor = BlockedProcessor()
    settings = _settings(lanes=1, fetch_max_records=4, batch_max_bytes=2000, lane_queue_bytes=3000)
    consumer = ReleaseConsumer(source, processor, NullPublisher(), settings, _no_stored_offsets)
    await consumer.on_assigned(source.assign({0, 1, 2, 3}))
    peak = 0
    async with consuming(consumer):
        for _ in range(15):
            await source.fetching.wait()
            source.fetching.clear()
            peak = max(peak, consumer.records_bytes)
        # queued + the batch in flight + one fetch (4 records) past the bound
        assert peak <= 3000 + 2000 + 4 * 1000
        processor.release.set()
        async with asyncio.timeout(10):
            await processor.reached.setdefault(40, asyncio.Event()).wait()


async def test_a_new_owner_starts_at_the_database_offset_and_commits_only_what_it_applied() -> None:
    source = FakeSource(TOPIC)
    source.append(0, _records(0, range(10)))

    async def stored(topic: str) -> Mapping[int, int]:
        return {0: 4}  # the previous owner applied 0-3, Kafka's commit may say otherwise

    processor = RecordingProcessor()
    consumer = ReleaseConsumer(source, processor, NullPublisher(), _settings(), stored)
    await consumer.on_assigned(source.assign({0}))
    async with consuming(consumer):
        async with asyncio.timeout(10):
            await processor.reached.setdefault(10, asyncio.Event()).wait()
    await consumer.commit()
    assert [r.offset for r in processor.records] == list(range(4, 10))
    committed = [c[TopicPartition(TOPIC, 0)] for c in source.commits]
    assert committed == sorted(set(committed))  # never back, never the same twice
    assert committed[0] >= 4
    assert committed[-1] == 10


async def test_a_revoke_drops_queued_records_and_commits_what_the_database_applied() -> None:
    source = FakeSource(TOPIC)
    source.append(0, _records(0, range(30)))
    processor = BlockedProcessor()
    consumer = ReleaseConsumer(
        source, processor, NullPublisher(), _settings(lanes=1), _no_stored_offsets
    )
    tps = source.assign({0})
    await consumer.on_assigned(tps)
    async with consuming(consumer):
        while consumer.records_bytes < 30 * len(b"{}" + b"k"):
            await source.fetching.wait()  # all 30 fetched: 10 in flight, 20 queued
            source.fetching.clear()
        revoking = asyncio.create_task(consumer.on_revoked(set(tps)))
        processor.release.set()
        async with asyncio.timeout(5):
            await revoking
        assert [r.offset for r in processor.records] == list(range(10))
        assert source.commits[-1] == {TopicPartition(TOPIC, 0): 10}
        assert consumer.records_bytes == 0


class RebalancingSource(FakeSource):
    """Runs a rebalance while the consumer probes past offset `at`, as aiokafka's coordinator
    task does between the consumer's awaits: partition 0 is revoked, and assigned again
    from the database's offset."""

    def __init__(self, at: int, processor: BlockedProcessor) -> None:
        super().__init__(TOPIC)
        self.at = at
        self.processor = processor
        self.consumer: ReleaseConsumer | None = None
        self.rebalanced = False

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> Mapping[TopicPartition, Sequence[FakeRecord]]:
        tp = TopicPartition(TOPIC, 0)
        if partitions and not self.rebalanced and self.positions.get(tp, 0) > self.at:
            self.rebalanced = True
            assert self.consumer is not None
            await self.consumer.on_revoked(self.assignment())
            self.processor.release.set()
            await self.consumer.on_assigned(self.assign({0}))
        return await super().getmany(*partitions, timeout_ms=timeout_ms, max_records=max_records)


async def test_a_partition_assigned_anew_while_its_span_is_probed_is_read_from_its_new_start() -> (
    None
):
    # The records before the unreadable one are still queued when the rebalance comes (the
    # processor is held), so the revoke drops them and the new start is offset 0.
    processor = BlockedProcessor()
    source = RebalancingSource(at=3, processor=processor)
    source.append(0, _records(0, [0, 1, 2, 3, 4, 5], bad=3), _records(0, [6, 7]))
    settings = _settings(lanes=1, rebalance_drain_timeout_s=0.05)
    consumer = ReleaseConsumer(source, processor, NullPublisher(), settings, _no_stored_offsets)
    source.consumer = consumer
    await consumer.on_assigned(source.assign({0}))
    async with consuming(consumer):
        async with asyncio.timeout(10):
            await processor.reached.setdefault(8, asyncio.Event()).wait()
    assert source.rebalanced
    # Before, the probe begun under the old assignment went on after it: two wrong spans.
    assert [(o, n, u) for o, n, u in processor.seen() if u] == [(3, 6, True)]
    assert {o for o, _, u in processor.seen() if not u} == {0, 1, 2, 6, 7}


class LockedProcessor(RecordingProcessor):
    """Defers the records of the `locked` partitions, as `BatchProcessor` does while a row
    lock their next record needs is held elsewhere, and applies the others."""

    def __init__(self) -> None:
        super().__init__()
        self.locked: set[int] = set()
        self.deferrals = 0
        self.deferred = asyncio.Event()

    async def process(self, records: Sequence[RawRecord]) -> BatchReport:
        deferred = [r for r in records if r.partition in self.locked]
        report = await super().process([r for r in records if r.partition not in self.locked])
        if deferred:
            deferred[0] = replace(deferred[0], lock_waits=deferred[0].lock_waits + 1)
            self.deferrals += 1
            self.deferred.set()
        report.deferred = deferred
        return report

    def offsets(self, partition: int) -> list[int]:
        return [r.offset for r in self.records if r.partition == partition]


def _two_partitions() -> FakeSource:
    # One lane for both; partition 0's offsets start at 100 to tell them apart.
    source = FakeSource(TOPIC)
    source.append(0, _records(0, range(100, 120)))
    source.append(1, _records(1, range(20)))
    return source


def _settings_held(**overrides: object) -> Settings:
    return _settings(lanes=1, batch_max_records=5, retry_initial_s=0.01, retry_max_s=0.05)


async def test_a_partition_waiting_for_a_lock_is_held_back_while_its_lane_goes_on() -> None:
    source = _two_partitions()
    processor = LockedProcessor()
    processor.locked = {0}
    consumer = ReleaseConsumer(
        source, processor, NullPublisher(), _settings_held(), _no_stored_offsets
    )
    await consumer.on_assigned(source.assign({0, 1}))
    batch_bytes = 5 * RawRecord(TOPIC, 0, 100, b"k", b"{}").size
    async with consuming(consumer):
        async with asyncio.timeout(10):
            # Before, the records the processor gave back were lost (partition 0 never
            # reached 120); and a real lock wait held the whole lane until it was free.
            await processor.reached.setdefault(20, asyncio.Event()).wait()
            assert processor.offsets(1) == list(range(20))
            assert processor.offsets(0) == []
            # Offered again after a backoff; meanwhile it keeps at most the batch that is
            # tried in memory (the waiting record, and the later ones read again).
            while processor.deferrals < 3:
                processor.deferred.clear()
                await processor.deferred.wait()
                assert consumer.records_bytes <= batch_bytes
            processor.locked = set()  # the lock is let go
            await processor.reached.setdefault(120, asyncio.Event()).wait()
    assert processor.offsets(0) == list(range(100, 120))  # in order, each once
    await consumer.commit()
    assert source.commits[-1][TopicPartition(TOPIC, 0)] == 120


async def test_a_held_partition_does_not_fill_its_lane_and_stall_the_others() -> None:
    # A lane queue of 5 records: partition 0's queued records alone would fill it.
    source = FakeSource(TOPIC)
    source.append(0, *([r] for r in _records(0, range(100, 140))))
    source.append(1, *([r] for r in _records(1, range(40))))
    processor = LockedProcessor()
    processor.locked = {0}
    settings = _settings(
        lanes=1,
        batch_max_records=5,
        lane_queue_batches=1,
        fetch_max_records=10,
        retry_initial_s=0.01,
        retry_max_s=0.05,
    )
    consumer = ReleaseConsumer(source, processor, NullPublisher(), settings, _no_stored_offsets)
    await consumer.on_assigned(source.assign({0, 1}))
    async with consuming(consumer):
        async with asyncio.timeout(10):
            await processor.reached.setdefault(40, asyncio.Event()).wait()
            assert processor.offsets(0) == []
            processor.locked = set()
            await processor.reached.setdefault(140, asyncio.Event()).wait()
    assert processor.offsets(1) == list(range(40))
    assert processor.offsets(0) == list(range(100, 140))  # read again, in order, once each


async def test_a_held_partition_is_dropped_at_a_revoke_and_read_again_from_the_database() -> None:
    source = _two_partitions()
    processor = LockedProcessor()
    processor.locked = {0}

    async def stored(topic: str) -> Mapping[int, int]:
        return {0: 100}  # nothing of partition 0 was applied

    consumer = ReleaseConsumer(source, processor, NullPublisher(), _settings_held(), stored)
    tps = source.assign({0, 1})
    await consumer.on_assigned(tps)
    async with consuming(consumer):
        async with asyncio.timeout(10):
            await processor.reached.setdefault(20, asyncio.Event()).wait()
            processor.deferred.clear()
            await processor.deferred.wait()
            await consumer.on_revoked(tps)
            assert consumer.records_bytes == 0
            await consumer.on_assigned(source.assign({0, 1}))
            processor.locked = set()
            await processor.reached.setdefault(120, asyncio.Event()).wait()
    assert processor.offsets(0) == list(range(100, 120))


async def test_stop_does_not_wait_for_a_held_partition() -> None:
    source = _two_partitions()
    processor = LockedProcessor()
    processor.locked = {0}  # never let go
    consumer = ReleaseConsumer(
        source, processor, NullPublisher(), _settings_held(), _no_stored_offsets
    )
    await consumer.on_assigned(source.assign({0, 1}))
    async with consuming(consumer), asyncio.timeout(10):
        await processor.reached.setdefault(20, asyncio.Event()).wait()
        await processor.deferred.wait()
    assert processor.offsets(0) == []
    assert consumer.records_bytes == 0


async def test_a_held_partition_with_an_unreadable_record_is_applied_in_order_once_free() -> None:
    # Reading partition 0 fails at its unreadable record while its first record waits for a
    # lock: the probe for the unreadable span and the lane seeking the held partition back
    # run between each other's awaits; neither may skip or repeat a record.
    source = FakeSource(TOPIC)
    source.append(0, _records(0, range(100, 110)), _records(0, [110, 111], bad=110))
    source.append(0, _records(0, range(112, 116)))
    source.append(1, *([r] for r in _records(1, range(20))))
    processor = LockedProcessor()
    processor.locked = {0}
    consumer = ReleaseConsumer(
        source, processor, NullPublisher(), _settings_held(), _no_stored_offsets
    )
    await consumer.on_assigned(source.assign({0, 1}))
    async with consuming(consumer):
        async with asyncio.timeout(10):
            await processor.reached.setdefault(20, asyncio.Event()).wait()
            while processor.deferrals < 3:
                processor.deferred.clear()
                await processor.deferred.wait()
            processor.locked = set()
            await processor.reached.setdefault(116, asyncio.Event()).wait()
    assert [(o, n, u) for o, n, u in processor.seen() if o >= 100] == [
        *((o, o + 1, False) for o in range(100, 110)),
        (110, 112, True),
        *((o, o + 1, False) for o in range(112, 116)),
    ]
