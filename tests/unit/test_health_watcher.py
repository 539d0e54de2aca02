"""Finding 7: the health watcher outlives every failure the servers can raise.

It did not catch asyncpg's `InternalClientError` (raised after a terminated session,
MagicStack/asyncpg#1069), so it died and `/readyz` froze in whatever state it was.
"""

from __future__ import annotations

import asyncio

import asyncpg
from aiokafka.errors import KafkaConnectionError

from worker.app import _watch_health
from worker.health import Health


async def test_the_watcher_marks_a_server_away_and_back_instead_of_dying() -> None:
    health = Health()
    database_failures: list[BaseException] = [
        asyncpg.exceptions.InternalClientError("after a terminated session"),
        asyncpg.exceptions.AdminShutdownError("terminating connection"),
        ConnectionResetError(104, "reset"),
    ]
    broker_failures: list[BaseException] = [KafkaConnectionError("away"), TimeoutError()]
    seen: list[tuple[bool, bool]] = []
    both_back = asyncio.Event()

    async def ping_database() -> None:
        if database_failures:
            raise database_failures.pop(0)

    async def ping_broker() -> None:
        seen.append((health.database_ok, health.broker_ok))
        if broker_failures:
            raise broker_failures.pop(0)
        if not database_failures:
            both_back.set()

    watcher = asyncio.create_task(
        _watch_health(health, ping_database, ping_broker, lambda: True, interval_s=0.001)
    )
    await asyncio.wait_for(both_back.wait(), 5)
    await asyncio.sleep(0.01)
    assert not watcher.done(), watcher
    watcher.cancel()
    assert seen[:3] == [(False, False), (False, False), (False, False)]
    assert (health.database_ok, health.broker_ok) == (True, True)
