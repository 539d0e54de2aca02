"""The core pipeline end to end: real broker, real PostgreSQL, the worker in-process."""

from __future__ import annotations

import asyncpg
import pytest

from tests.integration.conftest import World, reserve
from tests.support import Published, produce, read_topic, running_worker
from worker.invariants import i1_violations
from worker.scenario import abandon_event

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
    async with running_worker(world.settings):
        await produce(world.settings, [event])
        records = await read_topic(
            world.settings.kafka_bootstrap or "",
            world.settings.results_topic,
            lambda seen: len(seen) >= len(items),
        )
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
