"""A busy row is not poison (DESIGN.md §7): lock waits are retried until the lock is free,
and hold back only the waiting record's partition.

Another session holds a row the worker needs (a checkout holding a stock row, a zombie
holding a partition's offset row) for longer than the poison budget of the default
settings: poison_max_attempts on the record alone, each ending at statement_timeout, plus
the backoffs between them (5 s × 5 + 3 s = 28 s). Before lock waits were told apart, that
budget ran out and the release became a 504 and a dead letter (or, for the offset row,
the lane died). A shorter hold would hide the bug, so it is the budget plus 2 s (the
issue's 30 s), counted from when the worker is known to be at work on the busy record.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY

from tests.integration.conftest import World, reserve
from tests.integration.test_rejections import items, produce_raw, record
from tests.support import Published, read_topic, running_worker
from worker.config import Settings
from worker.testing.store import i1_violations

pytestmark = pytest.mark.integration

DEFAULTS = Settings()
# The poison budget of the default settings (see the module docstring), plus a margin.
BACKOFFS_S = sum(min(DEFAULTS.retry_max_s, 0.1 * 2**n) for n in range(1, 5))
HOLD_S = DEFAULTS.statement_timeout_ms / 1000 * DEFAULTS.poison_max_attempts + BACKOFFS_S + 2


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@asynccontextmanager
async def held(db: asyncpg.Pool, sql: str, *args: object) -> AsyncIterator[None]:
    """Rows locked FOR UPDATE by another session, until the block ends."""
    async with db.acquire() as holder, holder.transaction():
        locked = await holder.fetch(sql, *args)
        assert locked, "nothing was locked"
        yield


def answers(results: list[Published], name: str) -> list[dict[str, Any]]:
    """The results for the record named `name` (see `test_rejections.record`)."""
    return [r.body for r in results if r.body["eventId"].endswith(f"-{name}")]


async def answered(settings: Settings, *names: str) -> list[Published]:
    assert settings.kafka_bootstrap
    return await read_topic(
        settings.kafka_bootstrap,
        settings.results_topic,
        lambda seen: all(answers(seen, name) for name in names),
    )


def released_once(results: list[Published], name: str) -> None:
    outcomes = [(a["type"], a.get("outcome")) for a in answers(results, name)]
    assert outcomes == [("item_result", "released")]


async def test_a_stock_row_held_past_the_poison_budget_holds_back_only_its_partition(
    db: asyncpg.Pool, world: World
) -> None:
    p, settings = world.prefix, world.settings
    other_sku = f"{world.sku}-other"
    await db.execute("INSERT INTO stock (sku, on_hand) VALUES ($1, 10)", other_sku)
    await reserve(db, world, f"{p}-busy", f"{p}-c", "i0", 2)
    for name, cart in [("free", f"{p}-c"), ("after", f"{p}-c"), ("other", f"{p}-c2")]:
        await db.execute(
            """INSERT INTO reservations (reservation_id, partner_id, cart_id, cart_item_id, sku,
                                         quantity, status, expires_at)
               VALUES ($1, $2, $3, 'i0', $4, 1, 'reserved', now() + interval '1 hour')""",
            f"{p}-{name}",
            world.partner_id,
            cart,
            other_sku,
        )
    await db.execute("UPDATE stock SET reserved = 3 WHERE sku = $1", other_sku)
    api_key = world.api_key.encode()
    # One partition, most likely one batch: the free one first, the busy one next, then
    # one that needs no busy row but must wait for the busy one (G4). Then another cart
    # on another partition of the same lane (partition % lanes).
    free = record("free", items(f"{p}-free"), cart=f"{p}-c", api_key=api_key)
    busy = record("busy", items(f"{p}-busy"), cart=f"{p}-c", api_key=api_key)
    after = record("after", items(f"{p}-after"), cart=f"{p}-c", api_key=api_key)
    other = record("other", items(f"{p}-other"), cart=f"{p}-c2", api_key=api_key)
    busy_partition, other_partition = 0, 2
    assert busy_partition % settings.lanes == other_partition % settings.lanes
    waits, letters, timeouts = (
        metric("release_worker_lock_waits_total"),
        metric("release_worker_dead_letters_total"),
        metric("release_worker_rejections_total", status="504"),
    )
    async with running_worker(settings):
        async with held(db, "SELECT 1 FROM stock WHERE sku = $1 FOR UPDATE", world.sku):
            await produce_raw(settings, [free, busy, after], partition=busy_partition)
            await produce_raw(settings, [other], partition=other_partition)
            # The rest of the batch goes ahead while the busy row is still held, and so does
            # the lane's other partition, produced after the busy record. Before, the lane
            # waited for the lock: "other" was answered only once it was let go.
            released_once(await answered(settings, "free"), "free")
            released_once(await answered(settings, "other"), "other")
            assert await status_of(db, f"{p}-busy") == "reserved"
            await asyncio.sleep(HOLD_S)
            assert await status_of(db, f"{p}-after") == "reserved"  # never before "busy"
        results = await answered(settings, "busy", "after")
    released_once(results, "busy")
    released_once(results, "after")
    assert metric("release_worker_lock_waits_total") > waits
    assert metric("release_worker_dead_letters_total") == letters
    assert metric("release_worker_rejections_total", status="504") == timeouts
    assert await status_of(db, f"{p}-busy") == "released"
    assert await db.fetchval("SELECT reserved FROM stock WHERE sku = $1", world.sku) == 0
    assert await i1_violations(db) == 0


async def status_of(db: asyncpg.Pool, reservation_id: str) -> str:
    status: str = await db.fetchval(
        "SELECT status FROM reservations WHERE reservation_id = $1", reservation_id
    )
    return status


async def test_an_offset_row_held_by_a_zombie_blocks_its_partition_until_free_then_applies(
    db: asyncpg.Pool, world: World
) -> None:
    p, settings = world.prefix, world.settings
    await reserve(db, world, f"{p}-r1", f"{p}-c", "i0", 1)
    await reserve(db, world, f"{p}-r2", f"{p}-c", "i0", 2)
    api_key = world.api_key.encode()
    # One cart key, so one partition: the first record creates its offset row.
    first = record("first", items(f"{p}-r1"), cart=f"{p}-c", api_key=api_key)
    event = record("zombie", items(f"{p}-r2"), cart=f"{p}-c", api_key=api_key)
    letters = metric("release_worker_dead_letters_total")
    async with running_worker(settings):
        await produce_raw(settings, [first])
        await answered(settings, "first")
        # A zombie: a previous owner of the partition, still in its transaction.
        async with held(
            db,
            "SELECT 1 FROM consumer_offsets WHERE group_id = $1 FOR UPDATE",
            settings.group_id,
        ):
            await produce_raw(settings, [event])
            await asyncio.sleep(HOLD_S)
        await answered(settings, "zombie")
        # The lane outlived the wait: the partition goes on.
        later = record("later", items(f"{p}-r2"), cart=f"{p}-c", api_key=api_key)
        await produce_raw(settings, [later])
        results = await answered(settings, "later")
    released_once(results, "zombie")
    assert [a["outcome"] for a in answers(results, "later")] == ["already_released"]
    assert metric("release_worker_dead_letters_total") == letters
    assert await i1_violations(db) == 0
