"""Wire the api together (database pool, producer, results reader) and serve it with uvicorn.

Start-up order: the database (partners, for authentication), the producer, the results
reader positioned at the end of every partition, then the socket. Until then nothing
listens; once listening, `/readyz` follows the database and the broker. Shutdown stops
taking connections, lets uvicorn finish the requests in flight, then closes the clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import asyncpg
import structlog
import uvicorn
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from worker import store
from worker.api import metrics
from worker.api.http import create_app
from worker.api.results import ResultsReader
from worker.api.service import MAX_WAITERS, ReleaseService
from worker.api.waiters import Waiters
from worker.app import create_pool, require_broker
from worker.auth import Authenticator
from worker.config import Settings
from worker.contract import MAX_HEADERS_BYTES
from worker.retry import BROKER_ERRORS, DATABASE_ERRORS
from worker.runtime import close_bounded, close_pool
from worker.supervisor import Supervisor
from worker.validate import Limits

log = structlog.get_logger("worker.api")


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the caller decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class RunningApi:
    port: int
    waiters: Waiters
    failed: asyncio.Event  # a task the api cannot serve without died (logged `task_failed`)


@dataclass
class _Health:
    database_ok: bool = True
    broker_ok: bool = True


async def _watch(health: _Health, pool: asyncpg.Pool, consumer: AIOKafkaConsumer) -> None:
    while True:
        try:
            async with asyncio.timeout(3):
                await pool.fetchval("SELECT 1")
            health.database_ok = True
        except DATABASE_ERRORS:
            health.database_ok = False
        try:
            async with asyncio.timeout(3):
                await consumer.topics()
            health.broker_ok = True
        except BROKER_ERRORS:
            health.broker_ok = False
        await asyncio.sleep(1.0)


@contextlib.asynccontextmanager
async def running_api(settings: Settings) -> AsyncIterator[RunningApi]:
    """The api, serving until the block ends (tests and `release-worker api`)."""
    bootstrap = require_broker(settings)
    async with contextlib.AsyncExitStack() as resources:
        pool = await create_pool(settings, size=max(2, settings.db_pool_size))
        resources.push_async_callback(close_pool, pool)
        await store.check_schema(pool)
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            acks="all" if settings.producer_acks == "all" else 1,
            linger_ms=settings.producer_linger_ms,
            # A body at the record limit with the most headers the worker accepts.
            max_request_size=settings.max_record_bytes + 2 * MAX_HEADERS_BYTES,
            client_id="cart-release-api",
        )
        resources.push_async_callback(close_bounded, producer.stop)
        await producer.start()
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            client_id="cart-release-api",
            fetch_max_wait_ms=20,
        )
        resources.push_async_callback(close_bounded, consumer.stop)
        await consumer.start()
        waiters = Waiters(MAX_WAITERS)
        # Read when /metrics is scraped, not set twice a request.
        metrics.WAITERS.set_function(lambda: len(waiters))
        reader = ResultsReader(consumer, settings.results_topic, waiters)
        await reader.position_at_end()

        service = ReleaseService(
            producer=producer,
            authenticator=Authenticator(
                lambda d: store.find_partners(pool, d), settings.auth_cache_ttl_s
            ),
            waiters=waiters,
            input_topic=settings.input_topic,
            limits=Limits(settings.max_record_bytes, settings.max_items, settings.max_attributes),
            timeout_s=settings.api_timeout_s,
        )
        health = _Health()
        # Supervised (DESIGN.md §7): a failure is logged (`task_failed`); the health watcher
        # is restarted, a dead results reader (every request would end as a 504) fails
        # /healthz and stops `release-worker api` with exit code 1.
        supervisor = Supervisor(settings.retry_initial_s, settings.retry_max_s)
        supervisor.start("api_results_reader", reader.run, restart=False)
        supervisor.start("api_health_watcher", lambda: _watch(health, pool, consumer))
        resources.push_async_callback(supervisor.close)

        def alive() -> bool:
            return not supervisor.failed.is_set()

        def ready() -> bool:
            return alive() and reader.positioned and health.database_ok and health.broker_ok

        app = create_app(service, alive, ready)
        # uvicorn binds the socket itself: asyncio sets TCP_NODELAY only on sockets whose
        # protocol is IPPROTO_TCP, and a plain socket.socket() (proto 0) handed to it left
        # Nagle's algorithm on: every answer then waited ~40 ms for a delayed ACK.
        server = _Server(
            uvicorn.Config(
                app,
                host=settings.api_host,
                port=settings.api_port,
                # httptools: the C parser (h11, uvicorn's pure-Python one, cost ~2x the CPU).
                http="httptools",
                lifespan="off",
                log_config=None,
                access_log=False,
                timeout_keep_alive=5,
                timeout_graceful_shutdown=math.ceil(settings.api_timeout_s) + 1,
            )
        )
        serving = asyncio.create_task(server.serve(), name="api_server")
        while not server.started:
            if serving.done():
                await serving  # raises what stopped it
                raise RuntimeError("the api server stopped while starting")
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        log.info("api_started", host=settings.api_host, port=port, input=settings.input_topic)
        try:
            yield RunningApi(port, waiters, supervisor.failed)
        finally:
            server.should_exit = True
            await serving
            log.info("api_stopped")


async def run_api(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT; return the exit code."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with running_api(settings) as api:
        waits = [asyncio.create_task(stop.wait()), asyncio.create_task(api.failed.wait())]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for wait in waits:
            wait.cancel()
    return 1 if api.failed.is_set() else 0
