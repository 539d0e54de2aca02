"""The core pipeline end to end: real broker, real PostgreSQL, the worker in-process."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from asyncpg.exceptions import SerializationError
from prometheus_client import REGISTRY

from tests.integration.conftest import World, reserve
from tests.support import (
    Published,
    committed_offsets,
    produce,
    read_results,
    running_worker,
    worker_results,
)
from worker import retry
from worker.testing.scenario import abandon_event
from worker.testing.store import i1_violations

pytestmark = pytest.mark.integration


def results_for(records: list[Published], event_id: str) -> list[dict[str, object]]:
    return [r.body for r in records if r.body.get("eventId") == event_id]


async def test_every_outcome_is_reported_and_only_reserved_stock_returns(
    db: asyncpg.Pool, world: World
) -> None:
    p = world.prefix
    await reserve(db, world, f"{p}-r1", f"{p}-c1", "i1", 2)
    await reserve(db, world, f"{p}-r2", f"{p}-c1", "i2", 3, status="released")
    await reserve(db, world, f"{p}-r3", f"{p}-c1", "i3", 1, status="expired")
    await reserve(db, world, f"{p}-r4", f"{p}-c1", "i4", 4, status="confirmed")
    await reserve(db, world, f"{p}-x1", f"{p}-c1", "i5", 1, partner_id=world.other_partner_id)
    items = [
        ("i1", f"{p}-r1"),
        ("i2", f"{p}-r2"),
        ("i3", f"{p}-r3"),
        ("i4", f"{p}-r4"),
        ("i5", f"{p}-x1"),  # another partner's reservation
        ("i6", f"{p}-nope"),
    ]
    event = abandon_event(f"{p}-c1", items, world.api_key, event_id=f"{p}-e1")
    records = await worker_results(world.settings, [event], len(items))
    by_reservation = {r["itemReservationId"]: r for r in results_for(records, f"{p}-e1")}
    assert {k: (v["outcome"], v["success"], v["quantity"]) for k, v in by_reservation.items()} == {
        f"{p}-r1": ("released", True, 2),
        f"{p}-r2": ("already_released", True, 0),
        f"{p}-r3": ("expired", True, 0),
        f"{p}-r4": ("confirmed", False, 0),
        f"{p}-x1": ("not_found", False, 0),
        f"{p}-nope": ("not_found", False, 0),
    }
    assert await db.fetchval("SELECT reserved FROM stock WHERE sku = $1", world.sku) == 1
    other = await db.fetchval(
        "SELECT status FROM reservations WHERE reservation_id = $1", f"{p}-x1"
    )
    assert other == "reserved"
    assert await i1_violations(db) == 0


async def test_whole_cart_release_reports_each_of_the_partners_reservations(
    db: asyncpg.Pool, world: World
) -> None:
    p = world.prefix
    await reserve(db, world, f"{p}-w1", f"{p}-cart", "a", 1)
    await reserve(db, world, f"{p}-w2", f"{p}-cart", "b", 2)
    await reserve(db, world, f"{p}-w3", f"{p}-cart", "c", 5, status="confirmed")
    await reserve(db, world, f"{p}-w4", f"{p}-cart", "d", 1, partner_id=world.other_partner_id)
    event = abandon_event(f"{p}-cart", None, world.api_key, event_id=f"{p}-whole")
    records = await worker_results(world.settings, [event], 3)
    got = {r["itemReservationId"]: r["outcome"] for r in results_for(records, f"{p}-whole")}
    assert got == {f"{p}-w1": "released", f"{p}-w2": "released", f"{p}-w3": "confirmed"}
    assert await db.fetchval("SELECT reserved FROM stock WHERE sku = $1", world.sku) == 1
    assert await i1_violations(db) == 0


async def test_a_replayed_event_changes_stock_once_and_repeats_identical_results(
    db: asyncpg.Pool, world: World
) -> None:
    p = world.prefix
    await reserve(db, world, f"{p}-r1", f"{p}-c", "a", 3)
    items = [("a", f"{p}-r1")]
    same = abandon_event(f"{p}-c", items, world.api_key, event_id=f"{p}-e1")
    fresh = abandon_event(f"{p}-c", items, world.api_key, event_id=f"{p}-e2")
    records = await worker_results(world.settings, [same, same, fresh, same], 4)
    first = [r.value for r in records if r.body["eventId"] == f"{p}-e1"]
    assert len(first) == 3
    assert len(set(first)) == 1, "a replay must repeat the first result byte for byte"
    assert results_for(records, f"{p}-e1")[0]["outcome"] == "released"
    assert results_for(records, f"{p}-e2")[0]["outcome"] == "already_released"
    assert await db.fetchval("SELECT reserved FROM stock WHERE sku = $1", world.sku) == 0
    assert (
        await db.fetchval("SELECT count(*) FROM inbox WHERE partner_id = $1", world.partner_id) == 2
    )


async def test_offset_is_not_committed_while_the_database_transaction_fails(
    db: asyncpg.Pool, world: World
) -> None:
    """G1 and G6: a failing transaction retries; neither Kafka nor the DB offset moves."""
    p = world.prefix
    await reserve(db, world, f"{p}-g1", f"{p}-c", "a", 2)
    function = f"fail_{p}"
    # The trigger counts its failures in a sequence: nextval is not rolled back with the
    # transaction, so the count shows each attempt the worker made.
    await db.execute(
        f"""
        CREATE SEQUENCE {function}_attempts;
        GRANT USAGE ON SEQUENCE {function}_attempts TO release_worker;
        CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF NEW.reservation_id = '{p}-g1' THEN
            PERFORM nextval('{function}_attempts');
            RAISE EXCEPTION 'injected' USING ERRCODE = 'serialization_failure';
          END IF;
          RETURN NEW;
        END $$;
        CREATE TRIGGER {function} BEFORE UPDATE ON reservations
          FOR EACH ROW EXECUTE FUNCTION {function}();
        """
    )
    settings = world.settings
    event = abandon_event(f"{p}-c", [("a", f"{p}-g1")], world.api_key, event_id=f"{p}-e")
    label = {"cause": retry.cause(SerializationError("injected"))}
    retries_before = REGISTRY.get_sample_value("release_worker_retries_total", label) or 0
    try:
        async with running_worker(settings):
            [(partition, offset)] = await produce(settings, [event])
            # Wait for the third failed attempt: the transaction was retried at least twice.
            for _ in range(600):
                attempts = await db.fetchval(
                    f"SELECT CASE WHEN is_called THEN last_value ELSE 0 END "
                    f"FROM {function}_attempts"
                )
                if attempts >= 3:
                    break
                await asyncio.sleep(0.05)
            assert attempts >= 3, f"the transaction was attempted {attempts} times"
            retries = REGISTRY.get_sample_value("release_worker_retries_total", label) or 0
            assert retries - retries_before >= 2, "the retries were not counted"
            # While it fails, neither offset passes the record, and nothing was released.
            committed = (await committed_offsets(settings, [partition]))[partition]
            assert committed is None or committed <= offset
            stored = await db.fetchval(
                "SELECT next_offset FROM consumer_offsets WHERE group_id = $1 AND partition = $2",
                settings.group_id,
                partition,
            )
            assert stored is None or stored <= offset
            status = await db.fetchval(
                "SELECT status FROM reservations WHERE reservation_id = $1", f"{p}-g1"
            )
            assert status == "reserved"
            await db.execute(f"DROP TRIGGER {function} ON reservations")
            records = await read_results(settings, 1)
            assert records[0].body["outcome"] == "released"
            # Once it succeeds, both offsets move past the record.
            for _ in range(100):
                if ((await committed_offsets(settings, [partition]))[partition] or 0) > offset:
                    break
                await asyncio.sleep(0.1)
            assert ((await committed_offsets(settings, [partition]))[partition] or 0) == offset + 1
            stored = await db.fetchval(
                "SELECT next_offset FROM consumer_offsets WHERE group_id = $1 AND partition = $2",
                settings.group_id,
                partition,
            )
            assert stored == offset + 1
            assert (
                await db.fetchval(
                    "SELECT status FROM reservations WHERE reservation_id = $1", f"{p}-g1"
                )
                == "released"
            )
    finally:
        await db.execute(f"DROP TRIGGER IF EXISTS {function} ON reservations")
        await db.execute(f"DROP FUNCTION IF EXISTS {function}()")
        await db.execute(f"DROP SEQUENCE IF EXISTS {function}_attempts")


async def test_results_name_their_partner_and_a_later_replay_repeats_key_and_headers(
    db: asyncpg.Pool, world: World
) -> None:
    p = world.prefix
    await reserve(db, world, f"{p}-r1", f"{p}-c", "a", 3)
    items = [("a", f"{p}-r1")]
    mine = abandon_event(f"{p}-c", items, world.api_key, event_id=f"{p}-e1")
    # The other partner reuses the eventId and names the same reservation (finding 5).
    theirs = abandon_event(f"{p}-c", items, world.other_api_key, event_id=f"{p}-e1")
    # A replay of mine in a later batch, from another session and naming another cart: the
    # stored results come back with the key and headers of their first publication (G2).
    replay = abandon_event(f"{p}-elsewhere", items, world.api_key, event_id=f"{p}-e1")
    async with running_worker(world.settings):
        await produce(world.settings, [mine, theirs])
        await read_results(world.settings, 2)
        await produce(world.settings, [replay])
        records = await read_results(world.settings, 3)
    by_partner = {r.headers.get("partner-id"): r for r in records[:2]}
    assert set(by_partner) == {world.partner_id.encode(), world.other_partner_id.encode()}
    released = by_partner[world.partner_id.encode()]
    refused = by_partner[world.other_partner_id.encode()]
    assert (released.body["outcome"], refused.body["outcome"]) == ("released", "not_found")
    for result in (released, refused):
        assert (result.body["eventId"], result.body["itemReservationId"]) == (f"{p}-e1", f"{p}-r1")
    again = records[2]
    assert (again.key, again.value, again.headers) == (
        released.key,
        released.value,
        released.headers,
    )
    assert released.headers["rokt-session-id"] == dict(mine.headers)["rokt-session-id"]
