"""The relay isolates a message the broker refuses for good (DESIGN.md §7, issue 9 finding 2).

Real PostgreSQL (the worker's least-privilege login); the producer is a fake of the
publisher's own `Producer` Protocol that refuses chosen messages the way aiokafka does:
in `send` itself (the client's own size check) or in the returned future (the broker's
answer). Only rows of this test's topics are acknowledged; anything else in the shared
outbox gets an outage error, which leaves it untouched.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    MessageSizeTooLargeError,
    RequestTimedOutError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)
from prometheus_client import REGISTRY

from tests.conftest import Servers
from worker import store
from worker.cli.doctor import check_database
from worker.config import Settings
from worker.publisher import Publisher, RecordBatch
from worker.records import OutboxMessage, Publication
from worker.results import message_bytes

pytestmark = pytest.mark.integration


class FakeBatch:
    """A batch of the fake producer: full at `capacity` messages (the first always fits)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.messages: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]]]] = []
        self.closed = False

    def append(
        self,
        *,
        timestamp: int | None,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes | None]],
    ) -> object | None:
        if self.closed or (self.messages and len(self.messages) >= self.capacity):
            self.closed = True
            return None
        self.messages.append((key, value, list(headers)))
        return len(self.messages)

    def close(self) -> None:
        self.closed = True


class RefusingProducer:
    """Acknowledges every message of `topics`, except the refusals it was given.

    `written` counts the messages it acknowledged (what the topic holds), `refusals` the
    refusals it answered, per value. A refusal `in_send` is the client's own (`send`
    raises); otherwise it is the broker's answer, which for a batch is the whole batch's:
    a batch holding a refused message is refused as a whole, nothing of it is written."""

    def __init__(
        self,
        topics: set[str],
        refuse: dict[bytes, KafkaError],
        in_send: bool,
        batch_capacity: int = 1000,
        max_request_size: int = 1_048_588,
    ) -> None:
        self.topics = topics
        self.max_request_size = max_request_size
        self.refuse = refuse
        self.in_send = in_send
        self.batch_capacity = batch_capacity
        self.written: Counter[bytes] = Counter()
        self.refusals: Counter[bytes] = Counter()
        self.batches: list[tuple[str, int, list[bytes]]] = []  # acknowledged, in order
        self.missing: set[str] = set()

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        headers: list[tuple[str, bytes | None]] | None = None,
    ) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if topic not in self.topics:
            future.set_exception(KafkaConnectionError("not this test's row"))
            return future
        assert value is not None
        if message_bytes(key, value, tuple(headers or ())) > self.max_request_size:
            self.refusals[value] += 1
            raise MessageSizeTooLargeError()  # aiokafka's own check in `send`
        error = self.refuse.get(value)
        if error is not None:
            self.refusals[value] += 1
            if self.in_send:
                raise error
            future.set_exception(error)
        else:
            self.written[value] += 1
            future.set_result(None)
        return future

    def create_batch(self) -> FakeBatch:
        return FakeBatch(self.batch_capacity)

    async def send_batch(
        self, batch: RecordBatch, topic: str, *, partition: int
    ) -> asyncio.Future[Any]:
        assert isinstance(batch, FakeBatch)
        assert batch.closed, "a batch is closed before it is sent"
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        values = [value or b"" for _, value, _ in batch.messages]
        if topic not in self.topics:
            future.set_exception(KafkaConnectionError("not this test's row"))
            return future
        errors = [self.refuse[v] for v in values if v in self.refuse]
        if errors:
            for v in values:
                if v in self.refuse:
                    self.refusals[v] += 1
            future.set_exception(errors[0])
            return future
        self.written.update(values)
        self.batches.append((topic, partition, values))
        future.set_result(None)
        return future

    async def partitions_for(self, topic: str) -> set[int]:
        if topic in self.missing:
            raise UnknownTopicOrPartitionError()
        return {0}

    async def flush(self) -> None:
        return None


def _latency_samples() -> tuple[float, float]:
    """The record->result latency histogram's count and sum so far."""
    count = REGISTRY.get_sample_value("release_worker_record_latency_seconds_count")
    total = REGISTRY.get_sample_value("release_worker_record_latency_seconds_sum")
    return count or 0.0, total or 0.0


@pytest.fixture
async def worker_pool(servers: Servers) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(servers.worker_database_url, min_size=1, max_size=2)
    yield pool
    await pool.close()


@pytest.fixture
async def topics(db: asyncpg.Pool) -> AsyncIterator[tuple[str, str]]:
    tag = uuid.uuid4().hex[:8]
    results, dlq = f"results-{tag}", f"dlq-{tag}"
    yield results, dlq
    # Parked rows stay for an operator; a test's own are removed so `doctor` stays clean.
    await db.execute("DELETE FROM outbox WHERE topic = ANY($1::text[])", [results, dlq])


async def left(db: asyncpg.Pool, topics: tuple[str, str]) -> list[tuple[bytes, str | None]]:
    rows = await db.fetch(
        "SELECT payload, park_reason FROM outbox WHERE topic = ANY($1::text[]) ORDER BY id",
        list(topics),
    )
    return [(bytes(r[0]), r[1]) for r in rows]


async def enqueue(pool: asyncpg.Pool, messages: list[OutboxMessage]) -> None:
    async with pool.acquire() as conn:
        await store.enqueue(conn, messages)


def rows(topics: tuple[str, str], refused: bytes) -> list[OutboxMessage]:
    """Good rows, the refused one, and more good rows behind it: results and dead letters."""
    before = [OutboxMessage(topics[n % 2], b"k", f"before-{n}".encode()) for n in range(20)]
    after = [OutboxMessage(topics[n % 2], b"k", f"after-{n}".encode()) for n in range(20)]
    return [*before, OutboxMessage(topics[1], b"k", refused), *after]


@pytest.mark.parametrize("in_send", [True, False], ids=["refused_by_client", "refused_by_broker"])
@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (MessageSizeTooLargeError(), "too_large"),
        (TopicAuthorizationFailedError(), "not_authorized"),
    ],
)
async def test_a_refused_row_is_parked_and_the_rows_around_it_are_published(
    servers: Servers,
    worker_pool: asyncpg.Pool,
    db: asyncpg.Pool,
    topics: tuple[str, str],
    error: KafkaError,
    reason: str,
    in_send: bool,
) -> None:
    messages = rows(topics, b"refused")
    producer = RefusingProducer(set(topics), {b"refused": error}, in_send)
    await enqueue(worker_pool, messages)
    publisher = Publisher(producer, worker_pool, relay_interval_s=1, relay_grace_s=0)

    await publisher.relay_once(grace_s=0)

    assert await left(db, topics) == [(b"refused", reason)]
    good = [m.payload for m in messages if m.payload != b"refused"]
    assert all(producer.written[p or b""] == 1 for p in good)
    assert producer.written[b"refused"] == 0
    attempts = producer.refusals[b"refused"]
    await publisher.relay_once(grace_s=0)
    assert producer.refusals[b"refused"] == attempts, "a parked row is never re-sent"
    assert await left(db, topics) == [(b"refused", reason)]

    outbox = (await check_database(Settings(database_url=servers.worker_database_url)))[-1]
    assert outbox.name == "outbox"
    assert outbox.ok
    assert outbox.attention
    assert f"{reason} ×" in outbox.detail


async def test_an_outage_parks_nothing_the_row_waits_and_goes_out_later(
    worker_pool: asyncpg.Pool, db: asyncpg.Pool, topics: tuple[str, str]
) -> None:
    messages = rows(topics, b"unlucky")
    producer = RefusingProducer(set(topics), {b"unlucky": RequestTimedOutError()}, False)
    await enqueue(worker_pool, messages)
    publisher = Publisher(producer, worker_pool, relay_interval_s=1, relay_grace_s=0)

    await publisher.relay_once(grace_s=0)
    assert await left(db, topics) == [(b"unlucky", None)]

    producer.refuse.clear()
    await publisher.relay_once(grace_s=0)
    assert await left(db, topics) == []


def refusing(topics: tuple[str, str], by: str) -> tuple[RefusingProducer, int, bytes]:
    """A producer that refuses one message for good, by the client's size check (the
    message is over the limit: the publisher's own check for a batch, aiokafka's in `send`)
    or in the broker's answer; the limit to give the publisher; the refused payload."""
    if by == "client":
        limit = 16_384
        return RefusingProducer(set(topics), {}, False, max_request_size=limit), limit, b"x" * limit
    refused = b"refused"
    return (
        RefusingProducer(set(topics), {refused: MessageSizeTooLargeError()}, False),
        1 << 20,
        refused,
    )


@pytest.mark.parametrize("by", ["client", "broker"], ids=["refused_by_client", "refused_by_broker"])
async def test_the_fast_path_sends_past_a_refused_message_and_leaves_it_to_the_relay(
    worker_pool: asyncpg.Pool, db: asyncpg.Pool, topics: tuple[str, str], by: str
) -> None:
    producer, limit, refused = refusing(topics, by)
    async with worker_pool.acquire() as conn:
        messages = await store.enqueue(conn, rows(topics, refused))
    publisher = Publisher(
        producer, worker_pool, relay_interval_s=1, relay_grace_s=0, max_message_bytes=limit
    )

    await publisher.publish(messages)
    await publisher.flush(10)

    assert await left(db, topics) == [(refused, None)], "the others are published, once"
    assert all(producer.written[m.payload or b""] == 1 for m in messages if m.payload != refused)
    assert producer.written[refused] == 0
    assert publisher.healthy, "one message's refusal says nothing about the broker"
    await publisher.relay_once(grace_s=0)
    assert await left(db, topics) == [(refused, "too_large")]


async def test_rows_of_a_missing_topic_wait_without_holding_up_the_others(
    worker_pool: asyncpg.Pool, db: asyncpg.Pool, topics: tuple[str, str]
) -> None:
    producer = RefusingProducer(set(topics), {}, in_send=False)
    producer.missing = {topics[0]}
    await enqueue(worker_pool, rows(topics, b"dead letter"))
    publisher = Publisher(producer, worker_pool, relay_interval_s=1, relay_grace_s=0)

    await publisher.relay_once(grace_s=0)
    waiting = await left(db, topics)
    assert len(waiting) == 20, "the results topic's rows wait, unparked"
    assert all(reason is None for _, reason in waiting)
    assert producer.written[b"dead letter"] == 1

    producer.missing.clear()
    await publisher.relay_once(grace_s=0)
    assert await left(db, topics) == []


async def test_readiness_returns_once_the_relay_publishes_after_a_fast_path_outage(
    worker_pool: asyncpg.Pool, db: asyncpg.Pool, topics: tuple[str, str]
) -> None:
    """Finding 7: only a fast-path success reset `healthy`, so without new traffic the
    worker stayed not ready for ever after one outage."""
    producer = RefusingProducer(set(), {}, in_send=False)  # every send meets an outage
    async with worker_pool.acquire() as conn:
        messages = await store.enqueue(conn, rows(topics, b"refused"))
    publisher = Publisher(producer, worker_pool, relay_interval_s=1, relay_grace_s=0)
    await publisher.publish(messages)
    await publisher.flush(10)
    assert not publisher.healthy
    producer.topics = set(topics)  # the broker is back; no new records arrive
    await publisher.relay_once(grace_s=0)
    assert await left(db, topics) == []
    assert publisher.healthy


@pytest.mark.parametrize("by", ["client", "broker"], ids=["refused_by_client", "refused_by_broker"])
async def test_a_fresh_result_refused_for_good_is_parked_and_the_watermark_passes_it(
    worker_pool: asyncpg.Pool, db: asyncpg.Pool, topics: tuple[str, str], by: str
) -> None:
    # A fresh apply's results live only in the inbox; one the broker refuses for good must
    # not hold back the partition's watermark (retried forever): it becomes a parked
    # outbox row, byte for byte, and `outbox retry` takes it from there (DESIGN.md §7).
    # Refused by the broker, it takes its whole batch down: the neighbours are sent again,
    # each alone, and only its own refusal parks it.
    producer, limit, refused = refusing(topics, by)
    publisher = Publisher(
        producer, worker_pool, relay_interval_s=1, relay_grace_s=0, max_message_bytes=limit
    )
    tp = (f"in-{topics[0]}", 0)
    publisher.watermarks.assign(tp, 0)
    publisher.watermarks.caught_up(tp, 0, 0)
    headers = (("h", b"v"), ("none", None))
    consumed_ms = int(time.time() * 1000) - 2000  # the input record's timestamp
    messages = [
        OutboxMessage(topics[0], b"cart", payload, headers, None, consumed_ms)
        for payload in (b"before", refused, b"after")
    ]
    latencies = _latency_samples()

    await publisher.publish_fresh([Publication(tp[0], tp[1], 0, 3, messages)])
    await publisher.flush(10)

    # One latency observed per acknowledged result (not the refused one), about 2 s each.
    count, total = (now - then for now, then in zip(_latency_samples(), latencies, strict=True))
    assert count == 2
    assert 2 * 2.0 <= total < 2 * 60

    assert await left(db, topics) == [(refused, "too_large")]
    row = await db.fetchrow("SELECT key, headers FROM outbox WHERE topic = $1", topics[0])
    assert row is not None
    assert bytes(row["key"]) == b"cart"
    assert store.decode_headers(row["headers"]) == headers
    assert publisher.watermarks.covered(tp) == 3, "the refusal does not hold the watermark"
    assert publisher.watermarks.gapped() == []
    assert producer.written == Counter({b"before": 1, b"after": 1})
    refusals = producer.refusals[refused]
    await publisher.relay_once(grace_s=0)
    assert producer.refusals[refused] == refusals, "never re-sent"
    assert producer.written == Counter({b"before": 1, b"after": 1})


async def test_fresh_results_go_out_in_batches_that_roll_over_when_full_in_key_order(
    worker_pool: asyncpg.Pool, topics: tuple[str, str]
) -> None:
    # One batch per results partition; a full batch is sent and the next one started.
    # The fake has one partition, so every message shares it: their order in the batches
    # is the order of the publications, as one cart's results must stay (G4).
    producer = RefusingProducer(set(topics), {}, False, batch_capacity=2)
    publisher = Publisher(producer, worker_pool, relay_interval_s=1, relay_grace_s=0)
    publications = []
    for partition in (0, 1):
        tp = (f"in-{topics[0]}", partition)
        publisher.watermarks.assign(tp, 0)
        publisher.watermarks.caught_up(tp, 0, 0)
        payloads = [f"p{partition}-{n}".encode() for n in range(3)]
        messages = [OutboxMessage(topics[0], f"cart-{partition}".encode(), p) for p in payloads]
        publications.append(Publication(tp[0], partition, 0, 3, messages))

    await publisher.publish_fresh(publications)
    await publisher.flush(10)

    assert [values for _, _, values in producer.batches] == [
        [b"p0-0", b"p0-1"],
        [b"p0-2", b"p1-0"],
        [b"p1-1", b"p1-2"],
    ]
    assert publisher.published == 6
    for partition in (0, 1):
        assert publisher.watermarks.covered((f"in-{topics[0]}", partition)) == 3


async def test_fresh_results_of_a_batch_not_acknowledged_leave_a_gap(
    worker_pool: asyncpg.Pool, topics: tuple[str, str]
) -> None:
    # The broker does not acknowledge (an outage): nothing is parked, the watermark stays
    # before the results, and a catch-up republishes them from the inbox later.
    producer = RefusingProducer(set(), {}, False)  # every answer is an outage
    publisher = Publisher(producer, worker_pool, relay_interval_s=1, relay_grace_s=0)
    tp = (f"in-{topics[0]}", 0)
    publisher.watermarks.assign(tp, 0)
    publisher.watermarks.caught_up(tp, 0, 0)
    messages = [OutboxMessage(topics[0], b"cart", p) for p in (b"a", b"b")]

    await publisher.publish_fresh([Publication(tp[0], tp[1], 0, 2, messages)])
    await publisher.flush(10)

    assert publisher.watermarks.covered(tp) == 0
    assert publisher.watermarks.gapped() == [tp]
    assert not publisher.healthy
    assert producer.refusals == Counter(), "an outage is not re-sent message by message"


async def test_a_refused_fresh_result_that_cannot_be_parked_holds_the_watermark(
    servers: Servers, db: asyncpg.Pool, topics: tuple[str, str]
) -> None:
    # The database is away when the refusal comes: nothing is parked, so the watermark must
    # stay before the result (it is republished, and parked, from the inbox later).
    producer = RefusingProducer(set(topics), {b"refused": MessageSizeTooLargeError()}, False)
    closed = await asyncpg.create_pool(servers.worker_database_url, min_size=1, max_size=1)
    await closed.close()
    publisher = Publisher(producer, closed, relay_interval_s=1, relay_grace_s=0)
    tp = (f"in-{topics[0]}", 0)
    publisher.watermarks.assign(tp, 0)
    publisher.watermarks.caught_up(tp, 0, 0)
    messages = [OutboxMessage(topics[0], b"cart", p) for p in (b"before", b"refused")]

    await publisher.publish_fresh([Publication(tp[0], tp[1], 0, 2, messages)])
    await publisher.flush(10)

    assert await left(db, topics) == []
    assert publisher.watermarks.covered(tp) == 0
    assert publisher.watermarks.gapped() == [tp]
