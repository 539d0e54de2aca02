"""HOT releases and the expiry index (migrations/20261203200000_hot_releases.sql).

On PostgreSQL 16 and later the expiry index is a partial BRIN, which does not block a HOT
update, and the sweeper keeps its summaries tight; on 15 the btree stays.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from tests.conftest import Servers
from tests.integration.conftest import World, reserve
from tests.support import isolated_settings
from worker.expiry import refresh_summaries, sweep_once
from worker.migrate import migrate
from worker.records import RawRecord
from worker.release import Accepted, apply_batch
from worker.results import Topics
from worker.store import EXPIRE_DUE, Conn, PgReleaseStore, expire_due, resummarize_expiry
from worker.testing.scenario import abandon_event
from worker.validate import Limits, ReleaseCommand, parse_record

pytestmark = pytest.mark.integration


async def _server_version(db: asyncpg.Pool) -> int:
    return int(await db.fetchval("SELECT current_setting('server_version_num')"))


async def test_a_release_by_the_worker_is_a_hot_update_from_postgresql_16(
    db: asyncpg.Pool, world: World
) -> None:
    cart, items = f"c-{world.prefix}", 30
    for n in range(items):
        await reserve(db, world, f"r-{world.prefix}-{n}", cart, f"i-{n}", 1)
    event = abandon_event(cart, None, world.api_key, event_id=f"e-{world.prefix}")
    record = RawRecord("in", 0, 0, event.key, event.value, event.headers)
    command = parse_record(record, Limits())
    assert isinstance(command, ReleaseCommand)

    # The backend's counts not yet flushed to the statistics, this transaction's included:
    # the difference across apply_batch is its own.
    counts = (
        "SELECT pg_stat_get_xact_tuples_updated('reservations'::regclass), "
        "pg_stat_get_xact_tuples_hot_updated('reservations'::regclass)"
    )
    async with db.acquire() as conn, conn.transaction():
        before = await conn.fetchrow(counts)
        report = await apply_batch(
            PgReleaseStore(conn, f"hot-{world.prefix}"),
            [Accepted(record, command, world.partner_id)],
            Topics("results", "dlq"),
        )
        after = await conn.fetchrow(counts)
    assert before is not None
    assert after is not None
    updated, hot = after[0] - before[0], after[1] - before[1]
    assert report.outcomes == {"released": items}
    assert updated == items
    if await _server_version(db) >= 160000:
        # The new versions are larger than the old (released_at, release_event_id), so
        # not every one fits beside its old version on a page filled to 50%.
        assert hot >= items // 2, (updated, hot)
    else:
        assert hot == 0, "on PostgreSQL 15 the btree expiry index blocks HOT"


@pytest.fixture
async def own_database(servers: Servers, db: asyncpg.Pool) -> AsyncIterator[tuple[str, str]]:
    """A migrated database of this test's own (the reservations table holds only its rows):
    the owner's URL and the worker login's."""
    name = f"expiry_{uuid.uuid4().hex[:8]}"
    await db.execute(f'CREATE DATABASE "{name}"')
    owner, worker = (
        urlunsplit(urlsplit(url)._replace(path=f"/{name}"))
        for url in (servers.database_url, servers.worker_database_url)
    )
    try:
        result = migrate(owner)
        assert result.returncode == 0, result.stderr
        yield owner, worker
    finally:
        await db.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


async def _due_pages(conn: Conn) -> tuple[int, str]:
    """The pages of reservations the sweeper's own statement reads to find due rows (run and
    rolled back), and its plan."""
    tx = conn.transaction()
    await tx.start()
    try:
        await conn.execute("SET LOCAL enable_seqscan = off")
        explained = await conn.fetchval(
            f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {EXPIRE_DUE}", 1000, None
        )
    finally:
        await tx.rollback()
    plan = json.loads(explained)[0]["Plan"]
    nodes, scans = [plan], []
    while nodes:
        node = nodes.pop()
        nodes.extend(node.get("Plans", []))
        # The due CTE's scan, not the UPDATE's (alias r).
        if node.get("Alias") == "reservations" and node["Node Type"].endswith("Scan"):
            scans.append(node)
    (scan,) = scans
    return scan["Shared Hit Blocks"] + scan["Shared Read Blocks"], json.dumps(plan)


async def test_the_sweep_reads_only_page_ranges_with_reserved_rows_once_resummarised(
    servers: Servers, own_database: tuple[str, str]
) -> None:
    owner_url, worker_url = own_database
    owner = await asyncpg.connect(owner_url)
    pool = await asyncpg.create_pool(worker_url, min_size=1, max_size=2)
    settings = isolated_settings(worker_url, servers.bootstrap, expiry_interval_s=0.2)

    async def resummarize(overlap_s: float, every_s: float = 0, rolling: int = 0) -> int:
        async with pool.acquire() as conn:
            return await resummarize_expiry(conn, overlap_s, every_s, rolling)

    async def release(where: str, left: int) -> None:
        await owner.execute(f"UPDATE reservations SET status = 'released' WHERE {where}")
        await owner.execute("UPDATE stock SET reserved = $1", left)  # I1

    try:
        if int(await owner.fetchval("SELECT current_setting('server_version_num')")) < 160000:
            assert await refresh_summaries(pool, settings) == 0  # a btree: nothing to do
            return
        await owner.execute("INSERT INTO partners VALUES ('p', 'p', '\\x00')")
        await owner.execute("INSERT INTO stock VALUES ('s', 'default', 100000, 6000)")
        # 6,000 reservations, due in 2 s, in page order; then all but 10 released (as
        # carts are, before their time), 1 in 60 of the first 600 left reserved.
        await owner.execute(
            """
            INSERT INTO reservations (reservation_id, partner_id, cart_id, cart_item_id, sku,
                                      quantity, status, expires_at)
            SELECT 'r' || n, 'p', 'c' || n, 'i', 's', 1, 'reserved',
                   now() + interval '2 s' + n * interval '1 us'
            FROM generate_series(1, 6000) n
            """
        )
        await owner.execute("SELECT brin_summarize_new_values('reservations_reserved_expiry_brin')")
        n = "substr(reservation_id, 2)::int"
        await release(f"{n} % 60 <> 0 OR {n} > 600", 10)
        await owner.execute("VACUUM (ANALYZE) reservations")
        pages = await owner.fetchval("SELECT pg_relation_size('reservations') / 8192")
        due_in = "SELECT extract(epoch FROM max(expires_at) - now()) FROM reservations"
        await asyncio.sleep(max(0.0, float(await owner.fetchval(due_in))) + 0.1)

        async with pool.acquire() as conn:
            loose, plan = await _due_pages(conn)
        assert "reservations_reserved_expiry_brin" in plan, plan
        # Every range's summary still holds the rows released since: all are read.
        assert loose >= pages * 0.8, (loose, pages)

        # The sweeper's call: the rows that came due since the migration's summaries.
        assert await refresh_summaries(pool, settings) > 0
        async with pool.acquire() as conn:
            tight, plan = await _due_pages(conn)
        assert "reservations_reserved_expiry_brin" in plan, plan
        assert tight < loose / 4, (tight, loose, pages)
        # Several workers: a call right after another one does nothing.
        assert await resummarize(60, every_s=3600, rolling=1000) == 0

        # A row released after the call that covered it: the next call reaches back
        # over it (the overlap); a call that does not reach back leaves its range.
        await release(f"{n} <= 300", 5)
        assert await resummarize(overlap_s=0) == 0
        assert await resummarize(overlap_s=60) > 0

        # Released long after the overlap: only the rolling pass over the table finds it.
        await release("true", 0)
        assert await resummarize(overlap_s=0) == 0
        async with pool.acquire() as conn:
            left, _ = await _due_pages(conn)
        assert left > 0, left  # the last range is read
        ranges = -(-pages // 16)
        assert await resummarize(overlap_s=0, rolling=ranges) == ranges
        async with pool.acquire() as conn:
            assert (await _due_pages(conn))[0] < left

        # A reservation inserted after the re-summarising, already due, is swept.
        await owner.execute(
            "INSERT INTO reservations (reservation_id, partner_id, cart_id, cart_item_id, sku, "
            "quantity, status, expires_at) "
            "VALUES ('late', 'p', 'c', 'i', 's', 1, 'reserved', now() - interval '1 minute')"
        )
        await owner.execute("UPDATE stock SET reserved = 1")  # I1
        expired = await sweep_once(pool, settings)
        assert [m.key for m in expired] == [b"c"]
        assert await owner.fetchval("SELECT reserved FROM stock") == 0  # I1
        reserved = "SELECT count(*) FROM reservations WHERE status = 'reserved'"
        assert await owner.fetchval(reserved) == 0
    finally:
        await pool.close()
        await owner.close()


async def test_the_worker_login_may_resummarise_but_not_call_the_brin_functions_itself(
    own_database: tuple[str, str],
) -> None:
    _, worker_url = own_database
    conn = await asyncpg.connect(worker_url)
    try:
        assert await resummarize_expiry(conn, 60, 0, 64) == 0  # an empty table
        # The sweep's statement runs with the sequential scan off (the planner would not
        # choose the partial BRIN by itself), for its own transaction only.
        async with conn.transaction():
            assert await expire_due(conn, 10) == []
            assert await conn.fetchval("SHOW enable_seqscan") == "off"
        assert await conn.fetchval("SHOW enable_seqscan") == "on"
        if int(await conn.fetchval("SELECT current_setting('server_version_num')")) >= 160000:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(
                    "SELECT brin_summarize_range('reservations_reserved_expiry_brin', 0)"
                )
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute("UPDATE expiry_summaries SET next_block = 0")
    finally:
        await conn.close()
