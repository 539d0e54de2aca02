"""Instructions per item of the whole worker process in a steady backlog.

    python -m bench.worker_driver [--records 3000] [--batch 500] [--loop uvloop|asyncio]
                                  [--callgrind]

Where `bench.callgrind_driver` counts the worker's own Python outside the Kafka clients,
this counts all of the worker process: `run_worker` as `release-worker run` starts it
(two lanes, the consumer's fetch loop, the publisher, the supervised tasks, metrics and
logging) on an embedded PostgreSQL and an embedded broker (or the `--database-url` and
`--bootstrap` given). The steady scenario (3-item carts) is seeded and all its records
produced before the worker starts: a backlog. The first `--warm-up` records' items are
not measured; measuring starts at the batch report that passes them and stops at the
one that reaches every item (the results of the last batches may still be settling).

It prints the CPU of this process and of PostgreSQL per item over the measured part
(from /proc: a loaded-machine figure). With `--callgrind` it runs itself again under
valgrind, instrumentation switched on for the measured part only, and prints
instructions per item as well. The servers are not under valgrind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg

from bench.callgrind import count, run_on, toggle
from bench.cpu import cpu_seconds, parent_pid, tree_cpu_seconds
from bench.run import DRIVER_SCENARIOS as SCENARIOS
from bench.run import STEADY
from bench.workload import (
    create_topics,
    make_producer,
    prepare,
    produce,
    topic_settings,
    vacuum_analyze,
)
from worker import logs
from worker.app import run_worker
from worker.cli.main import tune_garbage_collector
from worker.config import Settings
from worker.migrate import migrate
from worker.release import BatchReport
from worker.testing.embedded import embedded_stack


async def measure(
    url: str,
    bootstrap: str,
    records: int,
    warm_up: int,
    batch: int,
    callgrind: bool,
    scenario: str = STEADY.name,
) -> dict[str, float]:
    base = Settings(
        database_url=url,
        kafka_bootstrap=bootstrap,
        batch_max_records=batch,
        metrics_port=0,
        session_timeout_ms=6000,  # as the bench: only start-up is shorter
    )
    settings = topic_settings(base, "driver")
    await create_topics(settings)
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    try:
        workload = await prepare(pool, SCENARIOS[scenario], warm_up + records)
        await vacuum_analyze(pool)
        backend = await pool.fetchval("SELECT pg_backend_pid()")
        postmaster = parent_pid(backend)  # the server's main process: its tree is PostgreSQL
        producer = make_producer(bootstrap)
        await producer.start()
        try:
            await produce(producer, settings.input_topic, workload, range(warm_up + records), {})
        finally:
            await producer.stop()
    finally:
        await pool.close()

    per_cart = SCENARIOS[scenario].items_per_cart
    warm_items, total = warm_up * per_cart, (warm_up + records) * per_cart
    stop = asyncio.Event()
    seen = 0
    start: tuple[float, float] | None = None
    end: tuple[float, float] | None = None
    counted = batches = 0

    def on_report(report: BatchReport) -> None:
        nonlocal seen, start, end, counted, batches
        seen += sum(report.outcomes.values())
        batches += start is not None and end is None
        if start is None and seen >= warm_items:
            if callgrind:
                toggle(True)
            start, counted = (cpu_seconds(os.getpid()), tree_cpu_seconds(postmaster)), seen
            print("measuring", file=sys.stderr, flush=True)  # for a profiler to attach
        elif start is not None and end is None and seen >= total:
            end = (cpu_seconds(os.getpid()), tree_cpu_seconds(postmaster))
            if callgrind:
                toggle(False)
            counted = seen - counted
            stop.set()

    logs.configure(level="warning")
    tune_garbage_collector()  # as `release-worker run` does once started
    code = await run_worker(settings, on_report=on_report, stop=stop, handle_signals=False)
    if code != 0 or start is None or end is None:
        raise RuntimeError(f"worker exit {code}, {seen} of {total} items seen")
    return {
        "records": records,
        "items": counted,
        # Transactions measured: each has a fixed cost, so fewer, fuller batches cost less.
        "batches": batches,
        "worker_cpu_us_per_item": round(1e6 * (end[0] - start[0]) / counted, 1),
        "postgres_cpu_us_per_item": round(1e6 * (end[1] - start[1]) / counted, 1),
    }


@contextlib.contextmanager
def _servers(url: str | None, bootstrap: str | None) -> Iterator[tuple[str, str]]:
    """The servers given, or an embedded stack; migrated."""
    with contextlib.ExitStack() as stack:
        if url is None or bootstrap is None:
            embedded = stack.enter_context(embedded_stack())
            url, bootstrap = embedded.database_url, embedded.bootstrap
        done = migrate(url)
        if done.returncode != 0:
            raise RuntimeError(f"migration failed: {done.stderr}")
        yield url, bootstrap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=3000, help="records measured")
    parser.add_argument("--warm-up", type=int, default=1000, help="records before measuring")
    parser.add_argument("--batch", type=int, default=500, help="WORKER_BATCH_MAX_RECORDS")
    parser.add_argument(
        "--loop", choices=("uvloop", "asyncio"), default="uvloop", help="WORKER_EVENT_LOOP"
    )
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default=STEADY.name)
    parser.add_argument("--callgrind", action="store_true", help="count instructions")
    parser.add_argument("--keep", type=Path, help="with --callgrind: copy the output file here")
    parser.add_argument("--database-url", default=os.environ.get("WORKER_DATABASE_URL"))
    parser.add_argument("--bootstrap", default=os.environ.get("WORKER_KAFKA_BOOTSTRAP"))
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        inner = measure(
            args.database_url,
            args.bootstrap,
            args.records,
            args.warm_up,
            args.batch,
            True,
            args.scenario,
        )
        figures = run_on(inner, args.loop)
        print(json.dumps(figures))
        return
    with _servers(args.database_url, args.bootstrap) as (url, bootstrap):
        if args.callgrind:
            figures = count(
                "bench.worker_driver",
                [
                    f"--records={args.records}",
                    f"--warm-up={args.warm_up}",
                    f"--batch={args.batch}",
                    f"--loop={args.loop}",
                    f"--scenario={args.scenario}",
                    f"--database-url={url}",
                    f"--bootstrap={bootstrap}",
                ],
                args.keep,
            )
        else:
            outer = measure(
                url, bootstrap, args.records, args.warm_up, args.batch, False, args.scenario
            )
            figures = run_on(outer, args.loop)
    print(json.dumps({"loop": args.loop, "scenario": args.scenario, **figures}))


if __name__ == "__main__":
    main()
