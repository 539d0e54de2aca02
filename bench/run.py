"""`release-worker bench`: every measurement of one run, on one machine, then the report.

Order: the baselines (db_limit by pgbench and by asyncpg, kafka_pipe, naive) on the
steady scenario; the worker on steady, hot stock, whole-cart and a burst; the worker
at a fixed offered rate (open loop) derived from its measured maximum; the HTTP path
(`release-worker api` in front of the worker) at the same rates, then at rising rates
up to the highest whose p99 stays within the target; the worker with 1, 2 and 4
processes in one group; and a scale step: an open-loop stream while the group
goes 1 → 3 → 1 processes (`Bench.scale`). Each run has its own topics, group, partner and
freshly seeded reservations, and is checked for complete, correct results.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from rich.console import Console
from rich.progress import Progress

from bench import dblimit, http
from bench.cpu import CpuSplit
from bench.observe import Processes, ResultReader, peak_rss_mb, stopped_by_signals
from bench.report import (
    Measurement,
    latency_figures,
    percentile,
    postgres_kinds_lines,
    python_speed_ms,
    scale_figures,
    sustained,
    sustained_line,
    table,
    write,
)
from bench.workload import (
    PARTITIONS,
    Scenario,
    Workload,
    create_topics,
    make_producer,
    prepare,
    produce,
    topic_settings,
)
from worker.cli.demo import progress_bars
from worker.config import Settings
from worker.migrate import migrate
from worker.testing.embedded import EmbeddedPostgres, embedded_stack
from worker.testing.environment import settings_env
from worker.testing.store import i1_violations

RESULTS_DIR = Path(__file__).resolve().parent / "results"

STEADY = Scenario("steady", 0, description="3-item carts over 10,000 SKUs")
HOT = Scenario("hot_stock", 0, skus=10, description="every release hits the same 10 SKUs")
WHOLE = Scenario("whole_cart", 0, whole_cart=True, description="items absent: whole cart")
BURST = Scenario("burst", 0, description="all records waiting before the worker starts")
# The workloads the drivers (callgrind_driver, worker_driver) can seed, by name.
DRIVER_SCENARIOS = {s.name: s for s in (STEADY, HOT, WHOLE)}

ServerPids = dict[str, Callable[[], list[int]]]
WORKER = ["worker", "run"]
API = ["worker", "api"]
API_HOST = "127.0.0.1"
SEARCH_STEPS = 8  # rates tried at most when looking for the api's highest sustained rate
PIPE = ["bench.systems", "kafka_pipe"]


@dataclass(frozen=True)
class Plan:
    """How many records each measurement gets; 0 skips it."""

    steady: int
    hot: int
    whole_cart: int
    burst: int
    naive: int
    kafka_pipe: int
    db_asyncpg: int
    pgbench_clients: int
    pgbench_transactions: int
    open_loop_s: float
    rate_fractions: tuple[float, ...]
    scaling: tuple[int, ...]
    batch: int = 500
    db_connections: int = 8
    stall_s: float = 60.0
    warmup_s: float = 3.0  # open loop: seconds at the offered rate before measuring
    # The HTTP path, open loop at these fractions of the worker's steady maximum (the
    # Kafka path's rates, each for open_loop_s); with http_search, then at rising rates
    # (http_step_s each) to the highest whose p99 is within http_p99_ms.
    http_fractions: tuple[float, ...] = ()
    http_search: bool = False
    http_step_s: float = 8.0
    http_p99_ms: float = 250.0
    # py-spy the worker processes, and the api's (collapsed stacks in out_dir/profiles)
    profile: bool = False
    # The scale scenario: processes in the group at each step, each step this long, at
    # this rate (None: `scale_fraction` of the worker's measured steady maximum).
    scale_steps: tuple[int, ...] = ()
    scale_step_s: float = 20.0
    scale_rate: float | None = None
    scale_fraction: float = 0.5
    scenarios: dict[str, Scenario] = field(
        default_factory=lambda: {s.name: s for s in (STEADY, HOT, WHOLE, BURST)}
    )


FULL = Plan(
    steady=40_000,
    hot=20_000,
    whole_cart=20_000,
    burst=100_000,
    naive=1_000,
    kafka_pipe=40_000,
    db_asyncpg=20_000,
    pgbench_clients=8,
    pgbench_transactions=10,
    open_loop_s=20.0,
    rate_fractions=(0.25, 0.5),
    scaling=(1, 2, 4),
    scale_steps=(1, 3, 1),
    http_fractions=(0.25, 0.5),
    http_search=True,
)
QUICK = Plan(
    steady=3_000,
    hot=0,
    whole_cart=0,
    burst=6_000,
    naive=150,
    # Batching, kafka_pipe sends 3,000 records in about 0.1 s: too short a window for the
    # CPU split (/proc counts in 10 ms ticks), which then read 0 µs/item.
    kafka_pipe=20_000,
    db_asyncpg=2_000,
    pgbench_clients=4,
    pgbench_transactions=2,
    open_loop_s=4.0,
    rate_fractions=(0.5,),
    scaling=(),
    batch=250,
    http_fractions=(0.05,),
    http_step_s=2.0,
)


def only_scale(rate: float, plan: Plan = FULL) -> Plan:
    """`plan` reduced to its scale scenario, at `rate` records/s."""
    return replace(
        plan,
        steady=0,
        hot=0,
        whole_cart=0,
        burst=0,
        naive=0,
        kafka_pipe=0,
        db_asyncpg=0,
        pgbench_clients=0,
        rate_fractions=(),
        scaling=(),
        scale_steps=plan.scale_steps or FULL.scale_steps,
        scale_rate=rate,
    )


class Bench:
    def __init__(
        self,
        base: Settings,
        pool: asyncpg.Pool,
        plan: Plan,
        out_dir: Path,
        progress: Progress,
        server_pids: ServerPids | None = None,
    ) -> None:
        self.base = base
        self.server_pids = server_pids or {}
        self.pool = pool
        self.plan = plan
        self.out_dir = out_dir
        self.progress = progress
        self.measurements: list[Measurement] = []

    # ------------------------------------------------------------------ the whole run

    async def run_all(self) -> list[Measurement]:
        p = self.plan
        steady = STEADY.sized(p.steady)
        if p.pgbench_clients and p.pgbench_transactions:
            await self.db_limit_pgbench(steady)
        if p.db_asyncpg:
            await self.db_limit_asyncpg(steady.sized(p.db_asyncpg))
        if p.kafka_pipe:
            await self.system("kafka_pipe", PIPE, steady, p.kafka_pipe)
        if p.naive:
            await self.system("naive", ["bench.systems", "naive"], steady, p.naive)
        worker_steady = await self.system("worker", WORKER, steady, p.steady) if p.steady else None
        for scenario, records in ((HOT, p.hot), (WHOLE, p.whole_cart), (BURST, p.burst)):
            if records:
                await self.system("worker", WORKER, scenario, records)
        if worker_steady is not None:
            for fraction in p.rate_fractions:
                # The same offered rate through the pipe baseline gives the latency floor
                # of the broker, the clients and this harness on this machine.
                rate = fraction * worker_steady.records_per_s
                records = int(rate * (p.open_loop_s + p.warmup_s)) + 50
                await self.system("worker", WORKER, steady, records, rate=rate)
                if p.kafka_pipe:
                    await self.system("kafka_pipe", PIPE, steady, records, rate=rate)
            if p.http_fractions or p.http_search:
                maximum = worker_steady.records_per_s
                await self.api(steady, [f * maximum for f in p.http_fractions], 0.1 * maximum)
            for processes in p.scaling:
                if processes > 1:
                    await self.system("worker", WORKER, steady, p.steady, processes=processes)
        scale_rate = p.scale_rate
        if scale_rate is None and worker_steady is not None:
            scale_rate = p.scale_fraction * worker_steady.records_per_s
        if p.scale_steps and scale_rate:
            await self.scale(steady, scale_rate)
        return self.measurements

    # ------------------------------------------------------------------ baselines

    async def db_limit_pgbench(self, scenario: Scenario) -> None:
        p = self.plan
        task = self.progress.add_task("steady · db_limit/pgbench", total=None)
        pgbench = EmbeddedPostgres(Path(tempfile.gettempdir())).bin_dir / "pgbench"
        assert self.base.database_url
        result = await dblimit.run_pgbench(
            self.pool,
            self.base.database_url,
            pgbench,
            scenario,
            p.pgbench_clients,
            p.pgbench_transactions,
            p.batch,
            CpuSplit(self.server_pids, {}),
        )
        self._db_result("db_limit/pgbench", scenario, result)
        self.progress.update(task, total=1, completed=1)

    async def db_limit_asyncpg(self, scenario: Scenario) -> None:
        p = self.plan
        task = self.progress.add_task("steady · db_limit/asyncpg", total=None)
        split = CpuSplit(self.server_pids, {"db_limit/asyncpg": lambda: [os.getpid()]})
        result = await dblimit.run_asyncpg(
            self.pool, scenario, scenario.records, p.db_connections, p.batch, split
        )
        self._db_result("db_limit/asyncpg", scenario, result)
        self.progress.update(task, total=1, completed=1)

    def _db_result(self, system: str, scenario: Scenario, r: dblimit.DbLimitResult) -> None:
        self.measurements.append(
            Measurement(
                system,
                scenario.name,
                f"{r.connections} connections",
                r.records,
                r.items,
                r.seconds,
                checks={"released": r.released, "ok_all_released": r.released == r.items},
                cpu_split_s=r.cpu_split_s,
            )
        )

    # ------------------------------------------------------------------ a system under test

    async def system(
        self,
        system: str,
        module: list[str],
        scenario: Scenario,
        records: int,
        *,
        rate: float | None = None,
        processes: int = 1,
    ) -> Measurement:
        """Run `module` as `processes` child processes on a fresh topic set and workload."""
        label = system if processes == 1 else f"{system} ×{processes}"
        mode = "backlog" if rate is None else f"open loop {rate:,.0f} rec/s"
        task = self.progress.add_task(f"{scenario.name} · {label} · {mode}: seeding", total=None)
        settings = topic_settings(self.base, f"{scenario.name}-{system}")
        await create_topics(settings)
        workload = await prepare(self.pool, scenario, records)
        self.progress.update(
            task, total=workload.expected_items, description=f"{scenario.name} · {label} · {mode}"
        )
        sent_at: dict[str, int] = {}
        reader = _reader(settings, workload, scenario, sent_at)
        log = self.out_dir / "logs" / f"{settings.group_id}.log"
        profile = None
        if self.plan.profile and module == WORKER:
            profile = self.out_dir / "profiles" / f"{settings.group_id}.txt"
            profile.parent.mkdir(parents=True, exist_ok=True)
        procs = Processes(module, _env(settings), log, processes, profile)
        producer = make_producer(settings.kafka_bootstrap or "")
        split = CpuSplit(
            self.server_pids,
            {system: lambda: [p.pid for p in procs.procs], "harness": lambda: [os.getpid()]},
        )
        cpu: dict[str, float] = {}
        # The CPU split covers the steady part only: from the first result in a backlog
        # (start-up, imports and the group join are setup), from the measured records on
        # in the open loop; its items are the ones completed in that window.
        cpu_from_items = 0

        def window_starts(items_so_far: int) -> None:
            nonlocal cpu_from_items
            split.start()
            cpu_from_items = items_so_far

        await producer.start()
        try:
            everything = range(len(workload.events))
            started_at = time.time()
            if rate is None:
                await produce(producer, settings.input_topic, workload, everything, sent_at)
                started_at = time.time()
                procs.start()
                await self._read(reader, procs.failed, task, on_first=window_starts)
            else:
                split.start()
                procs.start()
                reading = asyncio.create_task(self._read(reader, procs.failed, task))
                # Not measured: a few records to wait for the group join, then warmup_s at
                # the rate (plan caches, buffers, batch sizes settle); then measured.
                n = len(workload.events)
                joined = min(n // 10, 50)
                warm = min(n // 2, joined + int(rate * self.plan.warmup_s))
                await produce(producer, settings.input_topic, workload, range(joined), {})
                await reader.reached(joined * scenario.items_per_cart)
                warming = range(joined, warm)
                await produce(producer, settings.input_topic, workload, warming, {}, rate)
                window_starts(len(reader.collected.distinct))
                measured = range(warm, n)
                await produce(producer, settings.input_topic, workload, measured, sent_at, rate)
                await reading
            cpu = split.stop()
        finally:
            await producer.stop()
            codes = await procs.stop()
        m = self._measure(system, scenario, mode, reader, procs, started_at)
        m.processes, m.offered_rate, m.cpu_split_s = processes, rate, cpu
        m.cpu_items = len(reader.collected.distinct) - cpu_from_items
        await self._check(m, workload, reader, codes, settings, system)
        self.measurements.append(m)
        return m

    async def scale(self, scenario: Scenario, rate: float) -> Measurement:
        """An open-loop stream at `rate` while the group goes through `plan.scale_steps`
        processes, each step `plan.scale_step_s` long: a step up starts processes, a step
        down sends SIGTERM to the newest ones (they drain, publish, commit and leave). After
        the stream, every result is awaited and checked as in any run."""
        p = self.plan
        steps = p.scale_steps
        mode = f"open loop {rate:,.0f} rec/s, {' → '.join(map(str, steps))} processes"
        task = self.progress.add_task(f"scale · worker · {mode}: seeding", total=None)
        settings = topic_settings(self.base, "scale-worker")
        await create_topics(settings)
        joined = 50  # answered before the stream starts: the group has formed
        workload = await prepare(
            self.pool, scenario, joined + int(rate * p.scale_step_s * len(steps))
        )
        n = len(workload.events)
        self.progress.update(task, total=workload.expected_items, description=f"scale · {mode}")
        sent_at: dict[str, int] = {}
        reader = _reader(settings, workload, scenario, sent_at)
        log = self.out_dir / "logs" / f"{settings.group_id}.log"
        env = _env(settings)
        live: list[Processes] = []  # one entry per step up, newest last
        stopped: list[Processes] = []
        codes: list[int | None] = []

        def failed() -> str | None:
            return next((f for g in live if (f := g.failed())), None)

        async def step_down(by: int) -> None:
            while by > 0:
                group = live.pop()
                codes.extend(await group.stop())
                stopped.append(group)
                by -= len(group.procs)

        producer = make_producer(settings.kafka_bootstrap or "")
        await producer.start()
        changes: list[tuple[int, int]] = []  # (unix ms, processes from then on)
        try:
            live.append(Processes(WORKER, env, log, steps[0]))
            live[0].start()
            reading = asyncio.create_task(self._read(reader, failed, task))
            await produce(producer, settings.input_topic, workload, range(joined), sent_at)
            await reader.reached(joined * scenario.items_per_cart)
            stream = asyncio.create_task(
                produce(producer, settings.input_topic, workload, range(joined, n), sent_at, rate)
            )
            changes.append((int(time.time() * 1000), steps[0]))
            for before, after in itertools.pairwise(steps):
                await asyncio.sleep(p.scale_step_s)
                # A step starts with the processes' start or SIGTERM (a stop takes a while).
                changes.append((int(time.time() * 1000), after))
                if after > before:
                    live.append(Processes(WORKER, env, log, after - before))
                    live[-1].start()
                else:
                    await step_down(before - after)
            await stream
            stream_end = int(time.time() * 1000)
            await reading
        finally:
            await producer.stop()
            await step_down(sum(len(g.procs) for g in live))
        m = self._measure("worker", scenario, mode, reader, stopped[-1], changes[0][0] / 1000)
        m.offered_rate, m.processes = rate, max(steps)
        m.peak_rss_mb = round(max(peak for g in stopped for peak in g.peaks), 1)
        m.cpu_s = round(sum(c for g in stopped for c in g.cpu_s), 2)
        measured = [e for e in workload.event_ids[joined:]]
        m.steps, m.scale_series = scale_figures(
            [sent_at[e] for e in measured],
            [ts for ts, _, sent in reader.collected.completions if sent >= changes[0][0]],
            changes,
            stream_end,
        )
        await self._check(m, workload, reader, codes, settings, "worker")
        self.measurements.append(m)
        return m

    async def _read(
        self,
        reader: ResultReader,
        failed: Callable[[], str | None],
        task: Any,
        on_first: Callable[[int], None] | None = None,
    ) -> None:
        """Read results until complete; give up early if a system process died. `on_first`
        is called with the number of items read when the first results arrive."""

        def progress(n: int) -> None:
            nonlocal on_first
            if on_first is not None and n:
                on_first(n)
                on_first = None
            self.progress.update(task, completed=n)

        reading = asyncio.create_task(reader.run(self.plan.stall_s, progress))
        while not reading.done():
            died = failed()
            if died:
                reading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reading
                raise RuntimeError(died)
            await asyncio.wait([reading], timeout=0.5)
        reading.result()

    def _measure(
        self,
        system: str,
        scenario: Scenario,
        mode: str,
        reader: ResultReader,
        procs: Processes,
        started_at: float,
    ) -> Measurement:
        done = sorted(reader.collected.completions)
        first = done[0][0] if done else 0
        last = done[-1][0] if done else 0
        seconds = max(0.001, (last - first) / 1000)
        m = Measurement(
            system,
            scenario.name,
            mode,
            len(done),
            len(done) * scenario.items_per_cart,
            seconds,
            latency_ms=latency_figures([ts - sent for ts, _, sent in done]),
            read_latency_ms=latency_figures([read - sent for _, read, sent in done]),
            peak_rss_mb=round(max(procs.peaks), 1) if procs.peaks else None,
            cpu_s=round(sum(procs.cpu_s), 2) if procs.cpu_s else None,
            drain_s=round(last / 1000 - started_at, 2) if done else None,
        )
        items_per_bucket: dict[int, int] = defaultdict(int)
        latencies: dict[int, list[float]] = defaultdict(list)
        for ts, _, sent in done:
            items_per_bucket[int((ts - first) / 1000)] += scenario.items_per_cart
            latencies[int((ts - first) / 1000)].append(ts - sent)
        # Whole seconds: a batch lands at once, so finer buckets only show the batch size.
        # The last second is partial and would read as a drop.
        series = [(float(b), float(n)) for b, n in sorted(items_per_bucket.items())]
        m.throughput_series = series[:-1] if len(series) > 2 else series
        if mode != "backlog":
            m.latency_series = [
                (float(s), percentile(v, 50), percentile(v, 99))
                for s, v in sorted(latencies.items())
            ]
        m.memory_series = [(round(t - first / 1000, 2), round(mb, 1)) for t, mb in procs.memory]
        return m

    async def _check(
        self,
        m: Measurement,
        workload: Workload,
        reader: ResultReader,
        codes: list[int | None],
        settings: Settings,
        system: str,
    ) -> None:
        c = reader.collected
        expected = workload.expected_items
        m.checks.update(
            results=c.results,
            distinct=len(c.distinct),
            duplicates=c.results - len(c.distinct) - c.rejections,
            outcomes=dict(c.outcomes),
            exit_codes=codes,
            ok_complete=len(c.distinct) == expected,
            ok_all_released=c.outcomes.get("released", 0) == expected and c.rejections == 0,
            ok_exit_0=all(code == 0 for code in codes),
        )
        if system == "kafka_pipe":
            return
        released = await self.pool.fetchval(
            "SELECT count(*) FROM reservations WHERE partner_id = $1 AND status = 'released'",
            workload.partner_id,
        )
        violations = await i1_violations(self.pool)
        m.checks.update(
            released_in_db=int(released),
            i1_violations=violations,
            ok_released_in_db=released == expected,
            ok_i1=violations == 0,
        )
        if system == "worker":
            left = await self.pool.fetchval(
                "SELECT count(*) FROM outbox WHERE topic = $1", settings.results_topic
            )
            m.checks.update(outbox_left=int(left), ok_outbox_drained=left == 0)

    # ------------------------------------------------------------------ the HTTP path

    async def api(self, scenario: Scenario, rates: list[float], search_from: float) -> None:
        """One `release-worker api` and one worker on their own topics, offered each of
        `rates` open loop in turn (a fresh workload each), then, with `plan.http_search`,
        rising rates until the highest whose p99 is within `plan.http_p99_ms` is found."""
        p = self.plan
        settings = topic_settings(self.base, f"{scenario.name}-api")
        await create_topics(settings)
        port = http.free_port(API_HOST)
        env = _env(settings) | {"WORKER_API_HOST": API_HOST, "WORKER_API_PORT": str(port)}
        log = self.out_dir / "logs" / f"{settings.group_id}.log"
        profiles = self.out_dir / "profiles"
        if self.plan.profile:
            profiles.mkdir(parents=True, exist_ok=True)

        def profile(name: str) -> Path | None:
            return profiles / f"{settings.group_id}-{name}.txt" if self.plan.profile else None

        worker = Processes(WORKER, env, log, profile=profile("worker"))
        api = Processes(API, env, log, profile=profile("api"))
        split = CpuSplit(
            self.server_pids,
            {
                "api": lambda: [p.pid for p in api.procs],
                "worker": lambda: [p.pid for p in worker.procs],
                "harness": lambda: [os.getpid()],
            },
        )
        client = http.OpenLoopClient(API_HOST, port, settings.api_timeout_s + 10)
        rows: list[Measurement] = []
        worker.start()
        api.start()
        try:
            await client.wait_ready(60)
            await self._api_joined(client, scenario, port, worker, api)
            for rate in rates:
                step = self._api_step(client, scenario, port, rate, p.open_loop_s, split, api)
                rows.append(await step)
            while p.http_search and len(rows) < len(rates) + SEARCH_STEPS:
                passed = [m.offered_rate or 0 for m in rows if m.checks["within_p99_target"]]
                failed = [m.offered_rate or 0 for m in rows if not m.checks["within_p99_target"]]
                higher = http.next_rate(passed, failed, search_from)
                if higher is None:
                    break
                step = self._api_step(client, scenario, port, higher, p.http_step_s, split, api)
                rows.append(await step)
                failed_now = api.failed() or worker.failed()
                if failed_now:
                    raise RuntimeError(failed_now)
        finally:
            client.close()
            codes = await api.stop() + await worker.stop()
        left = await self.pool.fetchval(
            "SELECT count(*) FROM outbox WHERE topic = $1", settings.results_topic
        )
        violations = await i1_violations(self.pool)
        for m in rows:
            m.checks.update(
                exit_codes=codes,
                outbox_left=int(left),
                i1_violations=violations,
                ok_exit_0=all(code == 0 for code in codes),
                ok_outbox_drained=left == 0,
                ok_i1=violations == 0,
            )
        self.measurements.extend(rows)

    async def _api_joined(
        self, client: http.OpenLoopClient, scenario: Scenario, port: int, *procs: Processes
    ) -> None:
        """Until the worker has joined its group, a request is answered 504: send a few
        (again with the same Idempotency-Key, which is harmless) until they are 200."""
        workload = await prepare(self.pool, scenario, 5)
        pending = [
            http.request_bytes(API_HOST, port, e, i)
            for e, i in zip(workload.events, workload.event_ids, strict=True)
        ]
        deadline = time.monotonic() + self.plan.stall_s
        while pending:
            failed = next((f for p in procs if (f := p.failed())), None)
            if failed or time.monotonic() > deadline:
                raise RuntimeError(failed or "the api answered no request with 200 in time")
            answers = await http.offer(client, pending, rate=50)
            pending = [r for r, a in zip(pending, answers, strict=True) if a.status != 200]

    async def _api_step(
        self,
        client: http.OpenLoopClient,
        scenario: Scenario,
        port: int,
        rate: float,
        seconds: float,
        split: CpuSplit,
        api: Processes,
    ) -> Measurement:
        """Requests at `rate` for `plan.warmup_s` (not measured), then for `seconds`; then wait
        until the database has every release (a 504 is still applied later)."""
        mode = f"open loop {rate:,.0f} req/s"
        task = self.progress.add_task(f"{scenario.name} · api+worker · {mode}: seeding", total=None)
        records = int(rate * (self.plan.warmup_s + seconds)) + 1
        workload = await prepare(self.pool, scenario, records)
        requests = [
            http.request_bytes(API_HOST, port, e, i)
            for e, i in zip(workload.events, workload.event_ids, strict=True)
        ]
        self.progress.update(
            task, total=len(requests), description=f"{scenario.name} · api+worker · {mode}"
        )
        warm = int(rate * self.plan.warmup_s)
        answers = await http.offer(client, requests, rate, warm, split.start)
        cpu = split.stop()
        client.close()
        self.progress.update(task, completed=len(requests))
        cpu["api+worker"] = round(cpu.get("api", 0) + cpu.get("worker", 0), 2)
        measured = answers[warm:]
        released = await self._released(workload)
        items = scenario.items_per_cart
        whole = [http.released_everything(a, items) for a in answers]
        latency = latency_figures([a.latency_ms for a in measured])
        m = Measurement(
            "api+worker",
            scenario.name,
            mode,
            len(measured),
            len(measured) * items,
            max(0.001, max(a.done for a in measured) - measured[0].scheduled),
            offered_rate=rate,
            latency_ms=latency,
            peak_rss_mb=round(peak_rss_mb(api.procs[0].pid), 1),
            cpu_s=cpu["api+worker"],
            cpu_split_s=cpu,
        )
        m.checks.update(
            answers=http.statuses(answers),
            released_in_db=released,
            # A 504 is a documented answer (the release is applied later), a 503
            # `too_many_requests` or `database_unavailable` (the key lookup ran past the
            # api's deadline: overload) a documented refusal that applied nothing, and a
            # request the client gave up on is slow, not wrong: they count against the p99
            # target only.
            ok_answered=all(
                ok or a.status in (504, http.TIMED_OUT) or http.shed(a)
                for ok, a in zip(whole, answers, strict=True)
            ),
            # Each request names fresh reservations: those of a 200 are released, and no
            # more than those of the requests that reached the api (one the client gave up
            # on while waiting for a free connection never did; one given up after it was
            # written is applied unless the api's own deadline cut its produce).
            not_sent=sum(not a.sent for a in answers),
            ok_released_in_db=sum(whole) * items
            <= released
            <= sum(a.sent for a in answers) * items,
            # Sustained: every answer a 200 that released everything, and p99 within target.
            within_p99_target=all(whole) and latency["p99"] <= self.plan.http_p99_ms,
        )
        return m

    async def _released(self, workload: Workload) -> int:
        """Reservations of the workload released, once they all are or none more are for
        `plan.stall_s`."""
        count, last, changed = -1, -1, time.monotonic()
        while count < workload.expected_items and time.monotonic() - changed < self.plan.stall_s:
            count = int(
                await self.pool.fetchval(
                    "SELECT count(*) FROM reservations WHERE partner_id = $1 "
                    "AND status = 'released'",
                    workload.partner_id,
                )
            )
            if count != last:
                last, changed = count, time.monotonic()
            if count < workload.expected_items:
                await asyncio.sleep(0.2)
        return count


def _reader(
    settings: Settings, workload: Workload, scenario: Scenario, sent_at: dict[str, int]
) -> ResultReader:
    """A reader of this run's results topic that knows how many items complete it."""
    return ResultReader(
        settings.kafka_bootstrap or "",
        settings.results_topic,
        workload.expected_items,
        sent_at,
        scenario.items_per_cart,
        PARTITIONS,
    )


def _env(settings: Settings) -> dict[str, str]:
    # The embedded broker delays a group's first join by about the session timeout; a
    # shorter one only shortens start-up, which no figure includes (as in the demo).
    return settings_env(
        settings,
        metrics_port=0,
        log_level=os.environ.get("WORKER_LOG_LEVEL", "warning"),
        session_timeout_ms=os.environ.get("WORKER_SESSION_TIMEOUT_MS", "6000"),
    )


@contextlib.asynccontextmanager
async def servers(settings: Settings) -> AsyncIterator[tuple[Settings, ServerPids]]:
    """The servers in `settings`, or an embedded stack when they are not given; migrated.
    Also how to find the servers' processes, when they are ours, to count their CPU.
    Until the block ends, SIGTERM/SIGINT cancel the caller (`stopped_by_signals`): its
    `finally` blocks stop the child processes it started, then these servers stop."""
    if settings.database_url and settings.kafka_bootstrap:
        given = settings
        stack_cm: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    else:
        stack_cm = embedded_stack()
    async with stopped_by_signals():
        with stack_cm as stack:
            if stack is not None:
                given = settings.model_copy(
                    update={"database_url": stack.database_url, "kafka_bootstrap": stack.bootstrap}
                )
            assert given.database_url
            done = await asyncio.to_thread(migrate, given.database_url)
            if done.returncode != 0:
                raise RuntimeError(f"migration failed: {done.stderr}")
            pids: ServerPids = {}
            if stack is not None:
                pids = {
                    "postgres": lambda: [p for p in [stack.postgres.pid] if p],
                    "broker": lambda: [p for p in [stack.broker.pid] if p],
                }
            yield given, pids


async def run_bench(
    settings: Settings,
    plan: Plan,
    out_dir: Path = RESULTS_DIR,
    console: Console | None = None,
    label: str = "full",
) -> tuple[list[Measurement], Path]:
    """Run the plan; print the table; write JSON and plots to `out_dir`."""
    # Wide enough for the table when the output is a file or a CI log.
    console = console or Console(width=None if Console().is_terminal else 200)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    started = time.monotonic()
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    speed_at_start = python_speed_ms()
    async with servers(settings) as (given, server_pids):
        pool = await asyncpg.create_pool(given.database_url, min_size=2, max_size=12)
        try:
            with progress_bars(console) as progress:
                bench = Bench(given, pool, plan, out_dir, progress, server_pids)
                measurements = await bench.run_all()
        finally:
            await pool.close()
    console.print(table(measurements))
    api_rows = any(m.system == "api+worker" for m in measurements)
    found = sustained(measurements, plan.http_p99_ms) if api_rows else None
    if found is not None:
        console.print(sustained_line(found))
    for line in postgres_kinds_lines([m.to_json() for m in measurements]):
        console.print(line)
    console.print(
        f"This machine's Python speed at the start: sum(range(10**6)) in {speed_at_start} ms "
        "(lower is faster; compare runs across machines by it)."
    )
    meta = {
        "loadavg_at_start": load_at_start,
        "python_speed_ms_at_start": speed_at_start,
        "stamp": stamp,
        "plan": label,
        "duration_s": round(time.monotonic() - started, 1),
        "servers": "embedded" if not settings.database_url else "given",
    } | ({"api_sustained": found} if found is not None else {})
    path = write(measurements, out_dir, stamp, meta, console)
    console.print(f"Results: {path} (and latest.json, throughput/latency/memory .png)")
    return measurements, path


def summary_ok(measurements: list[Measurement]) -> bool:
    return all(m.correct for m in measurements)
