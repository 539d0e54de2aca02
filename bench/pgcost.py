"""Where PostgreSQL's CPU per item goes: the worker's `apply_batch` on an embedded
PostgreSQL with `pg_stat_statements` and `pg_walinspect`, nothing else running on it.

    python -m bench.pgcost --records 8000 --batch 500 --lanes 2 [--checkpoint] [-c name=value]

Seeds a steady workload (carts of 3 items over 10,000 SKUs, as the bench), runs
`VACUUM (ANALYZE)` (setup), then applies the records in batches on `--lanes` connections
at once, as the worker's lanes do (fresh results stay in the inbox). Prints, per item:
the CPU of every PostgreSQL process by kind (backends, walwriter, checkpointer,
autovacuum, ...; from /proc), WAL bytes and full-page images (`pg_current_wal_lsn()`,
`pg_stat_wal`), WAL by resource manager (`pg_get_wal_stats`), and each statement's
execution time, WAL and buffers (`pg_stat_statements`). `--checkpoint` takes a
checkpoint just before the measured part, so every page's first change is a full-page
image (the start of a checkpoint cycle); `--repeat` measures several runs on fresh
carts (the minimum is the figure least disturbed by a loaded machine); `-c` passes a
server setting, `--sql` runs a statement
after migrating (an index or storage change to try).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import asyncpg

from bench.cpu import child_pids, cpu_seconds, process_title
from bench.dblimit import _works
from bench.workload import Scenario, Workload, prepare
from worker import store
from worker.migrate import migrate
from worker.release import Accepted, apply_batch
from worker.results import Topics
from worker.testing.embedded import EmbeddedPostgres


def _kind(pid: int) -> str:
    title = process_title(pid)
    if title is None:
        return "gone"
    if not title.startswith("postgres: "):
        return "postmaster"
    words = title.removeprefix("postgres: ").split()
    if "autovacuum" in words[0]:
        return "autovacuum"
    # A backend's title is "user database host(port) state"; the others name themselves.
    return "backends" if len(words) >= 3 and "(" in words[2] else " ".join(words[:2])


def _cpu_by_kind(postmaster: int) -> dict[tuple[int, str], float]:
    pids = [postmaster, *child_pids(postmaster)]
    return {(p, _kind(p)): cpu_seconds(p) for p in pids}


def _split(
    before: dict[tuple[int, str], float], after: dict[tuple[int, str], float]
) -> dict[str, float]:
    kinds: dict[str, float] = {}
    for key, value in after.items():
        kinds[key[1]] = kinds.get(key[1], 0.0) + value - before.get(key, 0.0)
    return kinds


async def measure(args: argparse.Namespace, url: str, postmaster: int) -> None:
    pool = await asyncpg.create_pool(url, min_size=args.lanes + 1, max_size=args.lanes + 2)
    assert pool is not None
    await pool.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    await pool.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
    for sql in args.sql:
        await pool.execute(sql)
    scenario = Scenario("steady", args.records)
    if args.history:
        # Earlier traffic: released reservations and inbox rows the statements must skip.
        old = await prepare(pool, scenario, args.history)
        await _apply(pool, old, args.lanes, args.batch)
    totals = []
    for rep in range(args.repeat):
        # Each repetition on fresh carts; the figures below are the last one's.
        workload = await prepare(pool, scenario, args.records)
        items = workload.expected_items
        await pool.execute("SELECT pg_stat_statements_reset()")
        await pool.execute("SELECT pg_stat_reset_shared('wal')")
        if args.checkpoint:
            await pool.execute("CHECKPOINT")
        lsn0 = await pool.fetchval("SELECT pg_current_wal_lsn()")
        cpu0 = _cpu_by_kind(postmaster)
        started = time.perf_counter()
        await _apply(pool, workload, args.lanes, args.batch)
        seconds = time.perf_counter() - started
        await asyncio.sleep(0.5)  # the walwriter's last flush
        cpu1 = _cpu_by_kind(postmaster)
        lsn1 = await pool.fetchval("SELECT pg_current_wal_lsn()")
        released = await pool.fetchval(
            "SELECT count(*) FROM reservations WHERE partner_id = $1 AND status = 'released'",
            workload.partner_id,
        )
        assert released == items, (released, items)
        totals.append(sum(_split(cpu0, cpu1).values()) / items * 1e6)
        print(f"run {rep + 1}: PostgreSQL CPU {totals[-1]:.1f} µs/item, {seconds:.1f} s")
    if args.repeat > 1:
        print(f"PostgreSQL CPU µs/item: min {min(totals):.1f}, median {median(totals):.1f}")
    wal_bytes = await pool.fetchval("SELECT $2::pg_lsn - $1::pg_lsn", lsn0, lsn1)
    wal = await pool.fetchrow("SELECT wal_records, wal_fpi, wal_bytes FROM pg_stat_wal")
    assert wal is not None
    kinds = _split(cpu0, cpu1)
    total = sum(kinds.values())
    print(
        f"records {args.records}, items {items}, batch {args.batch}, lanes {args.lanes}, "
        f"{seconds:.1f} s, load {os.getloadavg()[0]:.1f}"
    )
    print(
        f"PostgreSQL CPU µs/item: {total / items * 1e6:.1f} = "
        + ", ".join(
            f"{k} {v / items * 1e6:.1f}"
            for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])
            if v > 0
        )
    )
    print(
        f"WAL B/item {float(wal_bytes) / items:.0f} (LSN); records/item "
        f"{wal['wal_records'] / items:.2f}, FPI/item {wal['wal_fpi'] / items:.3f}"
    )
    print("WAL by relation and record type (per item; a record is counted once per block):")
    for r in await pool.fetch(
        """
        SELECT coalesce(pg_filenode_relation(0, relfilenode)::text, relfilenode::text) AS rel,
               resource_manager || '/' || record_type AS kind, count(*) AS n,
               sum(record_length) AS bytes, sum(block_fpi_length) AS fpi
          FROM pg_get_wal_block_info($1, $2) GROUP BY 1, 2 ORDER BY sum(record_length) DESC
         LIMIT 16
        """,
        lsn0,
        lsn1,
    ):
        print(
            f"  {r['rel']:<34} {r['kind']:<22} {r['n'] / items:6.2f} records"
            f" {r['bytes'] / items:6.0f} B (FPI {r['fpi'] / items:4.0f})"
        )
    print("statements (per item: exec µs, WAL B, blocks hit+read, dirtied; calls):")
    for r in await pool.fetch(
        """
        SELECT calls, total_exec_time, total_plan_time, wal_bytes, wal_fpi,
               shared_blks_hit + shared_blks_read AS blks, shared_blks_dirtied, query
          FROM pg_stat_statements WHERE calls > 0 ORDER BY total_exec_time DESC LIMIT $1
        """,
        args.statements,
    ):
        text = " ".join(r["query"].split())[:90]
        print(
            f"  {r['total_exec_time'] * 1000 / items:6.2f} µs"
            f" {float(r['wal_bytes']) / items:6.0f} B"
            f" {r['blks'] / items:6.2f} {r['shared_blks_dirtied'] / items:5.2f}"
            f" {r['calls']:5d}  {text}"
        )
    await pool.close()


async def _apply(pool: asyncpg.Pool, workload: Workload, lanes: int, batch: int) -> None:
    topics = Topics("pgcost.results", "pgcost.dlq")
    group = f"pgcost-{workload.prefix}"

    async def drive(works: list[Accepted]) -> None:
        async with pool.acquire() as conn:
            for start in range(0, len(works), batch):
                async with conn.transaction():
                    await apply_batch(
                        store.PgReleaseStore(conn, group),
                        works[start : start + batch],
                        topics,
                        fresh_from_inbox=True,
                    )

    await asyncio.gather(*(drive(w) for w in _works(workload, lanes)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=8000)
    parser.add_argument("--history", type=int, default=0, help="records applied before")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--lanes", type=int, default=2)
    parser.add_argument("--checkpoint", action="store_true")
    parser.add_argument("--repeat", type=int, default=1, help="measured runs (fresh carts)")
    parser.add_argument("--statements", type=int, default=12)
    parser.add_argument("-c", dest="settings", action="append", default=[])
    parser.add_argument("--sql", action="append", default=[], help="run after migrating")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server on a kill too
    with tempfile.TemporaryDirectory(prefix="pgcost-") as root:
        pg = EmbeddedPostgres(Path(root))
        pg.start(["shared_preload_libraries=pg_stat_statements", *args.settings])
        try:
            done = migrate(pg.url)
            if done.returncode != 0:
                raise SystemExit(done.stderr)
            assert pg.pid is not None
            asyncio.run(measure(args, pg.url, pg.pid))
        finally:
            pg.stop()


if __name__ == "__main__":
    main()
