"""Instructions per item of the worker's own Python outside the Kafka clients.

    python -m bench.callgrind_driver [--records 1500] [--batch 500] [--loop uvloop|asyncio]
                                     [--callgrind]

Seeds the steady scenario (3-item carts) on an embedded PostgreSQL (or on
WORKER_DATABASE_URL), makes the records as the consumer hands them over (`RawRecord`s
spread over 12 partitions) and runs them through `BatchProcessor.process`: parse and
validate, authorise, plan and render, `apply_batch` over asyncpg, the batch's metrics.
One batch is a warm-up; then `records` records are measured, in batches of `batch`, on
the event loop `--loop` names (uvloop's, which `release-worker run` uses by default, or
asyncio's: WORKER_EVENT_LOOP).

It prints the CPU of this process and of PostgreSQL (the server's process tree) per item
over the measured part (from /proc: a loaded-machine figure). With `--callgrind` it runs
itself again under valgrind with instrumentation off, switched on (`callgrind_control -i
on`) for the measured part only, and prints instructions per item as well: repeatable
under load, unlike the CPU times. PostgreSQL is not under valgrind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.callgrind import count, run_on, toggle
from bench.cpu import cpu_seconds, parent_pid, tree_cpu_seconds
from bench.run import DRIVER_SCENARIOS as SCENARIOS
from bench.run import STEADY
from bench.workload import PARTITIONS, prepare
from worker import store
from worker.app import create_pool
from worker.auth import Authenticator
from worker.cli.main import tune_garbage_collector
from worker.config import Settings
from worker.migrate import migrate
from worker.processor import BatchProcessor
from worker.records import RawRecord
from worker.testing.embedded import EmbeddedPostgres

TOPIC = "callgrind.in"


async def measure(
    url: str, records: int, batch: int, callgrind: bool, scenario: str = STEADY.name
) -> dict[str, float]:
    settings = Settings(database_url=url, batch_max_records=batch, auth_cache_ttl_s=3600)
    # The worker's own pool (its reset on release, its timeouts), not asyncpg's defaults:
    # the default reset is one more round trip a batch that the worker does not make.
    pool = await create_pool(settings, size=4)
    try:
        workload = await prepare(pool, SCENARIOS[scenario], batch + records)
        raw = [
            RawRecord(TOPIC, n % PARTITIONS, n // PARTITIONS, e.key, e.value, e.headers)
            for n, e in enumerate(workload.events)
        ]
        processor = BatchProcessor(
            store.PgTransactions(pool, f"callgrind-{workload.prefix}"),
            settings,
            # A long TTL: one partner lookup, not one per 5 s of a slow callgrind run.
            Authenticator(lambda d: store.find_partners(pool, d), settings.auth_cache_ttl_s),
        )
        tune_garbage_collector()  # as `release-worker run` does once started
        await processor.process(raw[:batch])  # warm-up
        # The server's main process, a backend's parent: its tree's CPU is PostgreSQL's.
        postmaster = parent_pid(await pool.fetchval("SELECT pg_backend_pid()"))
        measured = raw[batch:]
        if callgrind:
            toggle(True)
        own, server = cpu_seconds(os.getpid()), tree_cpu_seconds(postmaster)
        started = time.perf_counter()
        items = 0
        for start in range(0, len(measured), batch):
            report = await processor.process(measured[start : start + batch])
            items += sum(report.outcomes.values())
        seconds = time.perf_counter() - started
        own, server = cpu_seconds(os.getpid()) - own, tree_cpu_seconds(postmaster) - server
        if callgrind:
            toggle(False)
    finally:
        await pool.close()
    expected = records * SCENARIOS[scenario].items_per_cart
    if items != expected:
        raise RuntimeError(f"{items} item results, expected {expected}")
    return {
        "records": records,
        "items": items,
        "seconds": round(seconds, 3),
        "worker_cpu_us_per_item": round(1e6 * own / items, 1),
        "postgres_cpu_us_per_item": round(1e6 * server / items, 1),
    }


@contextlib.contextmanager
def _database(url: str | None) -> Iterator[str]:
    """`url`, or a fresh embedded PostgreSQL for the run; migrated."""
    with tempfile.TemporaryDirectory(prefix="callgrind-pg-") as root:
        postgres = None
        if url is None:
            postgres = EmbeddedPostgres(Path(root))
            postgres.start()
            url = postgres.url
        try:
            done = migrate(url)
            if done.returncode != 0:
                raise RuntimeError(f"migration failed: {done.stderr}")
            yield url
        finally:
            if postgres is not None:
                postgres.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1500, help="records measured")
    parser.add_argument("--batch", type=int, default=500, help="records per batch (and warm-up)")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default=STEADY.name)
    parser.add_argument("--callgrind", action="store_true", help="count instructions")
    parser.add_argument("--keep", type=Path, help="with --callgrind: copy the output file here")
    parser.add_argument("--database-url", default=os.environ.get("WORKER_DATABASE_URL"))
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:  # under callgrind, started by the outer run
        inner = measure(args.database_url, args.records, args.batch, True, args.scenario)
        print(json.dumps(run_on(inner, args.loop)))
        return
    with _database(args.database_url) as url:
        if args.callgrind:
            figures = count(
                "bench.callgrind_driver",
                [
                    f"--records={args.records}",
                    f"--batch={args.batch}",
                    f"--loop={args.loop}",
                    f"--scenario={args.scenario}",
                    f"--database-url={url}",
                ],
                args.keep,
            )
        else:
            run = measure(url, args.records, args.batch, False, args.scenario)
            figures = run_on(run, args.loop)
    print(json.dumps({"loop": args.loop, "scenario": args.scenario, **figures}))


if __name__ == "__main__":
    main()
