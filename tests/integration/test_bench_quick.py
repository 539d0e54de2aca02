"""The bench harness end to end on a tiny plan: its JSON is well-formed and the worker's
results were complete and correct, through Kafka and through the HTTP api. Figures are
never asserted: timing is not a test."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import orjson
import pytest
from rich.console import Console

from bench.run import QUICK, run_bench
from tests.conftest import Servers
from worker.config import Settings

pytestmark = pytest.mark.integration

TINY = replace(
    QUICK,
    steady=300,
    hot=0,
    whole_cart=0,
    burst=0,
    naive=0,
    kafka_pipe=0,
    db_asyncpg=300,
    pgbench_clients=1,
    pgbench_transactions=2,
    batch=100,
    rate_fractions=(),
    scaling=(),
    stall_s=30.0,
    open_loop_s=1.0,
    warmup_s=0.5,
    http_fractions=(0.01,),  # a tiny HTTP point: a few dozen requests a second
)


async def test_tiny_bench_writes_well_formed_json_with_correct_worker_results(
    servers: Servers, tmp_path: Path
) -> None:
    settings = Settings(
        database_url=servers.database_url,
        kafka_bootstrap=servers.bootstrap,
        log_format="console",
    )
    console = Console(file=io.StringIO(), width=200)
    measurements, path = await run_bench(settings, TINY, tmp_path, console, label="tiny")

    document = orjson.loads(path.read_bytes())
    assert document == orjson.loads((tmp_path / "latest.json").read_bytes())
    assert document["plan"] == "tiny"
    assert document["machine"]["nproc"] >= 1
    by_system = {m["system"]: m for m in document["measurements"]}
    assert set(by_system) == {"db_limit/pgbench", "db_limit/asyncpg", "worker", "api+worker"}

    worker = by_system["worker"]
    checks = worker["checks"]
    assert checks["distinct"] == 900  # 300 carts x 3 items, each exactly one distinct result
    assert checks["outcomes"] == {"released": 900}
    assert checks["released_in_db"] == 900
    assert checks["i1_violations"] == 0
    assert checks["outbox_left"] == 0
    assert checks["exit_codes"] == [0]
    assert worker["correct"] is True
    assert worker["records"] == 300
    for key in ("records_per_s", "items_per_s", "peak_rss_mb", "cpu_us_per_item"):
        assert worker[key] > 0
    assert set(worker["latency_ms"]) == {"p50", "p95", "p99", "max"}
    assert set(worker["ratios"]) == {"db_limit/pgbench", "db_limit/asyncpg"}

    for name, items in (("db_limit/pgbench", 2 * 100 * 3), ("db_limit/asyncpg", 900)):
        assert by_system[name]["items"] == items
        assert by_system[name]["checks"]["ok_all_released"] is True
    api = by_system["api+worker"]
    requests = sum(api["checks"]["answers"].values())
    assert requests > api["records"] > 0, "the warm-up's requests are answered, not measured"
    assert api["checks"]["answers"] == {"200": requests}
    assert api["checks"]["released_in_db"] == 3 * requests
    assert api["checks"]["exit_codes"] == [0, 0]
    assert api["correct"] is True
    assert set(api["latency_ms"]) == {"p50", "p95", "p99", "max"}
    assert set(api["cpu_split_s"]) >= {"api", "worker", "api+worker", "harness"}
    assert document["api_sustained"]["p99_target_ms"] == 250

    assert all(m.correct for m in measurements)
    assert (tmp_path / "throughput.png").stat().st_size > 0
