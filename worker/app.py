"""Wire the worker together and run it until SIGTERM/SIGINT (G5).

Shutdown: stop fetching, let each lane finish its batch, publish its results,
commit offsets, publish every row left in the outbox (a final relay pass), leave
the group, close connections, exit 0 within `shutdown_timeout_s`. A second signal
exits at once; the open transaction then simply rolls back and its records are
applied by the next owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from worker import store
from worker.auth import Authenticator
from worker.config import Settings
from worker.consumer import ReleaseConsumer, ReportHook
from worker.expiry import run_sweeper
from worker.health import Health, serving
from worker.inbox_pruner import run_inbox_pruner
from worker.processor import BatchProcessor
from worker.publisher import Publisher
from worker.retry import BROKER_ERRORS, DATABASE_ERRORS, transient_retrying
from worker.runtime import close_bounded, close_pool
from worker.supervisor import Supervisor

log = structlog.get_logger("worker.app")


def _required(value: str | None, variable: str) -> str:
    if not value:
        raise SystemExit(
            f"{variable} must be set for this command "
            "(`release-worker demo` and `bench` start embedded servers instead)."
        )
    return value


def require_database(settings: Settings) -> str:
    return _required(settings.database_url, "WORKER_DATABASE_URL")


def require_broker(settings: Settings) -> str:
    return _required(settings.kafka_bootstrap, "WORKER_KAFKA_BOOTSTRAP")


async def create_pool(settings: Settings, size: int | None = None) -> asyncpg.Pool:
    """A connection pool, waiting (with backoff) for as long as the database is away."""
    database_url = require_database(settings)
    async for attempt in transient_retrying(settings):
        with attempt:
            pool = await asyncpg.create_pool(
                database_url,
                min_size=1,
                max_size=size or max(settings.db_pool_size, settings.lanes + 3),
                server_settings={
                    "statement_timeout": str(settings.statement_timeout_ms),
                    # A lock wait ends well before the statement timeout, as a lock wait
                    # (55P03), which is retried instead of rejected (worker/retry.py).
                    "lock_timeout": str(settings.lock_timeout_ms),
                    "application_name": "cart-release-worker",
                },
                reset=_keep_session,
            )
    return pool


async def _keep_session(connection: asyncpg.Connection) -> None:
    """What the pool does to a connection given back, besides asyncpg's own rollback of an
    open transaction: nothing. Its default (advisory unlock, CLOSE ALL, UNLISTEN, RESET
    ALL) is one more round trip at the end of every batch, before its results go out, and
    undoes nothing here: the worker sets no session state (its settings are the
    connection's startup parameters above), takes no advisory locks, listens to nothing
    and opens cursors only inside transactions."""


def make_producer(settings: Settings) -> AIOKafkaProducer:
    bootstrap = require_broker(settings)
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all" if settings.producer_acks == "all" else 1,
        enable_idempotence=settings.producer_idempotence,
        linger_ms=settings.producer_linger_ms,
        max_batch_size=256 * 1024,
        # The broker's limit, enforced here too: a message over it is refused at once, and
        # so parked (publisher.py), also by a broker that does not enforce one (Tansu).
        # Dead letters are shrunk below it (results.dead_letter).
        max_request_size=settings.max_message_bytes,
        compression_type=None if settings.compression == "none" else settings.compression,
        client_id="cart-release-worker",
    )


def make_consumer(settings: Settings) -> AIOKafkaConsumer:
    bootstrap = require_broker(settings)
    drain_ms = int(settings.rebalance_drain_timeout_s * 1000)
    return AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=settings.group_id,
        group_instance_id=settings.group_instance_id,
        client_id="cart-release-worker",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=min(3000, settings.session_timeout_ms // 3),
        # Above the revoke drain deadline, so a draining member is not expelled.
        rebalance_timeout_ms=drain_ms + 10_000,
        max_poll_interval_ms=max(300_000, drain_ms + 10_000),
        max_partition_fetch_bytes=max(1_048_576, settings.max_record_bytes + 64 * 1024),
        fetch_max_bytes=16 * 1024 * 1024,
        # The embedded Tansu 0.6 may hold a fetch for up to about half this wait although
        # records wait (a record's send -> read: p50 4 ms, max 14 ms at 20; p50 27, max 53
        # at 100; ~140 ms median at aiokafka's 500 ms default), and answers an empty fetch
        # after it, so an idle consumer polls every 20 ms: ~0.06 CPU s/s of the broker per
        # idle worker (docs/benchmark.md, "Latency at half load"). Apache Kafka answers as
        # soon as a record is there. Under load fetches return full long before it.
        fetch_max_wait_ms=20,
    )


async def _retry_start(settings: Settings, start: Callable[[], Awaitable[Any]], what: str) -> None:
    while True:
        try:
            await start()
            return
        except BROKER_ERRORS as error:
            log.warning("start_waiting_for", what=what, error=repr(error)[:200])
            await asyncio.sleep(settings.retry_max_s)


async def _watch_health(
    health: Health,
    ping_database: Callable[[], Awaitable[object]],
    ping_broker: Callable[[], Awaitable[object]],
    publisher_healthy: Callable[[], bool],
    interval_s: float = 1.0,
) -> None:
    """Keep `/readyz`'s view of both servers current; any failure of theirs only marks
    that server away (an unexpected one ends the task, which its supervisor restarts)."""
    while True:
        try:
            async with asyncio.timeout(3):
                await ping_database()
            health.database_ok = True
        except DATABASE_ERRORS:
            health.database_ok = False
        try:
            async with asyncio.timeout(3):
                await ping_broker()
            health.broker_ok = publisher_healthy()
        except BROKER_ERRORS:
            health.broker_ok = False
        await asyncio.sleep(interval_s)


async def run_worker(
    settings: Settings,
    *,
    on_report: ReportHook | None = None,
    stop: asyncio.Event | None = None,
    handle_signals: bool = True,
) -> int:
    """Run until a signal (or `stop` is set); return the process exit code."""
    health = Health(
        stall_timeout_s=settings.stall_timeout_s,
        loop_block_limit_s=settings.health_loop_block_s,
    )
    # The probes answer from the first moment, also while the servers are awaited.
    async with serving(health, settings.metrics_host, settings.metrics_port):
        return await _run(settings, health, on_report, stop or asyncio.Event(), handle_signals)


async def _run(
    settings: Settings,
    health: Health,
    on_report: ReportHook | None,
    stop: asyncio.Event,
    handle_signals: bool,
) -> int:
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second_signal_exiting_now", signal=signum)
            os._exit(128 + signum)
        log.info("shutdown_requested", signal=signum)
        stop.set()

    # Installed before the servers are awaited: a signal while they are away ends the
    # wait (no work is in flight yet) with exit 0 instead of killing the process.
    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        async with contextlib.AsyncExitStack() as resources:
            starting = asyncio.create_task(_start(settings, health, on_report, resources))
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait([starting, stopper], return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if not starting.done():
                starting.cancel()
                await asyncio.gather(starting, return_exceptions=True)
                log.info("worker_stopped_before_start")
                return 0
            exit_code = await _serve(settings, health, starting.result(), stop)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
    log.info("worker_stopped", exit_code=exit_code)
    return exit_code


@dataclass
class _Parts:
    pool: asyncpg.Pool
    consumer: AIOKafkaConsumer
    publisher: Publisher
    release_consumer: ReleaseConsumer


async def _start(
    settings: Settings,
    health: Health,
    on_report: ReportHook | None,
    resources: contextlib.AsyncExitStack,
) -> _Parts:
    """Connect everything; each part is closed by `resources` (in reverse order)."""
    pool = await create_pool(settings)
    resources.push_async_callback(close_pool, pool)
    await store.check_schema(pool)
    health.database_ok = True

    producer = make_producer(settings)
    resources.push_async_callback(close_bounded, producer.stop)
    await _retry_start(settings, producer.start, "producer")
    publisher = Publisher(
        producer,
        pool,
        settings.outbox_relay_interval_s,
        settings.outbox_relay_grace_s,
        group_id=settings.group_id,
        results_topic=settings.results_topic,
        max_message_bytes=settings.max_message_bytes,
    )
    # Leftovers of a previous crash go out before anything new (or, if the broker is
    # away, by the periodic pass later).
    await publisher.relay_leftovers(grace_s=0)

    def on_db_retry(_: str) -> None:
        health.database_ok = False

    def on_db_success() -> None:
        health.database_ok = True

    processor = BatchProcessor(
        # A batch's offset UPDATE carries the published watermark this process knows.
        store.PgTransactions(pool, settings.group_id, publisher.watermarks.claim),
        settings,
        Authenticator(lambda d: store.find_partners(pool, d), settings.auth_cache_ttl_s),
        on_retry=on_db_retry,
        on_success=on_db_success,
    )
    consumer = make_consumer(settings)
    release_consumer = ReleaseConsumer(
        consumer,
        processor,
        publisher,
        settings,
        lambda topic: store.stored_offsets(pool, settings.group_id, topic),
        on_report,
    )
    consumer.subscribe([settings.input_topic], listener=release_consumer.listener())
    # Stopping the consumer leaves the group, so the partitions move at once.
    resources.push_async_callback(close_bounded, consumer.stop)
    await _retry_start(settings, consumer.start, "consumer")
    health.broker_ok = True
    health.progress, health.fetch = release_consumer, consumer
    return _Parts(pool, consumer, publisher, release_consumer)


async def _serve(settings: Settings, health: Health, parts: _Parts, stop: asyncio.Event) -> int:
    """Run until `stop`, then shut down as G5 says; return the exit code."""
    pool, publisher, release_consumer = parts.pool, parts.publisher, parts.release_consumer
    # Each background pass only delays work while it is down: restarted with backoff. The
    # consumer is the work itself: if it ends, the worker stops with exit code 1.
    tasks = Supervisor(settings.retry_initial_s, settings.retry_max_s)
    tasks.start("outbox_deleter", publisher.run_deleter)
    tasks.start("outbox_relay", publisher.run_relay)
    tasks.start("results_watermarks", publisher.run_watermarks)
    tasks.start(
        "health_watcher",
        lambda: _watch_health(
            health,
            lambda: pool.fetchval("SELECT 1"),
            parts.consumer.topics,
            lambda: publisher.healthy,
        ),
    )
    if settings.expiry_enabled:
        tasks.start("expiry_sweeper", lambda: run_sweeper(pool, settings, publisher))
    if settings.inbox_retention_hours:
        tasks.start("inbox_pruner", lambda: run_inbox_pruner(pool, settings))
    log.info(
        "worker_started",
        input_topic=settings.input_topic,
        group_id=settings.group_id,
        lanes=settings.lanes,
    )
    running = tasks.start("consumer", release_consumer.run, restart=False)
    stopper = asyncio.create_task(stop.wait())
    failed = asyncio.create_task(tasks.failed.wait())
    exit_code = 0
    try:
        await asyncio.wait([stopper, failed], return_when=asyncio.FIRST_COMPLETED)
        tasks.draining()
        release_consumer.stop()
        started = time.monotonic()
        try:
            async with asyncio.timeout(settings.shutdown_timeout_s):
                await running
                await publisher.flush(settings.shutdown_timeout_s)
                # What the broker acknowledged is stored, so the next owner republishes
                # only what it did not.
                await publisher.release(publisher.watermarks.owned(), settings.shutdown_timeout_s)
                await release_consumer.commit()
        except TimeoutError:
            log.error("shutdown_timeout", seconds=settings.shutdown_timeout_s)
            exit_code = 1
        else:
            # Rows only a relay would publish (written while the broker was away, or left by
            # a crashed predecessor) go out now: if this was the last worker, no relay runs
            # after it (G5). After the commit, so a slow broker cannot cost it; whatever the
            # remaining time does not cover waits in the outbox for the next worker.
            left_s = settings.shutdown_timeout_s - (time.monotonic() - started)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, left_s)):
                    await publisher.relay_leftovers(grace_s=0)
        log.info("worker_stopping", drain_seconds=round(time.monotonic() - started, 3))
    finally:
        # After a timeout a lane may still be inside a transaction: cancelling it rolls the
        # transaction back, and the next owner applies those records.
        stopper.cancel()
        failed.cancel()
        await tasks.close()
        await asyncio.gather(stopper, failed, return_exceptions=True)
    # A task that failed for good (the consumer, or a fatal error) was logged as it ended.
    return 1 if tasks.failed.is_set() else exit_code
