"""A fatal error stops the worker (exit 1) instead of rejecting valid records (DESIGN §7).

The database refusing the worker itself (here: a grant revoked while it runs) is no
record's fault. Before errors had one classification, every record that met it was
retried as poison and then rejected with a 500 and a dead letter, while the worker ran
on. Now the consumer's death is logged once by its supervisor and the worker exits 1;
the record waits in its topic and is released once the grant is back.
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from structlog.testing import capture_logs

from tests.integration.conftest import World, reserve
from tests.integration.test_busy_rows import answered, released_once
from tests.integration.test_rejections import items, produce_raw, record
from tests.support import running_worker
from worker.app import run_worker
from worker.testing.topics import ensure_topics

pytestmark = pytest.mark.integration


async def test_a_revoked_grant_stops_the_worker_with_exit_1_and_the_record_waits(
    db: asyncpg.Pool, world: World
) -> None:
    p, settings = world.prefix, world.settings
    await reserve(db, world, f"{p}-r", f"{p}-c", "i0", 2)
    event = record("fatal", items(f"{p}-r"), cart=f"{p}-c", api_key=world.api_key.encode())
    await ensure_topics(settings, 3)
    await produce_raw(settings, [event])
    await db.execute("REVOKE UPDATE (reserved) ON stock FROM release_worker")
    try:
        with capture_logs() as logs:
            code = await asyncio.wait_for(run_worker(settings, handle_signals=False), 60)
    finally:
        await db.execute("GRANT UPDATE (reserved) ON stock TO release_worker")
    assert code == 1
    deaths = [e for e in logs if e["event"] == "task_failed"]
    assert [(e["task"], e["restart"], type(e["exc_info"]).__name__) for e in deaths] == [
        ("consumer", False, "InsufficientPrivilegeError")
    ]
    assert not [e for e in logs if e["event"] in ("record_dead_lettered", "record_rejected")]
    assert (
        await db.fetchval("SELECT status FROM reservations WHERE reservation_id = $1", f"{p}-r")
        == "reserved"
    )

    async with running_worker(settings):
        results = await answered(settings, "fatal")
    released_once(results, "fatal")
