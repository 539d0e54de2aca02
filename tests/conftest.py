"""Session-wide servers: the embedded PostgreSQL and broker (or WORKER_* servers if given).

pytest exits 5 when no test ran; that is turned into a failure here, so an empty
or mis-collected suite can never pass CI silently.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from worker.embedded import EmbeddedStack, embedded_stack
from worker.migrate import migrate


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print("\nNo tests ran: treated as a failure.")


class Servers:
    def __init__(self, database_url: str, bootstrap: str, stack: EmbeddedStack | None) -> None:
        self.database_url = database_url
        self.bootstrap = bootstrap
        self.stack = stack


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    given_db = os.environ.get("WORKER_DATABASE_URL")
    given_kafka = os.environ.get("WORKER_KAFKA_BOOTSTRAP")
    if given_db and given_kafka:
        result = migrate(given_db)
        assert result.returncode == 0, result.stderr
        yield Servers(given_db, given_kafka, None)
        return
    with embedded_stack() as stack:
        result = migrate(stack.database_url)
        assert result.returncode == 0, result.stderr
        yield Servers(stack.database_url, stack.bootstrap, stack)


@pytest.fixture(scope="session")
async def db(servers: Servers) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(servers.database_url, min_size=1, max_size=8)
    yield pool
    await pool.close()
