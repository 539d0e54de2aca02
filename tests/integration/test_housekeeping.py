"""Inbox pruning: rows past the retention go, newer ones stay, and an old replay is safe."""

from __future__ import annotations

import asyncpg
import pytest

from tests.conftest import Servers
from tests.integration.conftest import World, reserve
from tests.support import isolated_settings, produce, read_results, running_worker
from worker.housekeeping import prune_once
from worker.scenario import abandon_event

pytestmark = pytest.mark.integration


async def test_pruning_removes_only_rows_past_the_retention_and_a_later_replay_changes_nothing(
    db: asyncpg.Pool, world: World, servers: Servers
) -> None:
    p = world.prefix
    await reserve(db, world, f"{p}-r1", f"{p}-c", "a", 2)
    event = abandon_event(f"{p}-c", [("a", f"{p}-r1")], world.api_key, event_id=f"{p}-old")
    async with running_worker(world.settings):
        await produce(world.settings, [event])
        await read_results(world.settings, 1)
    await db.execute(
        "INSERT INTO inbox (partner_id, event_id, cart_id, source_topic, source_partition, "
        "source_offset, results) VALUES ($1, $2, 'c', 't', 0, 0, '{}')",
        world.partner_id,
        f"{p}-recent",
    )
    await db.execute(
        "UPDATE inbox SET processed_at = now() - interval '2 hours' "
        "WHERE partner_id = $1 AND event_id = $2",
        world.partner_id,
        f"{p}-old",
    )
    # As the worker's least-privilege login, with a one-hour retention.
    settings = isolated_settings(
        servers.worker_database_url, servers.bootstrap, inbox_retention_hours=1.0
    )
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    try:
        assert await prune_once(pool, settings) >= 1
    finally:
        await pool.close()
    left = {
        r[0]
        for r in await db.fetch(
            "SELECT event_id FROM inbox WHERE partner_id = $1", world.partner_id
        )
    }
    assert left == {f"{p}-recent"}

    # The pruned event replayed: applied afresh, and the stock does not move again.
    async with running_worker(world.settings):
        await produce(world.settings, [event])
        results = await read_results(world.settings, 2)
    assert [r.body["outcome"] for r in results] == ["released", "already_released"]
    assert await db.fetchval("SELECT reserved FROM stock WHERE sku = $1", world.sku) == 0
