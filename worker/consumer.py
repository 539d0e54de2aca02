"""The Kafka consumer: fetch, order per partition, batch, commit after the database, rebalance.

Records are fetched in batches (`getmany`) and routed to a fixed lane per partition
(`partition % lanes`). Each lane applies its batches one at a time, so one
partition's records (and so one cart's) are applied in offset order, while lanes
run concurrently on their own connections. A lane with too much buffered work
pauses its partitions (backpressure by pausing, not sleeping). A partition whose next
record waits for a row lock held elsewhere is held back on its own for a backoff (paused,
only that record kept, the later ones read again), while the lane goes on with its
other partitions.

Offsets: the next offset of every partition is stored in PostgreSQL in the same
transaction as the work (see `release.apply_batch`); Kafka commits follow the
database commits, every `commit_interval_ms`, on revoke and at shutdown. On
assignment the consumer seeks to the stored offset, so nothing committed to the
database is ever applied twice, whatever Kafka's committed offset says.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Protocol

import structlog
from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError

from worker import metrics
from worker.config import Settings
from worker.offsets import OffsetBook
from worker.records import Headers, OutboxMessage, Publication, RawRecord
from worker.release import BatchReport
from worker.retry import BROKER_ERRORS, backoff_s, transient_retrying

log = structlog.get_logger("worker.consumer")

# Longest wait for one Kafka offset commit; `make_consumer` keeps it within the rebalance.
_COMMIT_TIMEOUT_S = 5.0
_HOLD_SLACK_S = 0.001

ReportHook = Callable[[BatchReport], None]

# The database's next offset per partition of a topic (`store.stored_offsets`).
StoredOffsets = Callable[[str], Awaitable[Mapping[int, int]]]


# ---------------------------------------------------------------------- the seams


class FetchedRecord(Protocol):
    """A record as the source returns it (aiokafka's `ConsumerRecord`)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Headers | Sequence[tuple[str, bytes | None]] | None: ...
    @property
    def timestamp(self) -> int: ...


def raw_record(m: FetchedRecord) -> RawRecord:
    """A fetched record as the worker's own type."""
    return RawRecord(
        m.topic, m.partition, m.offset, m.key, m.value, tuple(m.headers or ()), m.timestamp
    )


class KafkaSource(Protocol):
    """The part of `AIOKafkaConsumer` that `ReleaseConsumer` uses, so a fake can drive it.

    Blocking: only `getmany`, `position` and `commit` await. `getmany` returns within
    about `timeout_ms` while the source holds an assignment, but may wait without bound
    while the group rebalances (aiokafka waits for the new assignment), so a caller that
    must stop in time races it against its stop event; cancelling it loses nothing.
    `commit` may wait for a coordinator without end during an outage: callers bound it.
    The rebalance callbacks (`ReleaseConsumer.on_revoked` / `on_assigned`) are called
    by the source's own task, never from inside a call the consumer made; `seek` and
    `position` are valid for assigned partitions only.

    Errors: `getmany` raises `KafkaError` (the caller retries) and `UnicodeDecodeError`
    for a record it cannot decode; it may already have moved the positions of other
    partitions by then (see `ReleaseConsumer._isolate_unreadable`). `commit` raises
    `CommitFailedError` / `IllegalStateError` when a rebalance took the partitions.
    Shutdown: the owner stops the source after `ReleaseConsumer.run` returned.
    """

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> Mapping[TopicPartition, Sequence[FetchedRecord]]: ...
    def seek(self, partition: TopicPartition, offset: int) -> None: ...
    async def position(self, partition: TopicPartition) -> int: ...
    def pause(self, *partitions: TopicPartition) -> None: ...
    def resume(self, *partitions: TopicPartition) -> None: ...
    def paused(self) -> set[TopicPartition]: ...
    def assignment(self) -> set[TopicPartition]: ...
    def highwater(self, partition: TopicPartition) -> int | None: ...
    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None: ...


class Processor(Protocol):
    """Applies one lane's batch in one database transaction (`processor.BatchProcessor`).

    `process` returns once the batch is committed (the offsets in its report are durable)
    and never raises for a bad record: bad records become rejections in the report. It
    retries outages for as long as they last, so it may block indefinitely; cancelling it
    rolls the open transaction back, and the batch's records are applied again later.
    It does not wait for a row lock held elsewhere: the waiting record and the later
    records of its partition come back unapplied (`BatchReport.deferred`), the waiting
    one with `lock_waits` counted up.
    """

    async def process(self, records: Sequence[RawRecord]) -> BatchReport: ...


class ResultPublisher(Protocol):
    """Sends a committed batch's results (`publisher.Publisher`).

    The results are already in the database (outbox rows, or for fresh item results the
    inbox rows below the partition's published watermark), so no call may lose them:
    `publish` and `publish_fresh` start sending and return without waiting for the broker
    (a refusal leaves an outbox row for the relay, a fresh result for a catch-up from the
    inbox); `flush` waits at most `timeout_s` for the sends in flight. `recover` catches
    newly assigned partitions up (republishes their unacknowledged inbox results) before
    anything new is applied; `release` stores revoked partitions' watermarks after a flush.
    """

    async def publish(self, messages: Sequence[OutboxMessage]) -> None: ...
    async def publish_fresh(self, publications: Sequence[Publication]) -> None: ...
    async def flush(self, timeout_s: float) -> None: ...
    async def recover(self, partitions: Sequence[tuple[str, int]], timeout_s: float) -> None: ...
    async def release(self, partitions: Sequence[tuple[str, int]], timeout_s: float) -> None: ...


class Lane:
    """Buffered records of the partitions routed to one lane, applied strictly in order.

    Bounded in records and in bytes: `full` pauses the lane's partitions. A held partition
    (`hold`) keeps one record queued, not taken until its hold ends.
    """

    def __init__(self, index: int, capacity: int, capacity_bytes: int) -> None:
        self.index = index
        self.capacity = capacity
        self.capacity_bytes = capacity_bytes
        self.buffer: deque[RawRecord] = deque()
        self.bytes = 0
        self.ready = asyncio.Event()
        self.busy_with: set[TopicPartition] = set()
        self.busy_bytes = 0  # of the batch being applied
        self.idle = asyncio.Event()
        self.idle.set()
        self.holds: dict[TopicPartition, float] = {}  # partition -> loop time its hold ends

    def add(self, records: Iterable[RawRecord]) -> None:
        for record in records:
            self.buffer.append(record)
            self.bytes += record.size
        if self.buffer:
            self.ready.set()

    def hold(self, waiting: RawRecord, until: float) -> list[RawRecord]:
        """Hold `waiting`'s partition until loop time `until`, with `waiting` (its first
        record not applied) the only one of it queued, at the front. Returns the
        partition's other queued records, in order: taken out, to be read again."""
        tp = TopicPartition(waiting.topic, waiting.partition)
        taken = [r for r in self.buffer if (r.topic, r.partition) == tp]
        if taken:
            self.buffer = deque(r for r in self.buffer if (r.topic, r.partition) != tp)
        self.buffer.appendleft(waiting)
        self.bytes += waiting.size - sum(r.size for r in taken)
        self.holds[tp] = until
        self.ready.set()  # the other partitions' records are not held
        return taken

    def end_holds(self, now: float) -> float | None:
        """End the holds due by `now`; return when the next one ends (None: no hold left)."""
        self.holds = {tp: until for tp, until in self.holds.items() if until > now}
        return min(self.holds.values(), default=None)

    def take(self, limit: int, limit_bytes: int) -> list[RawRecord]:
        """The next batch of partitions not held: at most `limit` records and `limit_bytes`
        bytes, at least one if any is not held."""
        batch: list[RawRecord] = []
        held: list[RawRecord] = []
        size = 0
        # A plain tuple finds a TopicPartition key (a named tuple): no object per record.
        holds = self.holds
        while self.buffer and len(batch) < limit:
            record = self.buffer[0]
            if holds and (record.topic, record.partition) in holds:
                held.append(self.buffer.popleft())
                continue
            if batch and size + record.size > limit_bytes:
                break
            batch.append(self.buffer.popleft())
            size += record.size
        self.buffer.extendleft(reversed(held))
        self.bytes -= size
        if not self.buffer:
            self.ready.clear()
        return batch

    def drop(self, partitions: set[TopicPartition] | None) -> int:
        """Forget buffered, not yet started records of these partitions (None: of all)."""
        before = len(self.buffer)
        self.buffer = deque(
            r
            for r in self.buffer
            if partitions is not None and TopicPartition(r.topic, r.partition) not in partitions
        )
        self.bytes = sum(r.size for r in self.buffer)
        self.holds = {
            tp: until
            for tp, until in self.holds.items()
            if partitions is not None and tp not in partitions
        }
        if not self.buffer:
            self.ready.clear()
        return before - len(self.buffer)

    @property
    def full(self) -> bool:
        return len(self.buffer) >= self.capacity or self.bytes >= self.capacity_bytes


class ReleaseConsumer:
    def __init__(
        self,
        consumer: KafkaSource,
        processor: Processor,
        publisher: ResultPublisher,
        settings: Settings,
        stored_offsets: StoredOffsets,
        on_report: ReportHook | None = None,
    ) -> None:
        self._consumer = consumer
        self._processor = processor
        self._publisher = publisher
        self._settings = settings
        self._stored_offsets = stored_offsets
        self._on_report = on_report
        capacity = settings.batch_max_records * settings.lane_queue_batches
        self._lanes = [Lane(i, capacity, settings.lane_queue_bytes) for i in range(settings.lanes)]
        self._offsets = OffsetBook()
        self._revoking: set[TopicPartition] = set()
        self._stopping = asyncio.Event()
        self._books_set = asyncio.Event()  # clear from a revoke to the end of `on_assigned`
        self._untaken: dict[TopicPartition, int] = {}  # first offset passed over, revoking
        self._epoch = 0  # rebalance callbacks so far; see `_ours`
        self._assigned_at: dict[TopicPartition, int] = {}  # the epoch of its `on_assigned`
        self.joined = False
        self.last_progress = time.monotonic()

    # ------------------------------------------------------------------ wiring

    def listener(self) -> ConsumerRebalanceListener:
        return _Listener(self)

    def _lane(self, tp: TopicPartition) -> Lane:
        lane: Lane = self._lanes[tp.partition % len(self._lanes)]
        return lane

    async def run(self) -> None:
        """Fetch and apply until `stop()`; then finish in-flight work and commit."""
        lanes = [asyncio.create_task(self._run_lane(lane)) for lane in self._lanes]
        committer = asyncio.create_task(self._run_committer())
        fetcher = asyncio.create_task(self._fetch_loop())
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            # stop() ends the wait at once: during a rebalance the fetcher may be waiting in
            # `getmany` for the next assignment, without a timeout, and cancelling that
            # fetch loses nothing. A lane or the committer ending means it failed.
            done, _ = await asyncio.wait(
                [stopping, fetcher, *lanes, committer], return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                task.result()
            if stopping not in done and fetcher not in done:
                raise RuntimeError("a worker task ended unexpectedly")
        finally:
            stopping.cancel()
            fetcher.cancel()
            for lane in self._lanes:
                lane.drop(None)
            try:
                # Lanes finish the batch they are in; nothing new is started. If the caller
                # gives up (shutdown timeout, second signal) the open transaction rolls back.
                await asyncio.gather(*(lane.idle.wait() for lane in self._lanes))
            finally:
                for task in [fetcher, *lanes, committer]:
                    task.cancel()
                await asyncio.gather(stopping, fetcher, *lanes, committer, return_exceptions=True)

    def stop(self) -> None:
        self._stopping.set()

    @property
    def records_bytes(self) -> int:
        """Bytes of the records the lanes hold, queued or being applied (`RawRecord.size`).

        At most `lanes × (lane_queue_bytes + batch_max_bytes)` plus what one fetch returns
        past a lane's bound: aiokafka holds at most one fetched part per partition, each
        at most `max_partition_fetch_bytes` (see `app.make_consumer`).
        """
        return sum(lane.bytes + lane.busy_bytes for lane in self._lanes)

    # ------------------------------------------------------------------ fetching

    async def _fetch_loop(self) -> None:
        while not self._stopping.is_set():
            # Not while a rebalance is under way: aiokafka fetches a new assignment before
            # `on_assigned` has set its books, and a fetch failing on an undecodable record
            # then moves those partitions past records it drops, which `_isolate_unreadable`
            # cannot rewind (no rewind point yet), or it fails again at once, in a loop.
            await self._books_set.wait()
            try:
                fetched = await self._consumer.getmany(
                    timeout_ms=200, max_records=self._settings.fetch_max_records
                )
            except BROKER_ERRORS as error:
                log.warning("fetch_failed_retrying", error=repr(error)[:200])
                await asyncio.sleep(1)
                continue
            except UnicodeDecodeError as error:
                log.warning("fetch_unreadable_record", error=repr(error)[:200])
                await self._isolate_unreadable()
            else:
                self._take(fetched)
            self._apply_backpressure()

    def _take(self, fetched: Mapping[TopicPartition, Sequence[FetchedRecord]]) -> None:
        for tp, messages in fetched.items():
            if not messages:
                continue
            if tp in self._revoking:
                # Not ours to take now; but they may be the next assignment's, fetched
                # before `on_assigned` ran, with aiokafka's position moved past them.
                first = messages[0].offset
                self._untaken[tp] = min(self._untaken.get(tp, first), first)
                continue
            self._offsets.handed(tp, messages[-1].offset)
            self._lane(tp).add(map(raw_record, messages))

    async def _isolate_unreadable(self) -> None:
        """aiokafka could not parse a fetched record (a header name that is not UTF-8).

        It raised from inside `getmany`, after it had already moved the positions of
        partitions whose records it was about to return: those records would be skipped,
        and nothing downstream could notice the gap. So every partition is first rewound
        to the first record not yet handed to a lane; then each is read on its own, and
        the failing one record by record up to the unreadable record. That one is handed
        over without key, value or headers (it becomes a 400 rejection and a dead letter
        with its topic, partition and offset), and reading resumes after it. A partition
        whose lane is full is only rewound, so the memory bound holds here too.
        """
        epoch = self._epoch
        assigned = sorted(tp for tp in self._consumer.assignment() if self._ours(tp, epoch))
        for tp in assigned:
            self._rewind(tp)
        for tp in assigned:
            if not self._ours(tp, epoch) or self._lane(tp).full:
                continue  # read again once its lane has room (backpressure holds here too)
            try:
                self._take(
                    await self._consumer.getmany(
                        tp, timeout_ms=200, max_records=self._settings.fetch_max_records
                    )
                )
            except UnicodeDecodeError:
                if self._ours(tp, epoch):
                    self._rewind(tp)
                    await self._skip_unreadable(tp, epoch)

    async def _skip_unreadable(self, tp: TopicPartition, epoch: int) -> None:
        while True:
            try:
                fetched = await self._consumer.getmany(tp, timeout_ms=1000, max_records=1)
            except UnicodeDecodeError:
                break
            if not fetched.get(tp) or not self._ours(tp, epoch):
                return  # not reached in time, or taken away; the next round carries on
            self._take(fetched)
        if not self._ours(tp, epoch):
            return
        start = self._offsets.rewind_point(tp)
        assert start is not None  # `_ours`
        end = await self._unreadable_span_end(tp, start, epoch)
        if end is None or not self._ours(tp, epoch):
            if self._ours(tp, epoch):
                self._rewind(tp)
            return  # not reached in time, or taken away; the next round carries on
        log.error(
            "record_unreadable_dead_lettered",
            topic=tp.topic,
            partition=tp.partition,
            offset=start,
            end_offset=end,
        )
        self._lane(tp).add(
            [RawRecord(tp.topic, tp.partition, start, None, None, unreadable=True, span_end=end)]
        )
        self._offsets.handed(tp, end - 1)
        self._consumer.seek(tp, end)

    async def _unreadable_span_end(self, tp: TopicPartition, start: int, epoch: int) -> int | None:
        """The first offset past `start` from which a record can be read again (None: the
        broker did not answer in time, or the partition was taken away meanwhile).

        Every record before the unreadable one was handed over, so no offset from `start`
        up to it holds a readable record, but how many offsets that is, is unknown:
        compaction and transaction markers leave gaps. And aiokafka parses a record batch
        from its first record, so a fetch from any offset of the unreadable record's batch
        fails alike: the records after it in its batch cannot be read either. So probe at
        doubling distances until a fetch succeeds (or the log ends), then bisect back to
        the first offset that does. One unreadable record then stands for the whole span.
        """
        failed, step = start, 1
        while True:
            probe = failed + step
            high = self._consumer.highwater(tp)
            if high is not None and probe >= high:
                readable_at = max(high, failed + 1)
                break
            readable = await self._readable_from(tp, probe, epoch)
            if readable is None:
                return None
            if readable:
                readable_at = probe
                break
            failed, step = probe, step * 2
        while readable_at - failed > 1:
            middle = (failed + readable_at) // 2
            readable = await self._readable_from(tp, middle, epoch)
            if readable is None:
                return None
            if readable:
                readable_at = middle
            else:
                failed = middle
        return readable_at

    async def _readable_from(self, tp: TopicPartition, offset: int, epoch: int) -> bool | None:
        """Whether a fetch from `offset` returns a record (None: nothing came in time, or
        the partition is no longer ours)."""
        if not self._ours(tp, epoch):
            return None
        self._consumer.seek(tp, offset)
        try:
            fetched = await self._consumer.getmany(tp, timeout_ms=1000, max_records=1)
        except UnicodeDecodeError:
            return False
        return True if fetched.get(tp) else None

    def _ours(self, tp: TopicPartition, epoch: int) -> bool:
        """Whether `tp` may still be read and sought as it was at `epoch`.

        The rebalance callbacks run between any two awaits of the fetcher: a partition can
        be revoked, or assigned anew (its books reset to the database's offset, which a
        reading begun before must not override), or assigned but not yet through
        `on_assigned`, and aiokafka refuses to seek a partition it does not hold. A lane
        may also pause a held partition and seek it back between them (`_hold`): a probe
        of it then reads nothing (paused), gives up and rewinds it to the same point.
        """
        return (
            self._epoch == epoch
            and tp not in self._revoking
            and tp in self._consumer.assignment()
            and self._offsets.rewind_point(tp) is not None
        )

    def _rewind(self, tp: TopicPartition) -> None:
        offset = self._offsets.rewind_point(tp)
        if offset is not None:
            self._consumer.seek(tp, offset)

    def _apply_backpressure(self) -> None:
        assigned = self._consumer.assignment()
        # The source's own view: a partition paused before a rebalance may be paused
        # still, or not, after it (aiokafka starts a new assignment unpaused).
        paused = self._consumer.paused() & assigned
        to_pause = {tp for tp in assigned if self._stalled(tp)} - paused
        to_resume = {tp for tp in paused if not self._stalled(tp)}
        if to_pause:
            self._consumer.pause(*to_pause)
        if to_resume:
            self._consumer.resume(*to_resume)

    def _stalled(self, tp: TopicPartition) -> bool:
        """Whether reading more of `tp` now would only fill memory: its lane is full, or
        holds it back (reading on would fill the lane and stall its other partitions)."""
        lane = self._lane(tp)
        return lane.full or tp in lane.holds

    # ------------------------------------------------------------------ applying

    async def _run_lane(self, lane: Lane) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await lane.ready.wait()
            # A timer may fire a little early (asyncio runs it within the clock's
            # resolution): a hold that ends within _HOLD_SLACK_S counts as ended.
            next_hold_end = lane.end_holds(loop.time() + _HOLD_SLACK_S)
            records = lane.take(self._settings.batch_max_records, self._settings.batch_max_bytes)
            if not records:
                # Nothing queued, or only held partitions' records: wait for new records
                # or for the first hold to end.
                lane.ready.clear()
                if next_hold_end is not None:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout_at(next_hold_end):
                            await lane.ready.wait()
                    lane.ready.set()
                continue
            lane.idle.clear()
            lane.busy_with = _partitions_of(records)
            lane.busy_bytes = sum(r.size for r in records)
            owners = {tp: self._assigned_at.get(tp) for tp in lane.busy_with}
            try:
                with structlog.contextvars.bound_contextvars(lane=lane.index):
                    report = await self._processor.process(records)
                lane.busy_bytes = 0  # applied, or given back to the queue here:
                self._hold(lane, report.deferred, owners)
                await self._publisher.publish(report.messages)
                await self._publisher.publish_fresh(report.publications)
                self._offsets.applied(report.next_offsets)
                if report.next_offsets:  # not when every record waited for a lock
                    self.last_progress = time.monotonic()
                if log.is_enabled_for(logging.DEBUG):  # its offset ranges cost per record
                    _log_applied(lane, records, report)
                if self._on_report is not None:
                    self._on_report(report)
            finally:
                lane.busy_with = set()
                lane.busy_bytes = 0
                lane.idle.set()

    def _hold(
        self, lane: Lane, deferred: Sequence[RawRecord], owners: Mapping[TopicPartition, int | None]
    ) -> None:
        """Hold back the partitions of deferred records for a backoff that grows with the
        waiting record's `lock_waits` (a new record waiting starts again).

        The waiting record goes back to the front of its lane; the partition's later
        records (deferred, or queued) are read again from the source once the hold ends
        (paused and sought back meanwhile), so a held partition keeps one record in memory
        and cannot fill its lane. Only while the partition is still ours as it was when
        the batch began, and the consumer is not stopping: else the records go, like every
        other buffered record at a revoke or a shutdown, and whoever reads the partition
        next starts at the database's offset, which stops before them.
        """
        by_partition: dict[TopicPartition, list[RawRecord]] = {}
        for record in deferred:
            tp = TopicPartition(record.topic, record.partition)
            by_partition.setdefault(tp, []).append(record)
        now = asyncio.get_running_loop().time()
        for tp, records in by_partition.items():
            ours = (
                not self._stopping.is_set()
                and tp not in self._revoking
                and tp in self._consumer.assignment()
                and owners.get(tp) is not None
                and self._assigned_at.get(tp) == owners.get(tp)
            )
            delay = backoff_s(self._settings, records[0].lock_waits)
            log.info(
                "partition_held_for_lock",
                topic=tp.topic,
                partition=tp.partition,
                offset=records[0].offset,
                records=len(records),
                lock_waits=records[0].lock_waits,
                retry_in_s=round(delay, 3) if ours else None,
            )
            if not ours:
                continue
            later = [*records[1:], *lane.hold(records[0], now + delay)]
            if later:
                # Paused first: aiokafka then returns nothing it fetched from before the seek.
                self._consumer.pause(tp)
                self._consumer.seek(tp, later[0].offset)
                self._offsets.given_back(tp, later[0].offset)

    # ------------------------------------------------------------------ committing

    async def _run_committer(self) -> None:
        interval = max(self._settings.commit_interval_ms, 10) / 1000
        while True:
            await asyncio.sleep(interval)
            await self.commit()
            self._report_lag()
            metrics.RECORD_BYTES.set(self.records_bytes)

    async def commit(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        """Commit to Kafka what the database has committed, for assigned partitions."""
        assigned = self._consumer.assignment()
        wanted = assigned if partitions is None else set(partitions) & assigned
        offsets = self._offsets.to_commit(wanted)
        if not offsets:
            return
        try:
            # Bounded: during a broker outage aiokafka waits for a coordinator without end,
            # and a revoke or a shutdown must not hang on it.
            async with asyncio.timeout(_COMMIT_TIMEOUT_S):
                await self._consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as error:
            # A rebalance is under way: the database holds the truth, the next owner
            # seeks to it, so skipping this commit loses and repeats nothing.
            log.info("commit_skipped_rebalance", error=repr(error)[:200])
            return
        except BROKER_ERRORS as error:
            # The database keeps the offsets; the next commit (or the next owner's seek to
            # the database offsets) makes up for this one.
            log.warning("commit_failed", error=repr(error)[:200])
            return
        self._offsets.committed(offsets)
        for tp, offset in offsets.items():
            metrics.COMMITTED.labels(partition=str(tp.partition)).set(offset)

    def _report_lag(self) -> None:
        for tp in self._consumer.assignment():
            high = self._consumer.highwater(tp)
            if high is not None:
                lag = self._offsets.lag(tp, high)
                metrics.LAG.labels(partition=str(tp.partition)).set(lag)

    def lag(self) -> int:
        total = 0
        for tp in self._consumer.assignment():
            high = self._consumer.highwater(tp)
            if high is not None:
                total += self._offsets.backlog(tp, high)
        return total

    # ------------------------------------------------------------------ rebalancing

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        # A rebalance began: out of the group until the next assignment (readiness and
        # the health stall clock watch this; aiokafka #1154 is a rejoin that never ends).
        self.joined = False
        self._epoch += 1
        self._books_set.clear()
        if not revoked:
            return
        # Until the next assignment, records of these partitions that aiokafka still hands
        # out are not taken: they are the next owner's (or ours again, after a seek).
        self._revoking |= revoked
        dropped = sum(lane.drop(revoked) for lane in self._lanes)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.rebalance_drain_timeout_s
        busy = [lane for lane in self._lanes if lane.busy_with & revoked]
        try:
            async with asyncio.timeout_at(deadline):
                await asyncio.gather(*(lane.idle.wait() for lane in busy))
        except TimeoutError:
            # Safe even so: the database offset row serialises us with the next owner.
            log.warning(
                "revoke_drain_timeout",
                partitions=_names(revoked),
                seconds=self._settings.rebalance_drain_timeout_s,
            )
        # One deadline for draining and publishing; the commit after it is bounded on its
        # own, and `rebalance_timeout_ms` covers both (see app.make_consumer).
        await self._publisher.flush(max(0.0, deadline - loop.time()))
        await self._publisher.release(sorted(revoked), max(0.0, deadline - loop.time()))
        await self.commit(revoked)
        self._offsets.forget(revoked)
        for tp in revoked:
            self._assigned_at.pop(tp, None)
        log.info("partitions_revoked", partitions=_names(revoked), dropped_buffered=dropped)

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        try:
            await self._set_books(assigned)
        finally:
            self._books_set.set()  # the fetch loop reads again (also if this failed)

    async def _set_books(self, assigned: set[TopicPartition]) -> None:
        # aiokafka discards fetched records of an older assignment from here on.
        self._revoking.clear()
        untaken, self._untaken = self._untaken, {}
        self._epoch += 1
        self.joined = True
        stored: dict[TopicPartition, int] = {}
        for topic in {tp.topic for tp in assigned}:
            async for attempt in transient_retrying(self._settings):
                with attempt:
                    by_partition = await self._stored_offsets(topic)
            stored.update(
                (tp, by_partition[tp.partition])
                for tp in assigned
                if tp.topic == topic and tp.partition in by_partition
            )
        # Results of these partitions' inbox rows not known acknowledged go out again
        # first (a predecessor crashed between its commit and the broker's answer).
        await self._publisher.recover(sorted(assigned), self._settings.rebalance_drain_timeout_s)
        for tp in sorted(assigned):
            start = stored.get(tp)
            if start is None and tp in untaken:
                # Without a database offset, reading starts where aiokafka's does, unless
                # `_take` passed over records of this partition while it was revoked: they
                # may be this assignment's, fetched before this callback ran.
                start = min(untaken[tp], await self._consumer.position(tp))
            if start is not None:
                # aiokafka hands out a new assignment's records (from Kafka's committed
                # offset) before this callback runs; those taken meanwhile are read again
                # after the seek, so they go, or a lane would hold them twice.
                self._lane(tp).drop({tp})
                self._consumer.seek(tp, start)
            # Where reading starts (the database's offset, else Kafka's committed one, else
            # the reset policy's): the point `_isolate_unreadable` may rewind to.
            self._offsets.assigned(
                tp, position=await self._consumer.position(tp), stored=stored.get(tp)
            )
            self._assigned_at[tp] = self._epoch
        log.info("partitions_assigned", partitions=_names(assigned))


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: ReleaseConsumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._owner.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._owner.on_assigned(set(assigned))


def _partitions_of(records: Iterable[RawRecord]) -> set[TopicPartition]:
    """The partitions of a batch's records (a named tuple made per partition, not per record)."""
    return {TopicPartition(*tp) for tp in {(r.topic, r.partition) for r in records}}


def _log_applied(lane: Lane, records: Sequence[RawRecord], report: BatchReport) -> None:
    log.debug(
        "batch_applied",
        lane=lane.index,
        offsets=_offset_ranges(records),
        records=report.records,
        skipped=report.skipped,
        replays=report.replays,
        outcomes=dict(report.outcomes),
        rejections={str(s): n for s, n in report.rejections.items()},
        dead_letters=report.dead_letters,
        released_quantity=report.released_quantity,
    )


def _offset_ranges(records: Iterable[RawRecord]) -> dict[str, list[int]]:
    """`topic/partition` -> [first, last] offset of a batch, to find a record's batch in logs."""
    ranges: dict[str, list[int]] = {}
    for r in records:
        span = ranges.setdefault(f"{r.topic}/{r.partition}", [r.offset, r.offset])
        span[0], span[1] = min(span[0], r.offset), max(span[1], r.offset)
    return ranges


def _names(partitions: Iterable[TopicPartition]) -> list[str]:
    return sorted(f"{tp.topic}/{tp.partition}" for tp in partitions)
