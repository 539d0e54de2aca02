"""The database and the broker go away mid-stream; the worker waits and resumes (G6)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.conftest import Servers
from tests.faults.conftest import BedFactory
from tests.faults.harness import fault_bed
from tests.faults.proxy import Proxy
from worker.embedded import EmbeddedBroker, free_port

pytestmark = pytest.mark.faults


async def test_terminated_connections_mid_transaction_retry_the_whole_transaction(
    bed_factory: BedFactory,
) -> None:
    async with bed_factory(batch_max_records=50) as bed:
        await bed.seed(carts=2_000)
        stream = bed.stream()
        await bed.produce(stream.events)
        await bed.start_worker()
        killed, at = 0, list[int]()
        for _ in range(8):
            # Each time after the worker made progress again: it recovered from the last one.
            await bed.wait_applied((at[-1] if at else 0) + 1)
            pids = await bed.wait_worker_transaction()
            done = await bed.pool.fetch(
                "SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid", pids
            )
            killed += sum(1 for r in done if r[0])
            at.append(await bed.applied())
        assert killed >= 8
        await bed.check(
            stream,
            f"pg_terminate_backend on {killed} worker connections inside transactions, "
            f"at applied-record counts {at}",
        )


async def test_postgres_stopped_for_10s_mid_stream(
    bed_factory: BedFactory, servers: Servers
) -> None:
    if servers.stack is None:
        pytest.skip("PostgreSQL was given by WORKER_DATABASE_URL: the test cannot stop it")
    postgres = servers.stack.postgres
    async with bed_factory(batch_max_records=200) as bed:
        await bed.seed(carts=2_000)
        stream = bed.stream()
        await bed.produce(stream.events)
        worker = await bed.start_worker()
        applied = await bed.wait_applied(1, timeout_s=60)
        await asyncio.to_thread(postgres.stop, "immediate")
        down = time.monotonic()
        await asyncio.sleep(10)
        assert worker.running, worker.tail()
        await asyncio.to_thread(postgres.start)
        await bed.check(
            stream,
            f"PostgreSQL stopped (immediate) at {applied} applied records, started again "
            f"after {time.monotonic() - down:.1f}s; worker retried "
            f"{worker.log_lines('transient_failure_retrying')} times",
        )


async def test_broker_connection_stalled_then_cut_for_10s(servers: Servers, tmp_path: Path) -> None:
    # Tansu tells clients its advertised address; a broker of this test's own advertises the
    # proxy, so the worker's every connection (not only bootstrap) goes through it.
    proxy_port = free_port()
    broker = EmbeddedBroker(tmp_path / "broker", None, proxy_port)
    await asyncio.to_thread(broker.start)
    proxy = Proxy(broker.port, proxy_port)
    await proxy.start()
    try:
        async with fault_bed(
            servers.database_url, proxy.bootstrap, tmp_path, session_timeout_ms=10_000
        ) as bed:
            await bed.seed(carts=2_000)
            stream = bed.stream()
            half = len(stream.events) // 2
            await bed.produce(stream.events[:half])
            worker = await bed.start_worker()
            applied = await bed.wait_applied(1, timeout_s=60)
            proxy.stall()
            await asyncio.sleep(5)
            stalled_at = await bed.applied()
            await proxy.cut()
            await asyncio.sleep(10)
            cut_at, waiting = await bed.applied(), await bed.outbox_left()
            assert worker.running, worker.tail()
            await proxy.restore()
            await bed.produce(stream.events[half:])
            await bed.check(
                stream,
                f"broker connections stalled for 5s at {applied} applied records "
                f"({stalled_at} when cut), cut and refused for 10s ({cut_at} applied at "
                f"restore, {waiting} results waiting in the outbox); {proxy.connections} "
                "connections through the proxy",
            )
    finally:
        await proxy.stop()
        await asyncio.to_thread(broker.stop)
