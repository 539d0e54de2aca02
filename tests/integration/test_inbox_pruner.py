"""Inbox pruning: rows past the retention keep only their key, and a replay at any age
changes nothing: it releases nothing new, and is answered from the reservations' state."""

from __future__ import annotations

import asyncpg
import pytest

from tests.conftest import Servers
from tests.integration.conftest import World, reserve
from tests.support import isolated_settings, worker_results
from worker.inbox_pruner import prune_once
from worker.testing.scenario import abandon_event

pytestmark = pytest.mark.integration


async def age_and_prune(db: asyncpg.Pool, servers: Servers, partner_id: str, event_id: str) -> int:
    """Make the event's inbox row two hours old and prune with a one-hour retention, as the
    worker's least-privilege login; return how many rows were pruned."""
    await db.execute(
        "UPDATE inbox SET processed_at = now() - interval '2 hours' "
        "WHERE partner_id = $1 AND event_id = $2",
        partner_id,
        event_id,
    )
    return await prune_past_an_hour(servers)


async def prune_past_an_hour(servers: Servers) -> int:
    """One pruning pass with a one-hour retention, as the worker's least-privilege login;
    return how many rows were pruned."""
    settings = isolated_settings(
        servers.worker_database_url, servers.bootstrap, inbox_retention_hours=1.0
    )
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    try:
        return await prune_once(pool, settings)
    finally:
        await pool.close()


async def inbox_rows(db: asyncpg.Pool, partner_id: str) -> dict[str, int | None]:
    """event_id -> number of stored results (None: pruned to a tombstone)."""
    rows = await db.fetch(
        "SELECT event_id, cardinality(results) AS n FROM inbox WHERE partner_id = $1", partner_id
    )
    return {r["event_id"]: r["n"] for r in rows}


async def test_pruning_keeps_a_tombstone_past_the_retention_and_a_later_replay_changes_nothing(
    db: asyncpg.Pool, world: World, servers: Servers
) -> None:
    p = world.prefix
    await reserve(db, world, f"{p}-r1", f"{p}-c", "a", 2)
    event = abandon_event(f"{p}-c", [("a", f"{p}-r1")], world.api_key, event_id=f"{p}-old")
    await worker_results(world.settings, [event], 1)
    await db.execute(
        "INSERT INTO inbox (partner_id, event_id, cart_id, source_topic, source_partition, "
        "source_offset, results) VALUES ($1, $2, 'c', 't', 0, 0, '{}')",
        world.partner_id,
        f"{p}-recent",
    )
    assert await age_and_prune(db, servers, world.partner_id, f"{p}-old") >= 1
    # The old row keeps its key without its results; the recent one is untouched.
    assert await inbox_rows(db, world.partner_id) == {f"{p}-old": None, f"{p}-recent": 0}

    # The pruned event replayed: answered from what it left in the reservation.
    results = await worker_results(world.settings, [event], 2)
    first, replayed = (r.body for r in results)
    assert [first["outcome"], replayed["outcome"]] == ["released", "released"]
    assert replayed["quantity"] == first["quantity"] == 2
    assert replayed["eventId"] == f"{p}-old"
    assert await db.fetchval("SELECT reserved FROM stock WHERE sku = $1", world.sku) == 0


async def test_a_whole_cart_replay_past_the_retention_releases_nothing_added_since(
    db: asyncpg.Pool, world: World, servers: Servers
) -> None:
    p = world.prefix
    await reserve(db, world, f"{p}-r1", f"{p}-c", "a", 2)
    await reserve(db, world, f"{p}-r2", f"{p}-c", "b", 3)
    await reserve(db, world, f"{p}-r0", f"{p}-c", "z", 1, status="confirmed")
    event = abandon_event(f"{p}-c", None, world.api_key, event_id=f"{p}-all")
    first = await worker_results(world.settings, [event], 3)
    assert await age_and_prune(db, servers, world.partner_id, f"{p}-all") >= 1
    # The shopper comes back and reserves again in the same cart.
    await reserve(db, world, f"{p}-r3", f"{p}-c", "c", 4)

    results = await worker_results(world.settings, [event], 6)
    assert (
        await db.fetchval("SELECT status FROM reservations WHERE reservation_id = $1", f"{p}-r3")
        == "reserved"
    )
    assert await db.fetchval("SELECT reserved FROM stock WHERE sku = $1", world.sku) == 4
    replayed = [r.body for r in results[len(first) :]]
    # What the event released, reported again, and the cart's settled r0 as it stands;
    # nothing about the reservation added since.
    assert sorted((b["itemReservationId"], b["outcome"], b["quantity"]) for b in replayed) == [
        (f"{p}-r0", "confirmed", 0),
        (f"{p}-r1", "released", 2),
        (f"{p}-r2", "released", 3),
    ]
    assert {b["eventId"] for b in replayed} == {f"{p}-all"}
