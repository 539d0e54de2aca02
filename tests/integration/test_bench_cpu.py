"""The bench's split of PostgreSQL's CPU by kind of process, on the real server."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from bench.cpu import PostgresKinds, parent_pid
from tests.conftest import Servers

pytestmark = pytest.mark.integration

# About half a second of a backend's CPU.
_WORK = "SELECT sum(i) FROM generate_series(1, 8000000) AS i"


def _exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


async def test_a_backends_cpu_counts_as_backends_and_after_it_exits_as_exited(
    servers: Servers,
) -> None:
    staying = await asyncpg.connect(servers.database_url)
    leaving = await asyncpg.connect(servers.database_url)
    try:
        pid = staying.get_server_pid()
        if not _exists(pid):
            pytest.skip("the database server runs on another machine")
        postmaster = parent_pid(pid)
        kinds = PostgresKinds(lambda: [postmaster])
        kinds.start()
        await staying.fetchval(_WORK)
        alive = kinds.stop()
        assert alive["postgres backends"] >= 0.1, alive
        assert alive["postgres exited"] < 0.1, alive

        leaving_pid = leaving.get_server_pid()
        kinds.start()
        await leaving.fetchval(_WORK)
        await leaving.close()
        for _ in range(250):  # until the postmaster has reaped it (a zombie still shows)
            if not _exists(leaving_pid):
                break
            await staying.fetchval("SELECT pg_sleep(0.02)")
        gone = kinds.stop()
        assert gone["postgres exited"] >= 0.1, gone
        assert gone["postgres backends"] < 0.1, gone
    finally:
        await staying.close()
        if not leaving.is_closed():
            await leaving.close()
