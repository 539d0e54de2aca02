"""The api+worker HTTP rows of the bench alone, at given rates: the api's CPU per request.

`python -m bench.api_rate SECONDS RATE [RATE ...] [--search] [--profile]` (embedded servers unless
WORKER_* ones are given): one `release-worker api` and one worker on fresh topics, each
RATE offered open loop for SECONDS after the bench's warm-up, exactly as the `api+worker`
rows of `python -m worker bench`; with `--search`, from the first RATE up and down to
the highest rate whose p99 is within 250 ms instead. Prints, per step, the api process's
CPU µs per measured request (less sensitive to a loaded machine than rates) and latency.
`--profile`: py-spy the api and the worker (collapsed stacks in the printed directory;
summarise with `python -m bench.profile FILE`).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import asyncpg
from rich.console import Console
from rich.progress import Progress

from bench.run import QUICK, STEADY, Bench, servers
from worker import logs
from worker.cli.common import load_settings


async def main(seconds: float, rates: list[float], search: bool, profile: bool) -> None:
    logs.configure("console", "warning")
    plan = replace(
        QUICK, open_loop_s=seconds, http_search=search, http_step_s=seconds, profile=profile
    )
    out = Path(tempfile.mkdtemp(prefix="api-rate-"))
    async with servers(load_settings()) as (given, pids):
        pool = await asyncpg.create_pool(given.database_url, min_size=2, max_size=12)
        try:
            with Progress(console=Console(stderr=True)) as progress:
                bench = Bench(given, pool, plan, out, progress, pids)
                steady = STEADY.sized(1000)
                await bench.api(steady, [] if search else rates, rates[0])
        finally:
            await pool.close()
    print(f"out: {out}")
    for m in bench.measurements:
        api_s = m.cpu_split_s.get("api", 0.0)
        print(
            f"{m.offered_rate or 0:6.0f} req/s  api CPU {1e6 * api_s / m.records:5.0f} µs/request"
            f"  p50 {m.latency_ms['p50']:4.0f} ms  p99 {m.latency_ms['p99']:4.0f} ms"
            f"  within p99 target: {m.checks['within_p99_target']}  {m.checks['answers']}"
            f"  released {m.checks['released_in_db']}, never sent {m.checks['not_sent']}"
            f" (check: {'ok' if m.checks['ok_released_in_db'] else 'FAILED'})"
        )


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if len(args) < 2:
        sys.exit(__doc__)
    rates = [float(r) for r in args[1:]]
    asyncio.run(main(float(args[0]), rates, "--search" in sys.argv, "--profile" in sys.argv))
