"""The worker's connection pool (`app.create_pool`)."""

from __future__ import annotations

import asyncpg
import pytest

from tests.conftest import Servers
from tests.support import isolated_settings
from worker.app import create_pool

pytestmark = pytest.mark.integration


async def test_a_released_connection_costs_no_reset_round_trip_and_keeps_its_settings(
    db: asyncpg.Pool, servers: Servers
) -> None:
    """Every batch takes a connection and gives it back: asyncpg's default reset on release
    (advisory unlock, CLOSE ALL, UNLISTEN, RESET ALL) is a round trip on the latency path
    of each batch, for session state the worker never sets. Released, the backend's last
    statement is the transaction's COMMIT, and the next user gets the pool's settings."""
    settings = isolated_settings(
        servers.worker_database_url, servers.bootstrap, lock_timeout_ms=1234
    )
    pool = await create_pool(settings, size=2)
    try:
        async with pool.acquire() as conn:
            pid = conn.get_server_pid()
            async with conn.transaction():
                await conn.execute("SELECT 1")
        last = await db.fetchval("SELECT query FROM pg_stat_activity WHERE pid = $1", pid)
        assert last.strip().rstrip(";").upper() == "COMMIT"
        async with pool.acquire() as conn:
            assert conn.get_server_pid() == pid
            assert await conn.fetchval("SHOW lock_timeout") == "1234ms"
            assert not conn.is_in_transaction()
    finally:
        await pool.close()


async def test_a_connection_released_inside_a_transaction_is_rolled_back(
    servers: Servers,
) -> None:
    """Without the reset query, release still ends an open transaction (asyncpg's own
    rollback): nothing a cancelled batch wrote survives into the next user's session."""
    settings = isolated_settings(servers.worker_database_url, servers.bootstrap)
    pool = await create_pool(settings, size=2)
    try:
        conn = await pool.acquire()
        pid = conn.get_server_pid()
        tx = conn.transaction()
        await tx.start()
        await conn.execute("CREATE TEMP TABLE left_behind (x int)")
        await pool.release(conn)
        async with pool.acquire() as conn:
            assert conn.get_server_pid() == pid
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT to_regclass('pg_temp.left_behind')") is None
    finally:
        await pool.close()
