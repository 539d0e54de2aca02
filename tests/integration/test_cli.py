"""The command line against the real servers: migrate, run's schema check, partner add, emit."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import Servers
from tests.support import isolated_settings, read_topic
from worker.store import SCHEMA_VERSION
from worker.testing.topics import ensure_topics

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"

pytestmark = pytest.mark.integration


def cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
async def empty_database(servers: Servers, db: asyncpg.Pool) -> AsyncIterator[str]:
    """A database of its own, not migrated; dropped afterwards."""
    name = f"empty_{uuid.uuid4().hex[:8]}"
    await db.execute(f"CREATE DATABASE {name}")
    base, _, _ = servers.database_url.rpartition("/")
    yield f"{base}/{name}"
    await db.execute(f"DROP DATABASE {name} WITH (FORCE)")


async def test_run_refuses_an_unmigrated_database_and_names_the_fix(
    servers: Servers, empty_database: str
) -> None:
    env = {
        "WORKER_DATABASE_URL": empty_database,
        "WORKER_KAFKA_BOOTSTRAP": servers.bootstrap,
        "WORKER_METRICS_PORT": "0",
    }
    result = cli("run", env=env)
    assert result.returncode == 3
    assert "not migrated" in result.stderr
    assert "release-worker migrate" in result.stderr


async def test_run_refuses_an_older_schema_and_names_both_versions(
    servers: Servers, empty_database: str
) -> None:
    # The database says it was migrated up to the migration before the newest one.
    versions = sorted(p.name.split("_", 1)[0] for p in MIGRATIONS.glob("*.sql"))
    assert versions[-1] == SCHEMA_VERSION
    older = versions[-2]
    conn = await asyncpg.connect(empty_database)
    try:
        await conn.execute("CREATE TABLE schema_migrations (version varchar(128) PRIMARY KEY)")
        await conn.executemany(
            "INSERT INTO schema_migrations VALUES ($1)", [(v,) for v in versions[:-1]]
        )
    finally:
        await conn.close()
    env = {
        "WORKER_DATABASE_URL": empty_database,
        "WORKER_KAFKA_BOOTSTRAP": servers.bootstrap,
        "WORKER_METRICS_PORT": "0",
    }
    result = cli("run", env=env)
    assert result.returncode == 3, result.stderr
    assert f"The database schema is at {older}; this worker needs {SCHEMA_VERSION}" in (
        result.stderr
    )
    assert "release-worker migrate" in result.stderr


async def test_migrate_then_run_accepts_the_schema(servers: Servers, empty_database: str) -> None:
    env = {"WORKER_DATABASE_URL": empty_database}
    first = cli("migrate", env=env)
    assert first.returncode == 0, first.stderr
    assert "Applying" in first.stdout
    again = cli("migrate", env=env)
    assert again.returncode == 0, again.stderr
    assert "Applying" not in again.stdout
    conn = await asyncpg.connect(empty_database)
    try:
        tables = {
            r[0]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
    finally:
        await conn.close()
    assert {"partners", "stock", "reservations", "inbox", "outbox", "consumer_offsets"} <= tables


def test_migrate_never_prints_a_password_even_when_dbmate_echoes_the_url() -> None:
    # dbmate's own error repeats the URL, masking only the userinfo password.
    url = "postgresql://app:s3cret-one@127.0.0.1:notaport/shop?password=s3cret-two"
    result = cli("migrate", env={"WORKER_DATABASE_URL": url})
    assert result.returncode == 1
    assert "Migration failed" in result.stderr
    assert "s3cret" not in result.stdout + result.stderr


async def test_partner_add_prints_the_key_once_and_stores_only_its_hash(
    servers: Servers, db: asyncpg.Pool
) -> None:
    partner = f"cli-{uuid.uuid4().hex[:8]}"
    result = cli(
        "partner",
        "add",
        partner,
        "--tag",
        "t1",
        "--tag",
        "t2",
        env={"WORKER_DATABASE_URL": servers.database_url},
    )
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip().splitlines()[-1]
    assert key.startswith("rk_")
    row = await db.fetchrow(
        "SELECT api_key_sha256, tag_ids, status FROM partners WHERE partner_id = $1", partner
    )
    assert row is not None
    assert bytes(row["api_key_sha256"]) == hashlib.sha256(key.encode()).digest()
    assert list(row["tag_ids"]) == ["t1", "t2"]
    stored = await db.fetchval(
        "SELECT count(*) FROM partners WHERE partner_id = $1 AND name LIKE '%' || $2 || '%'",
        partner,
        key,
    )
    assert stored == 0


async def test_emit_produces_the_requested_events(servers: Servers) -> None:
    settings = isolated_settings(servers.database_url, servers.bootstrap)
    await ensure_topics(settings, 3)
    env = {
        "WORKER_KAFKA_BOOTSTRAP": servers.bootstrap,
        "WORKER_INPUT_TOPIC": settings.input_topic,
    }
    result = cli(
        "emit",
        "--cart",
        "c1",
        "--cart",
        "c2",
        "--count",
        "3",
        "--api-key",
        "k",
        "--item",
        "i1=r1",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    records = await read_topic(servers.bootstrap, settings.input_topic, lambda s: len(s) >= 3)
    assert sorted(r.key or b"" for r in records) == [b"c1", b"c1", b"c2"]
    assert records[0].body["items"] == [{"cartItemId": "i1", "itemReservationId": "r1"}]
    assert records[0].headers["rokt-api-key"] == b"k"


def test_a_malformed_item_option_is_refused_with_a_clear_message() -> None:
    result = cli(
        "emit",
        "--cart",
        "c1",
        "--api-key",
        "k",
        "--item",
        "nonsense",
        env={"WORKER_KAFKA_BOOTSTRAP": "127.0.0.1:1"},
    )
    assert result.returncode == 2
    assert "CART_ITEM_ID=RESERVATION_ID" in result.stderr
