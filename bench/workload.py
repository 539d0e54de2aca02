"""What the bench offers: scenarios, their seed data, their events, and producing them."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg
from aiokafka import AIOKafkaProducer

from worker.config import Settings
from worker.operator_store import add_partner
from worker.testing.scenario import Event, abandon_event
from worker.testing.store import seed_reservations, seed_stock
from worker.testing.topics import ensure_topics

PARTITIONS = 12


@dataclass(frozen=True)
class Scenario:
    """A kind of traffic: `records` abandon events of `items_per_cart` reservations each."""

    name: str
    records: int
    items_per_cart: int = 3
    skus: int = 10_000
    whole_cart: bool = False
    description: str = ""

    @property
    def items(self) -> int:
        return self.records * self.items_per_cart

    def sized(self, records: int) -> Scenario:
        return Scenario(
            self.name, records, self.items_per_cart, self.skus, self.whole_cart, self.description
        )


@dataclass
class Workload:
    """Seeded reservations and the events that release them, ready to produce."""

    scenario: Scenario
    partner_id: str
    prefix: str
    events: list[Event]
    event_ids: list[str]

    @property
    def expected_items(self) -> int:
        return len(self.events) * self.scenario.items_per_cart


async def prepare(pool: asyncpg.Pool, scenario: Scenario, records: int | None = None) -> Workload:
    """Seed a fresh partner, stock and `records` carts of reserved items (COPY), and build
    one event per cart releasing all its items."""
    count = scenario.records if records is None else records
    tag = uuid.uuid4().hex[:8]
    partner_id, prefix = f"bench-{tag}", f"{tag}-"
    api_key = await add_partner(pool, partner_id, "Bench partner", ["tag-1"])
    skus = [f"{prefix}sku-{n}" for n in range(scenario.skus)]
    async with pool.acquire() as conn, conn.transaction():
        await seed_stock(conn, skus, on_hand=10_000_000)
        seed = await seed_reservations(
            conn, partner_id, count, scenario.items_per_cart, skus, prefix=prefix
        )
    await vacuum_analyze(pool)
    events, event_ids = [], []
    for cart_id, rows in seed.carts(partner_id).items():
        event_id = f"{prefix}event-{cart_id}"
        items = None if scenario.whole_cart else [(r.cart_item_id, r.reservation_id) for r in rows]
        events.append(abandon_event(cart_id, items, api_key, event_id=event_id))
        event_ids.append(event_id)
    return Workload(scenario, partner_id, prefix, events, event_ids)


# Every table a run writes. Vacuumed and analysed after seeding, before anything is measured.
_TABLES = "reservations, stock, inbox, outbox, consumer_offsets, partners"


async def vacuum_analyze(pool: asyncpg.Pool) -> None:
    """Setup, not measurement: statistics that describe the freshly seeded rows (right after
    a bulk COPY the planner would still see the tables as they were before it), and the
    earlier runs' dead rows cleared, so neither a stale plan nor autovacuum catching up with
    someone else's writes is charged to the system measured next."""
    await pool.execute(f"VACUUM (ANALYZE) {_TABLES}")


def topic_settings(base: Settings, name: str) -> Settings:
    """`base` with topics and a consumer group of this run's own."""
    tag = f"{name}-{uuid.uuid4().hex[:6]}"
    return base.model_copy(
        update={
            "input_topic": f"bench.{tag}.in",
            "results_topic": f"bench.{tag}.results",
            "dlq_topic": f"bench.{tag}.dlq",
            "group_id": f"bench-{tag}",
        }
    )


async def create_topics(settings: Settings) -> None:
    await ensure_topics(settings, PARTITIONS)


def make_producer(bootstrap: str) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=512 * 1024, acks=1
    )


class Sender(Protocol):
    """What `produce` needs of a producer (`AIOKafkaProducer.send`)."""

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: Sequence[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[Any]: ...


async def produce(
    producer: Sender,
    topic: str,
    workload: Workload,
    indexes: range,
    sent_at: dict[str, int],
    rate: float | None = None,
) -> None:
    """Produce the workload's events `indexes`, noting each one's timestamp (ms) in `sent_at`
    as it goes. `rate` None: as fast as the client can, each stamped when it is sent. Else
    open loop at `rate` records/s, whatever the consumer does, scheduled against the clock
    in 5 ms ticks so a slow tick is caught up rather than lowering the offered rate; each
    record is stamped with the time it was due (`started + k / rate`), not the time it went
    out, so a stall of the producer or of this loop counts in the latency (no coordinated
    omission), as in the HTTP bench (`bench.http.offer`)."""
    futures = []
    started = time.monotonic()
    started_ms = time.time() * 1000
    position = indexes.start
    while position < indexes.stop:
        due = indexes.stop
        if rate is not None:
            due = min(due, indexes.start + int((time.monotonic() - started) * rate) + 1)
        while position < due:
            e = workload.events[position]
            if rate is None:
                stamp_ms = int(time.time() * 1000)
            else:
                stamp_ms = int(started_ms + (position - indexes.start) * 1000 / rate)
            sent_at[workload.event_ids[position]] = stamp_ms
            futures.append(
                await producer.send(
                    topic, e.value, key=e.key, headers=list(e.headers), timestamp_ms=stamp_ms
                )
            )
            position += 1
        if rate is not None:
            await asyncio.sleep(0.005)
    await asyncio.gather(*futures)
