"""Reservations are read without a lock and claimed by the release UPDATE itself: a row
that leaves `reserved` between the read and the claim is not moved, and the batch is
decided again on fresh reads (I1, I2)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import cast

import asyncpg
import pytest

from tests.integration.conftest import World, reserve
from tests.integration.test_ops import eventually
from worker.errors import TransientError
from worker.records import RawRecord
from worker.release import Accepted, Reservation, apply_batch
from worker.results import Topics
from worker.store import Conn, PgReleaseStore
from worker.testing.scenario import abandon_event
from worker.validate import Limits, ReleaseCommand, parse_record

pytestmark = pytest.mark.integration


class ConfirmedAfterRead(PgReleaseStore):
    """Reads the reservations, then lets the checkout confirm them (committed, on another
    connection) before the batch goes on to claim them."""

    def __init__(self, conn: Conn, group_id: str, db: asyncpg.Pool, first: int = 0) -> None:
        super().__init__(conn, group_id)
        self._db = db
        self._first = first  # confirm only this many rows (0: all)

    async def find_reservations(
        self, explicit: Sequence[tuple[str, str]], carts: Sequence[tuple[str, str]]
    ) -> list[Reservation]:
        rows = await super().find_reservations(explicit, carts)
        async with self._db.acquire() as other, other.transaction():
            for row in rows[: self._first or len(rows)]:
                await other.execute(
                    "UPDATE reservations SET status = 'confirmed' WHERE reservation_id = $1",
                    row.reservation_id,
                )
                await other.execute(
                    "UPDATE stock SET reserved = reserved - $2, on_hand = on_hand - $2 "
                    "WHERE sku = $1",
                    row.sku,
                    row.quantity,
                )
        return rows


async def test_a_reservation_confirmed_after_it_was_read_is_not_released_and_reports_confirmed(
    db: asyncpg.Pool, world: World
) -> None:
    rid, cart = f"r-{world.prefix}", f"c-{world.prefix}"
    await reserve(db, world, rid, cart, "item-1", 2)
    event = abandon_event(cart, [("item-1", rid)], world.api_key, event_id=f"e-{world.prefix}")
    record = RawRecord("in", 0, 0, event.key, event.value, event.headers)
    command = parse_record(record, Limits())
    assert isinstance(command, ReleaseCommand)
    works = [Accepted(record, command, world.partner_id)]
    topics = Topics("results", "dlq")
    group = f"claims-{world.prefix}"

    async with db.acquire() as conn:
        with pytest.raises(TransientError, match="left 'reserved'"):
            async with conn.transaction():
                await apply_batch(ConfirmedAfterRead(conn, group, db), works, topics)
        async with conn.transaction():
            report = await apply_batch(PgReleaseStore(conn, group), works, topics)

    assert report.outcomes == {"confirmed": 1}
    assert report.released_quantity == 0
    row = await db.fetchrow(
        "SELECT r.status, s.reserved, s.on_hand FROM reservations r JOIN stock s USING (sku) "
        "WHERE r.reservation_id = $1",
        rid,
    )
    assert row is not None
    # Confirmed once by the checkout; the release returned nothing to stock (I1, I2).
    assert (row["status"], row["reserved"], row["on_hand"]) == ("confirmed", 0, 998)


async def test_a_partial_claim_rolls_back_the_stock_it_returned_and_decides_again(
    db: asyncpg.Pool, world: World
) -> None:
    """The claim returns the stock of what it moved in the same statement: when it moved
    fewer rows than decided, the batch raises and that stock goes back with the claim."""
    p = world.prefix
    cart = f"c-{p}"
    await reserve(db, world, f"r1-{p}", cart, "item-1", 2)
    await reserve(db, world, f"r2-{p}", cart, "item-2", 3)
    items = [("item-1", f"r1-{p}"), ("item-2", f"r2-{p}")]
    event = abandon_event(cart, items, world.api_key, event_id=f"e-{p}")
    record = RawRecord("in", 0, 0, event.key, event.value, event.headers)
    command = parse_record(record, Limits())
    assert isinstance(command, ReleaseCommand)
    works = [Accepted(record, command, world.partner_id)]
    topics, group = Topics("results", "dlq"), f"claims-{p}"
    stock = "SELECT reserved, on_hand FROM stock WHERE sku = $1"

    async with db.acquire() as conn:
        with pytest.raises(TransientError, match="left 'reserved'"):
            async with conn.transaction():
                await apply_batch(ConfirmedAfterRead(conn, group, db, first=1), works, topics)
        # Only the checkout's confirmation of r1 stands.
        assert tuple(await db.fetchrow(stock, world.sku) or ()) == (3, 998)
        async with conn.transaction():
            report = await apply_batch(PgReleaseStore(conn, group), works, topics)

    assert report.outcomes == {"confirmed": 1, "released": 1}
    assert tuple(await db.fetchrow(stock, world.sku) or ()) == (0, 998)


async def test_find_reservations_reads_each_row_once_in_id_order_and_only_the_partners(
    db: asyncpg.Pool, world: World
) -> None:
    p = world.prefix
    cart, other_cart = f"c-{p}", f"c2-{p}"
    for rid, cart_id, item in (
        (f"b-{p}", cart, "i1"),
        (f"a-{p}", cart, "i2"),
        (f"c-{p}", other_cart, "i1"),
    ):
        await reserve(db, world, rid, cart_id, item, 1)
    await reserve(db, world, f"x-{p}", cart, "i3", 1, partner_id=world.other_partner_id)

    async with db.acquire() as conn:
        rows = await PgReleaseStore(conn, "g").find_reservations(
            # b named by id and by its whole cart, c by id only; x is another partner's.
            [
                (f"b-{p}", world.partner_id),
                (f"c-{p}", world.partner_id),
                (f"x-{p}", world.partner_id),
            ],
            [(world.partner_id, cart)],
        )

    assert [(r.reservation_id, r.cart_id, r.cart_item_id) for r in rows] == [
        (f"a-{p}", cart, "i2"),
        (f"b-{p}", cart, "i1"),
        (f"c-{p}", other_cart, "i1"),
    ]
    assert {r.partner_id for r in rows} == {world.partner_id}
    assert rows[0] == Reservation(
        f"a-{p}", world.partner_id, cart, "i2", world.sku, "default", 1, "reserved", None
    )


async def test_an_event_recorded_by_a_concurrent_transaction_retries_the_batch_as_a_replay(
    db: asyncpg.Pool, world: World
) -> None:
    """Two records of one (partner, eventId) in two partitions, applied at once: the second
    transaction finds the inbox key taken when the first commits, changes nothing and is
    retried; the retry is a replay of the first's results (G3)."""
    p = world.prefix
    works = []
    for partition in (0, 1):
        rid, cart = f"r{partition}-{p}", f"c{partition}-{p}"
        await reserve(db, world, rid, cart, "item-1", 1)
        event = abandon_event(cart, [("item-1", rid)], world.api_key, event_id=f"e-{p}")
        record = RawRecord("in", partition, 0, event.key, event.value, event.headers)
        command = parse_record(record, Limits())
        assert isinstance(command, ReleaseCommand)
        works.append([Accepted(record, command, world.partner_id)])
    topics, group = Topics("results", "dlq"), f"claims-{p}"

    async with db.acquire() as first, db.acquire() as second:
        first_tx = first.transaction()
        await first_tx.start()
        await apply_batch(PgReleaseStore(first, group), works[0], topics, fresh_from_inbox=True)

        async def apply_second() -> None:
            async with second.transaction():
                await apply_batch(
                    PgReleaseStore(second, group), works[1], topics, fresh_from_inbox=True
                )

        racing = asyncio.create_task(apply_second())
        waiting = "SELECT wait_event_type = 'Lock' OR NULL FROM pg_stat_activity WHERE pid = $1"
        await eventually(
            lambda: db.fetchval(waiting, second.get_server_pid()), "the second never waited"
        )
        await first_tx.commit()
        with pytest.raises(TransientError, match="recorded the same event"):
            await racing
        async with second.transaction():
            report = await apply_batch(
                PgReleaseStore(second, group), works[1], topics, fresh_from_inbox=True
            )

    assert report.replays == 1
    assert report.outcomes == {}
    statuses = await db.fetch(
        "SELECT reservation_id, status FROM reservations WHERE reservation_id = ANY($1) "
        "ORDER BY reservation_id",
        [f"r0-{p}", f"r1-{p}"],
    )
    assert [tuple(s) for s in statuses] == [(f"r0-{p}", "released"), (f"r1-{p}", "reserved")]
    assert await db.fetchval("SELECT reserved FROM stock WHERE sku = $1", world.sku) == 1


class _Counting:
    """A connection that counts the statements sent through it."""

    def __init__(self, conn: Conn) -> None:
        self._conn = conn
        self.statements = 0

    async def execute(self, sql: str, *args: object) -> str:
        self.statements += 1
        return await self._conn.execute(sql, *args)

    async def fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        self.statements += 1
        return await self._conn.fetch(sql, *args)


async def test_offset_rows_are_created_once_and_later_batches_lock_them_in_one_statement(
    db: asyncpg.Pool, world: World
) -> None:
    group, partitions = f"offsets-{world.prefix}", [("in", 0), ("in", 1)]
    async with db.acquire() as conn:
        counted = _Counting(conn)
        store = PgReleaseStore(cast(Conn, counted), group)
        async with conn.transaction():
            assert await store.lock_offsets(partitions) == {}  # rows made, nothing applied
            await store.advance_offsets({("in", 0): 5, ("in", 1): 7})
        first = counted.statements
        async with conn.transaction():
            found = await store.lock_offsets(partitions)
        assert counted.statements - first == 1
    assert found == {("in", 0): 5, ("in", 1): 7}


async def test_a_fresh_batch_is_five_statements_with_its_stock_and_offsets_in_them(
    db: asyncpg.Pool, world: World
) -> None:
    """Lock, inbox lookup, reservations, the claim with its stock, the inbox with the
    offsets and watermark: returning stock and advancing the offsets are no round trips of
    their own, and still happen."""
    p, group = world.prefix, f"fold-{world.prefix}"
    works = []
    for offset in (0, 1):
        rid, cart = f"r{offset}-{p}", f"c{offset}-{p}"
        await reserve(db, world, rid, cart, "item-1", 2)
        event = abandon_event(cart, [("item-1", rid)], world.api_key, event_id=f"e{offset}-{p}")
        record = RawRecord("in", 0, offset, event.key, event.value, event.headers)
        command = parse_record(record, Limits())
        assert isinstance(command, ReleaseCommand)
        works.append(Accepted(record, command, world.partner_id))
    topics = Topics("results", "dlq")
    reserved = "SELECT reserved FROM stock WHERE sku = $1"
    assert await db.fetchval(reserved, world.sku) == 4
    async with db.acquire() as conn:
        async with conn.transaction():  # the partition's first batch makes its offset row
            await apply_batch(PgReleaseStore(conn, group), works[:1], topics, fresh_from_inbox=True)
        counted = _Counting(conn)
        store = PgReleaseStore(cast(Conn, counted), group, published=lambda tp: 1)
        async with conn.transaction():
            report = await apply_batch(store, works[1:], topics, fresh_from_inbox=True)
    assert counted.statements == 5
    assert report.outcomes == {"released": 1}
    assert await db.fetchval(reserved, world.sku) == 0
    row = await db.fetchrow(
        "SELECT next_offset, published_offset FROM consumer_offsets WHERE group_id = $1", group
    )
    assert row is not None
    assert tuple(row) == (2, 1)
    inbox = await db.fetchval(
        "SELECT count(*) FROM inbox WHERE partner_id = $1 AND event_id = ANY($2)",
        world.partner_id,
        [f"e0-{p}", f"e1-{p}"],
    )
    assert inbox == 2
