"""Interleaved open-loop runs at a fixed rate, with the worker's time split by stage.

    python -m bench.latency_ab --rate 918 --reps 3 --seconds 15 base pipe lanes4:WORKER_LANES=4
    python -m bench.latency_ab --backlog 20000 --reps 3 base lanes4:WORKER_LANES=4

Each variant is `name[:WORKER_X=v,...]`; a name starting with `pipe` runs `kafka_pipe`,
any other the worker as `python -m bench.stages run` (bench/stages.py) with those
settings. The variants run in turn, `reps` times, each on fresh topics and workload
through `bench.run.Bench.system` (the bench's own open loop: warm-up, reader, CPU split,
checks), on one embedded stack (or the WORKER_* servers). One JSON line per run is
printed and appended to `<out>/latency-ab-<stamp>.jsonl`: latency figures, CPU µs per
item by process group, the load average at its start, and for the worker the stage
breakdown (`bench.stages.breakdown`). Latency on a shared machine is noisy: compare
medians of repeated, interleaved runs, and say what the load was. With `--backlog N`
instead of `--rate`, each run is the bench's backlog mode: N records in the topic before
the system starts (its latency is mostly time spent waiting in the backlog; the CPU per
item is the figure to compare).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from rich.progress import Progress

from bench.run import FULL, PIPE, STEADY, Bench, servers
from bench.stages import breakdown
from worker.config import Settings

STAGES_MODULE = ["bench.stages", "run"]


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
    """`name:WORKER_A=1,WORKER_B=2` -> (name, {field a: "1", field b: "2"})."""
    name, _, assignments = spec.partition(":")
    fields: dict[str, str] = {}
    for assignment in filter(None, assignments.split(",")):
        variable, _, value = assignment.partition("=")
        if not variable.startswith("WORKER_") or not value:
            raise SystemExit(f"not WORKER_NAME=value: {assignment!r}")
        fields[variable.removeprefix("WORKER_").lower()] = value
    return name, fields


async def run(
    rate: float | None,
    reps: int,
    seconds: float,
    specs: list[str],
    out: Path,
    backlog: int | None = None,
) -> None:
    variants = [parse_variant(s) for s in specs]
    stamp = time.strftime("%Y%m%dT%H%M%S")
    log = out / f"latency-ab-{stamp}.jsonl"
    stamps = out / f"stages-{stamp}"
    os.environ["BENCH_STAGES_OUT"] = str(stamps)
    async with servers(Settings()) as (given, pids):
        pool = await asyncpg.create_pool(given.database_url, min_size=2, max_size=12)
        try:
            plan = replace(FULL, open_loop_s=seconds)
            if backlog is not None:
                records, rate = backlog, None
            else:
                assert rate is not None, "a rate or a backlog"
                records = int(rate * (seconds + plan.warmup_s)) + 50
            scenario = STEADY.sized(records)
            with Progress(disable=True) as progress:
                bench = Bench(given, pool, plan, out, progress, pids)
                for rep in range(reps):
                    for name, fields in variants:
                        bench.base = given.model_copy(update=fields)
                        load = round(os.getloadavg()[0], 2)
                        pipe = name.startswith("pipe")
                        system, module = ("kafka_pipe", PIPE) if pipe else ("worker", STAGES_MODULE)
                        m = await bench.system(system, module, scenario, records, rate=rate)
                        row: dict[str, Any] = {
                            "rep": rep,
                            "variant": name,
                            "rate": rate,
                            "load1": load,
                            "latency_ms": m.latency_ms,
                            "read_latency_ms": m.read_latency_ms,
                            "cpu_us_per_item": m.cpu_us_per_item_by_process,
                            "correct": m.correct,
                        }
                        if not pipe:
                            stages = _collect(stamps, seconds)  # removes the stamps too
                            if rate is not None:  # a backlog's stages are not comparable
                                row["stages"] = stages
                        print(json.dumps(row), flush=True)
                        _append(log, row)
        finally:
            await pool.close()


def _append(log: Path, row: dict[str, Any]) -> None:
    with log.open("a") as f:
        f.write(json.dumps(row) + "\n")


def _collect(stamps: Path, seconds: float) -> dict[str, Any]:
    """The stamps the worker process(es) of the last run wrote, reduced; files removed."""
    data: dict[str, list[Any]] = {"rows": [], "batches": [], "commits": []}
    for path in stamps.parent.glob(f"{stamps.name}-*.json"):
        for key, values in orjson.loads(path.read_bytes()).items():
            data[key] += values
        path.unlink()
    return breakdown(data, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--rate", type=float, help="records/s offered")
    mode.add_argument("--backlog", type=int, help="records in the topic before the start")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=15.0, help="measured, after warm-up")
    parser.add_argument("--out", type=Path, default=Path("bench/results/latency-ab"))
    parser.add_argument("variants", nargs="+", help="name[:WORKER_X=v,...]; pipe = kafka_pipe")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    asyncio.run(run(args.rate, args.reps, args.seconds, args.variants, args.out, args.backlog))


if __name__ == "__main__":
    main()
