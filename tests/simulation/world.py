"""The simulated world the real consumer, lanes and processor run in.

Everything here is a fake of one of the worker's own Protocols, never of aiokafka's or
asyncpg's internals:

- `VirtualClockLoop`: an asyncio loop whose clock jumps to the next timer whenever
  nothing is ready to run, so backoffs, timeouts and intervals cost no real time and a
  run is a pure function of the steps taken (no threads, no sockets, no wall clock).
- `Broker` and `Source` (`consumer.KafkaSource`): partitions whose offsets may have gaps,
  a consumer group that rebalances the way aiokafka does (revoke callbacks while the old
  assignment is still valid, assigned callbacks after, `getmany` waiting meanwhile),
  committed offsets, pause/resume, `max_records`, and records the client cannot decode
  (`getmany` raises `UnicodeDecodeError` after moving other partitions' positions).
- `Database` and `Transactions` (`release.Transactions`): `FakeStore` as the committed
  state; a transaction works on a copy under one lock (serialisable) and replaces the
  state only if its block ends normally. Any awaited store call can be made to raise the
  asyncpg error a real server would send (an outage, a lock wait, a serialisation
  failure, a deadlock), or to be the point where the process dies.
- `Publisher` (`consumer.ResultPublisher`): a fake, not `worker.publisher.Publisher`
  (that one talks to the outbox through an asyncpg pool, which has no seam yet). It
  publishes to the broker, can be made to refuse, and deletes acknowledged rows in a
  transaction of its own; refused rows stay in the outbox for `Broker.relay`.
- `Fate`: every awaited call of a worker's fakes passes it, so a worker can die at any
  of them. A dead worker's calls never return: nothing it does after that point reaches
  the broker or the database, as with a killed process.
"""

from __future__ import annotations

import asyncio
import selectors
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError

from tests.unit.fake_store import FakeStore
from worker.auth import Partner
from worker.records import Headers, OutboxMessage, Publication
from worker.watermarks import Batch, Watermarks

TOPIC = "cart.abandoned"


# ---------------------------------------------------------------------- time


# Loop iterations without the clock moving after which the loop counts as spinning: a
# task that never waits for time (a retry loop without backoff) would take the CPU forever.
SPIN_LIMIT = 200_000


class Livelock(RuntimeError):
    """The event loop ran SPIN_LIMIT iterations without its clock moving."""


class _InstantSelector(selectors.SelectSelector):
    """Never waits: where the loop would sleep until its next timer, the clock jumps there."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self._spins = 0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            raise RuntimeError("simulation deadlock: nothing is ready and no timer is set")
        ready = super().select(0)
        if not ready and timeout > 0:
            self.now += timeout
            self._spins = 0
        else:
            self._spins += 1
            if self._spins > SPIN_LIMIT:
                self._spins = 0
                raise Livelock(f"the loop spun {SPIN_LIMIT} times at t={self.now:.3f}s")
        return ready


class VirtualClockLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self._clock = _InstantSelector()
        super().__init__(self._clock)

    def time(self) -> float:
        return self._clock.now


# ---------------------------------------------------------------------- dying


class Fate:
    """Where one worker process may die: after `countdown` more awaited calls."""

    def __init__(self, name: str, tally: Counter[str]) -> None:
        self.name = name
        self.countdown: int | None = None
        self.dead = False
        self._tally = tally

    async def step(self, what: str) -> None:
        await asyncio.sleep(0)  # every call is a point where other tasks run
        if not self.dead and self.countdown is not None:
            self.countdown -= 1
            if self.countdown <= 0:
                self.dead = True
                self._tally[f"crash at {what}"] += 1
        if self.dead:
            await asyncio.Future()  # the process is gone: this call never returns


# ---------------------------------------------------------------------- Kafka


@dataclass(frozen=True, slots=True)
class Record:
    """A record in a partition (`consumer.FetchedRecord`)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp: int
    unreadable: bool = False  # the client raises UnicodeDecodeError on it


class Broker:
    def __init__(self, partitions: int, rebalance_timeout_s: float, tally: Counter[str]) -> None:
        self.partitions = [TopicPartition(TOPIC, p) for p in range(partitions)]
        self.logs: dict[TopicPartition, list[Record]] = {tp: [] for tp in self.partitions}
        self.committed: dict[TopicPartition, int] = {}  # the group's Kafka offsets
        self.generation = 0
        self.members: list[Source] = []
        self.published: dict[int, OutboxMessage] = {}  # by outbox id
        # Fresh results (no outbox row), as (key, payload, headers): how often acknowledged.
        self.fresh: Counter[tuple[bytes | None, bytes | None, Headers]] = Counter()
        self.refusals = 0  # the next sends the broker refuses (an outage)
        self.max_message_bytes = 1 << 30
        self._rebalance_timeout_s = rebalance_timeout_s
        self._rebalance_wanted = False
        self._rebalancing: asyncio.Task[None] | None = None
        self.listener_failures: list[str] = []  # rebalance callbacks that raised
        self._tally = tally

    def produce(self, partition: int, gap: int, record: Callable[[int], Record]) -> Record:
        tp = self.partitions[partition]
        log = self.logs[tp]
        offset = (log[-1].offset + 1 if log else 0) + gap
        log.append(record(offset))
        return log[-1]

    def highwater(self, tp: TopicPartition) -> int:
        log = self.logs[tp]
        return log[-1].offset + 1 if log else 0

    def records(self) -> Iterable[Record]:
        for log in self.logs.values():
            yield from log

    # ------------------------------------------------------------------ the group

    def join(self, member: Source) -> None:
        self.members.append(member)
        self.rebalance()

    def leave(self, member: Source) -> None:
        if member in self.members:
            self.members.remove(member)
            member.drop_assignment()
            self.rebalance()

    def rebalance(self) -> None:
        self._rebalance_wanted = True
        if self._rebalancing is None or self._rebalancing.done():
            self._rebalancing = asyncio.get_running_loop().create_task(self._rebalance_loop())

    async def _rebalance_loop(self) -> None:
        while self._rebalance_wanted:
            self._rebalance_wanted = False
            await self._rebalance_once()

    async def _rebalance_once(self) -> None:
        self._tally["rebalances"] += 1
        members = list(self.members)
        # aiokafka calls on_partitions_revoked with the old generation still valid; a
        # member that overruns the rebalance timeout is expelled from the group.
        revokes = {m: m.track(m.revoke()) for m in members}
        if revokes:
            _, late = await asyncio.wait(revokes.values(), timeout=self._rebalance_timeout_s)
            for m, task in revokes.items():
                if task in late and m in self.members:
                    self._tally["members expelled"] += 1
                    self.members.remove(m)
                    m.expelled(task, self)
        self.generation += 1
        members = sorted(self.members, key=lambda m: m.name)
        shares: dict[Source, set[TopicPartition]] = {m: set() for m in members}
        for n, tp in enumerate(self.partitions):
            if members:
                shares[members[n % len(members)]].add(tp)
        # Each member runs its callback in its own task: a stuck one holds up only itself.
        for m, share in shares.items():
            m.track(m.assign(share, self.generation))

    async def commit(self, member: Source, offsets: Mapping[TopicPartition, int]) -> None:
        if member.generation != self.generation or member not in self.members:
            raise CommitFailedError("the group rebalanced")
        self.committed.update(offsets)


class Source:
    """One worker's consumer (`consumer.KafkaSource`)."""

    def __init__(self, broker: Broker, name: str, fate: Fate) -> None:
        self.name = name
        self.generation = -1
        self._broker = broker
        self._fate = fate
        self._listener: ConsumerRebalanceListener | None = None
        self._assignment: set[TopicPartition] = set()
        self._positions: dict[TopicPartition, int] = {}
        self._paused: set[TopicPartition] = set()
        self._assigned = asyncio.Event()
        self._callbacks = asyncio.Lock()  # aiokafka calls them one at a time, from one task
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = False

    def subscribe(self, listener: ConsumerRebalanceListener) -> None:
        self._listener = listener
        self._broker.join(self)

    def close(self) -> None:
        """Leave the group; a rebalance callback still running is cancelled (as
        `AIOKafkaConsumer.stop` cancels its coordinator)."""
        self.closed = True
        for task in list(self._tasks):
            task.cancel()
        self._broker.leave(self)

    def track(self, callback: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run a rebalance callback in this member's coordinator (its own task)."""
        task = asyncio.get_running_loop().create_task(callback)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------------ group callbacks

    async def revoke(self) -> None:
        assert self._listener is not None
        async with self._callbacks:  # after the member's previous callback, as in aiokafka
            # A rebalance began: aiokafka's begin_reassignment, before the revoke callback.
            self._assigned.clear()
            await self._fate.step("on_partitions_revoked")
            try:
                await self._listener.on_partitions_revoked(set(self._assignment))
            except Exception as error:  # aiokafka logs it and carries on
                self._broker.listener_failures.append(f"{self.name} on revoke: {error!r}")

    def expelled(self, late_revoke: asyncio.Future[None], broker: Broker) -> None:
        """Out of the group; it rejoins (a new rebalance) once its revoke callback returns."""

        def rejoin(_: object) -> None:
            if not (self._fate.dead or self.closed):
                broker.join(self)

        late_revoke.add_done_callback(rejoin)

    def drop_assignment(self) -> None:
        self._assignment = set()
        self._assigned.set()

    async def assign(self, partitions: set[TopicPartition], generation: int) -> None:
        assert self._listener is not None
        async with self._callbacks:
            self.generation = generation
            self._assignment = set(partitions)
            self._paused = set()  # aiokafka starts a new assignment unpaused
            self._positions = {tp: self._broker.committed.get(tp, 0) for tp in partitions}
            # As aiokafka (assign_from_subscribed): fetching resumes before the callback ran.
            self._assigned.set()
            await self._fate.step("on_partitions_assigned")
            try:
                await self._listener.on_partitions_assigned(set(partitions))
            except Exception as error:  # aiokafka logs it and carries on
                self._broker.listener_failures.append(f"{self.name} on assign: {error!r}")

    # ------------------------------------------------------------------ KafkaSource

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[Record]]:
        await self._fate.step("getmany")
        await self._assigned.wait()  # aiokafka waits for a new assignment without bound
        wanted = sorted(set(partitions or self._assignment) & self._assignment - self._paused)
        budget = max_records if max_records is not None else 1 << 30
        fetched: dict[TopicPartition, list[Record]] = {}
        for tp in wanted:
            position = self._positions[tp]
            taken = []
            for record in self._broker.logs[tp]:
                if record.offset < position or budget == 0:
                    continue
                if record.unreadable:
                    # Like aiokafka: the partitions drained before this one have moved on,
                    # and their records are not returned.
                    raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
                taken.append(record)
                budget -= 1
            if taken:
                fetched[tp] = taken
                self._positions[tp] = taken[-1].offset + 1
        if not fetched:
            await asyncio.sleep(timeout_ms / 1000)
        return fetched

    def seek(self, partition: TopicPartition, offset: int) -> None:
        assert partition in self._assignment, "seek on a partition not assigned"
        self._positions[partition] = offset

    async def position(self, partition: TopicPartition) -> int:
        await self._fate.step("position")
        return self._positions[partition]

    def pause(self, *partitions: TopicPartition) -> None:
        self._paused |= set(partitions) & self._assignment

    def resume(self, *partitions: TopicPartition) -> None:
        self._paused -= set(partitions)

    def paused(self) -> set[TopicPartition]:
        return set(self._paused)

    def assignment(self) -> set[TopicPartition]:
        return set(self._assignment)

    def highwater(self, partition: TopicPartition) -> int | None:
        return self._broker.highwater(partition)

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        await self._fate.step("commit")
        await self._broker.commit(self, offsets)


# ---------------------------------------------------------------------- PostgreSQL


# The errors a real server sends for each injected fault (public asyncpg error types).
DB_FAULTS: dict[str, Callable[[], Exception]] = {
    "outage": lambda: asyncpg.exceptions.ConnectionDoesNotExistError(
        "connection was closed in the middle of operation"
    ),
    "lock_timeout": lambda: asyncpg.exceptions.LockNotAvailableError(
        "canceling statement due to lock timeout"
    ),
    "serialization_failure": lambda: asyncpg.exceptions.SerializationError(
        "could not serialize access due to concurrent update"
    ),
    "deadlock": lambda: asyncpg.exceptions.DeadlockDetectedError("deadlock detected"),
}


# The statements that take row locks: only they can wait for a lock, time out on it, or
# be chosen as a deadlock or serialisation victim. An outage can strike any call.
LOCKING = {
    "lock_offsets",
    "release",
    "record_inbox",
    "advance_offsets",
    "delete_outbox",
}


class Database:
    def __init__(self, state: FakeStore, partners: Sequence[Partner], tally: Counter[str]) -> None:
        self.state = state
        self.partners = list(partners)
        self.lock = asyncio.Lock()
        self.faults: deque[tuple[int, str]] = deque()  # (calls to let pass first, kind)
        self._tally = tally

    def inject(self, kind: str, after_calls: int) -> None:
        self.faults.append((after_calls, kind))

    async def call(self, fate: Fate, what: str) -> None:
        """Every awaited database call of a worker passes here."""
        await fate.step(what)
        if not self.faults:
            return
        wait, kind = self.faults[0]
        if kind != "outage" and what not in LOCKING:
            return
        if wait > 0:
            self.faults[0] = (wait - 1, kind)
            return
        self.faults.popleft()
        self._tally[f"db {kind}"] += 1
        raise DB_FAULTS[kind]()

    @asynccontextmanager
    async def transaction(self, fate: Fate) -> AsyncIterator[FakeStore]:
        await self.call(fate, "begin")
        async with self.lock:
            work = self.state.copy()

            async def checkpoint(what: str) -> None:
                await self.call(fate, what)

            work.checkpoint = checkpoint
            yield work
            try:
                await self.call(fate, "commit")
            except asyncpg.exceptions.PostgresConnectionError:
                # The connection broke during COMMIT: the server had committed, the answer
                # was lost (the caller cannot tell, and retries).
                self.state = work
                raise
            self.state = work

    def stored_offsets(self, topic: str) -> dict[int, int]:
        return {p: n for (t, p), n in self.state.offsets.items() if t == topic}


class Transactions:
    """`release.Transactions` over the fake database, for one worker, whose offset UPDATEs
    carry the published watermark it claims (as `store.PgTransactions`)."""

    def __init__(self, db: Database, fate: Fate, watermarks: Watermarks) -> None:
        self._db = db
        self._fate = fate
        self._watermarks = watermarks

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[FakeStore]:
        async with self._db.transaction(self._fate) as work:
            work.claim = self._watermarks.claim
            yield work


# ---------------------------------------------------------------------- publishing


class Publisher:
    """A fake `consumer.ResultPublisher` with the real one's promise: a refused or lost
    send leaves the row in the outbox, an acknowledged one is deleted afterwards."""

    def __init__(
        self, broker: Broker, db: Database, fate: Fate, tally: Counter[str], results_topic: str
    ) -> None:
        self._broker = broker
        self._db = db
        self._fate = fate
        self._tally = tally
        self._results_topic = results_topic
        self._inflight: set[asyncio.Task[None]] = set()
        self.watermarks = Watermarks()  # the real books

    # Fresh results: stored in the inbox only, published from memory, and republished from
    # the inbox when not known acknowledged (publisher.Publisher's promise).

    async def publish_fresh(self, publications: Sequence[Publication]) -> None:
        self.watermarks.claims_committed([(p.topic, p.partition) for p in publications])
        for pub in publications:
            batch = self.watermarks.committed(
                (pub.topic, pub.partition), pub.start, pub.end, len(pub.messages)
            )
            if not pub.messages:
                continue
            await self._fate.step("publish_fresh")
            ok = send_fresh(self._broker, pub.messages, self._tally)
            task = asyncio.get_running_loop().create_task(self._settle(batch, ok))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _settle(self, batch: Batch, ok: bool) -> None:
        await asyncio.sleep(0.01)  # the broker's acknowledgement
        self.watermarks.settled(batch, failed=not ok)

    async def catch_up(self, tp: tuple[str, int]) -> bool:
        start = self.watermarks.covered(tp)
        if start is None:
            return True
        await self._db.call(self._fate, "publication_state")
        state = self._db.state
        self.watermarks.adopt(tp, state.published_offsets.get(tp, 0))
        start = self.watermarks.covered(tp)
        assert start is not None
        end = state.offsets.get(tp, 0)
        await self._db.call(self._fate, "stored_range")
        rows = self._db.state.stored_range(tp, start, end)
        messages = [
            OutboxMessage(self._results_topic, stored.cart_id.encode(), p, stored.headers or ())
            for _, stored in rows
            for p in stored.results or []
        ]
        if messages:
            await self._fate.step("republish")
            if not send_fresh(self._broker, messages, self._tally):
                return False
            await asyncio.sleep(0.01)  # the acknowledgements
            self._tally["republished"] += len(messages)
        self.watermarks.caught_up(tp, start, end)
        await self.store_watermarks([tp])
        return True

    async def store_watermarks(self, partitions: Sequence[tuple[str, int]] | None = None) -> None:
        marks = self.watermarks.to_store(None if partitions is None else list(partitions))
        if marks:
            async with self._db.transaction(self._fate) as state:
                await self._db.call(self._fate, "store_published")
                state.store_published(marks)
            self.watermarks.stored(marks)

    async def recover(self, partitions: Sequence[tuple[str, int]], timeout_s: float) -> None:
        for tp in partitions:
            self.watermarks.assign((tp[0], tp[1]), 0)
        try:
            async with asyncio.timeout(timeout_s):
                for tp in sorted(partitions):
                    await self.catch_up((tp[0], tp[1]))
        except (asyncpg.PostgresError, TimeoutError):
            self._tally["republish deferred"] += 1

    async def release(self, partitions: Sequence[tuple[str, int]], timeout_s: float) -> None:
        try:
            async with asyncio.timeout(max(0.1, timeout_s)):
                await self.store_watermarks([(tp[0], tp[1]) for tp in partitions])
        except (asyncpg.PostgresError, TimeoutError):
            self._tally["watermark not stored"] += 1
        for tp in partitions:
            self.watermarks.forget((tp[0], tp[1]))

    async def run_watermarks(self) -> None:
        """The periodic pass (`publisher.Publisher.run_watermarks`)."""
        while True:
            await asyncio.sleep(1.0)
            try:
                for tp in self.watermarks.gapped():
                    await self.catch_up(tp)
                await self.store_watermarks()
            except asyncpg.PostgresError:
                self._tally["watermark pass failed"] += 1

    async def publish(self, messages: Sequence[OutboxMessage]) -> None:
        if not messages:
            return
        await self._fate.step("publish")
        acked = send(self._broker, messages, self._tally)
        task = asyncio.get_running_loop().create_task(self._delete(acked))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _delete(self, ids: list[int]) -> None:
        await asyncio.sleep(0.01)  # the broker's acknowledgement
        if not ids:
            return
        try:
            async with self._db.transaction(self._fate) as state:
                await self._db.call(self._fate, "delete_outbox")
                state.delete_outbox(ids)
        except asyncpg.PostgresError:
            # As the real deleter: the rows stay, the relay may send them again (same bytes).
            self._tally["outbox delete failed"] += 1

    async def flush(self, timeout_s: float) -> None:
        if self._inflight:
            await asyncio.wait(list(self._inflight), timeout=timeout_s)

    def abandon(self) -> None:
        for task in self._inflight:
            task.cancel()


def send_fresh(broker: Broker, messages: Iterable[OutboxMessage], tally: Counter[str]) -> bool:
    """Hand fresh results (no outbox row) to the broker; whether it acknowledged them all
    (a refusal fails the rest: the real producer's batch to the partition fails whole)."""
    for m in messages:
        if broker.refusals > 0:
            broker.refusals -= 1
            tally["publish refused"] += 1
            return False
        triple = (m.key, m.payload, m.headers)
        if broker.fresh[triple]:
            tally["published again"] += 1
        broker.fresh[triple] += 1
    return True


def send(broker: Broker, messages: Iterable[OutboxMessage], tally: Counter[str]) -> list[int]:
    """Hand messages to the broker; return the outbox ids it acknowledged."""
    acked = []
    for m in messages:
        assert m.outbox_id is not None, "only outbox rows are published"
        if broker.refusals > 0:
            broker.refusals -= 1
            tally["publish refused"] += 1
            continue
        if len(m.payload or b"") > broker.max_message_bytes:
            tally["publish too large"] += 1
            continue
        if m.outbox_id in broker.published:
            tally["published again"] += 1
        broker.published[m.outbox_id] = m
        acked.append(m.outbox_id)
    return acked


async def relay(broker: Broker, db: Database, tally: Counter[str]) -> None:
    """The outbox relay's pass: publish leftover rows, delete what was acknowledged."""
    async with db.lock:
        acked = send(broker, db.state.outbox, tally)
        db.state.delete_outbox(acked)
