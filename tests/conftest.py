"""Session-wide servers: the embedded PostgreSQL and broker (or WORKER_* servers if given).

pytest exits 5 when no test ran; that is turned into a failure here, so an empty
or mis-collected suite can never pass CI silently.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import pytest

from worker.migrate import migrate
from worker.testing.embedded import EmbeddedStack, embedded_stack


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print("\nNo tests ran: treated as a failure.")


# The login user integration tests run the worker as: a member of the least-privilege
# role `release_worker` (migrations/20261127160000_release_worker_role.sql).
WORKER_LOGIN = "release_worker_test"


class Servers:
    def __init__(self, database_url: str, bootstrap: str, stack: EmbeddedStack | None) -> None:
        self.database_url = database_url  # the owner: migrations, seeding, assertions
        self.bootstrap = bootstrap
        self.stack = stack
        # The worker's own connections: only the grants of `release_worker`.
        self.worker_database_url = worker_login_url(database_url)


def worker_login_url(database_url: str) -> str:
    """Create (or refresh) the login user granted `release_worker`; return its URL."""
    password = secrets.token_urlsafe(16)

    async def create() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", WORKER_LOGIN)
            verb = "ALTER" if exists else "CREATE"
            # DDL takes no parameters; the name is a constant and the password url-safe.
            await conn.execute(f"{verb} ROLE {WORKER_LOGIN} LOGIN PASSWORD '{password}'")
            await conn.execute(f"GRANT release_worker TO {WORKER_LOGIN}")
        finally:
            await conn.close()

    # A private loop: this runs in a synchronous session fixture, outside pytest's loop.
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(create())
    finally:
        loop.close()
    parts = urlsplit(database_url)
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{WORKER_LOGIN}:{quote(password, safe='')}@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


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
