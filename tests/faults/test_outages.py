"""The database and the broker go away mid-stream; the worker waits and resumes (G6)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import Servers
from tests.faults.conftest import BedFactory
from tests.faults.harness import fault_bed
from tests.faults.proxy import Proxy
from worker.testing.embedded import EmbeddedBroker, free_port

pytestmark = pytest.mark.faults


async def test_terminated_connections_mid_transaction_retry_the_whole_transaction(
    bed_factory: BedFactory,
) -> None:
    async with bed_factory(batch_max_records=50) as bed:
        await bed.seed(carts=2_000)
        stream = bed.stream()
        await bed.produce(stream.events)
        await bed.start_worker()
        # A kill counts once its transaction is seen aborted: the backend was inside it when
        # the kill landed (one that committed just before is not counted).
        statuses: Counter[str] = Counter()
        at: list[int] = []
        while statuses["aborted"] < 8:
            assert len(at) < 20, f"20 rounds, only {statuses['aborted']} kills inside: {statuses}"
            # Each time after the worker made progress again: it recovered from the last one.
            await bed.wait_applied((at[-1] if at else 0) + 1)
            hit = await bed.terminate_worker_transactions()
            statuses.update(await bed.transaction_statuses(hit))
            at.append(await bed.applied())
        await bed.check(
            stream,
            f"pg_terminate_backend on {sum(statuses.values())} worker connections chosen "
            f"inside transactions, at applied-record counts {at}; their transactions: "
            f"{dict(statuses)} (aborted: the kill landed inside)",
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
        await bed.wait_applied(1, timeout_s=60)
        # Mid-stream: records are left to apply when the database goes away.
        applied = await bed.applied()
        remaining = len(stream.events) - applied
        await asyncio.to_thread(postgres.stop, "immediate")
        down = time.monotonic()
        retries_before = worker.log_lines("transient_failure_retrying")
        await asyncio.sleep(10)
        assert worker.running, worker.tail()
        retried = worker.log_lines("transient_failure_retrying") - retries_before
        await asyncio.to_thread(postgres.start)
        assert remaining > 0, "the stream was applied before PostgreSQL stopped"
        assert retried > 0, "the worker met no failure while PostgreSQL was stopped"
        await bed.check(
            stream,
            f"PostgreSQL stopped (immediate) at {applied} applied records ({remaining} "
            f"left), started again after {time.monotonic() - down:.1f}s; the worker "
            f"retried {retried} times while it was down",
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
            servers.database_url,
            proxy.bootstrap,
            tmp_path,
            worker_database_url=servers.worker_database_url,
            session_timeout_ms=10_000,
        ) as bed:
            await bed.seed(carts=2_000)
            stream = bed.stream()
            half = len(stream.events) // 2
            await bed.produce(stream.events[:half])
            worker = await bed.start_worker()
            applied = await bed.wait_applied(1, timeout_s=60)
            # Only the worker is connected now (the producer and admin clients closed).
            through_proxy = proxy.open
            proxy.stall()
            await asyncio.sleep(5)
            stalled_at = await bed.applied()
            await proxy.cut()
            await asyncio.sleep(10)
            cut_at = await bed.applied()
            waiting = await bed.outbox_left() + await bed.unpublished_left()
            assert worker.running, worker.tail()
            await proxy.restore()
            # The fault reached the worker: its connections went through the proxy, the
            # bytes it sent while stalled were held, the cut closed what was open, and its
            # work stopped short: results were left unpublished or records unapplied.
            assert through_proxy > 0, "the worker's connections did not go through the proxy"
            assert proxy.held > 0, "no bytes were held back during the stall"
            assert proxy.closed_by_cut > 0, "the cut closed no connection"
            assert waiting > 0 or cut_at < half, "nothing stalled: all applied and published"
            await bed.produce(stream.events[half:])
            await bed.check(
                stream,
                f"broker connections ({through_proxy} open through the proxy) stalled for 5s "
                f"at {applied} applied records ({proxy.held} reads held; {stalled_at} applied "
                f"when cut), cut ({proxy.closed_by_cut} connections closed) and refused for "
                f"10s ({cut_at} of {half} applied at restore, {waiting} outbox rows or inbox rows "
                f"above the watermark waiting); {proxy.connections} connections through the "
                "proxy in all",
            )
    finally:
        await proxy.stop()
        await asyncio.to_thread(broker.stop)
