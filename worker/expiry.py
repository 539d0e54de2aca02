"""The timeout sweeper (DESIGN.md §5): release reservations whose `expires_at` passed.

Each pass locks up to `expiry_batch_size` overdue reservations with SKIP LOCKED
(several workers share the work; rows a release holds are left to it), marks
them expired, returns their quantity and writes `item_result`s with trigger
`expiry` and eventId `expiry:<reservationId>` to the outbox, in one transaction.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import asyncpg
import structlog

from worker import metrics, store
from worker.config import Settings
from worker.contract import EXPIRY_EVENT_PREFIX, Outcome, Trigger
from worker.publisher import Publisher
from worker.records import OutboxMessage
from worker.release import ItemDecision, Reservation, item_payloads, stock_deltas
from worker.results import result_headers, result_messages
from worker.retry import transient_retrying

log = structlog.get_logger("worker.expiry")


async def sweep_once(pool: asyncpg.Pool, settings: Settings) -> list[OutboxMessage]:
    """One transaction: expire a batch, return stock, enqueue the results."""
    async with pool.acquire() as conn, conn.transaction():
        rows = await store.expire_due(conn, settings.expiry_batch_size)
        if not rows:
            return []
        await store.PgReleaseStore(conn, settings.group_id).return_stock(
            stock_deltas((r.sku, r.location_id, r.quantity) for r in rows)
        )
        now = datetime.now(UTC)
        messages = [expiry_result(r, settings.results_topic, now) for r in rows]
        enqueued = await store.enqueue(conn, messages)
    metrics.EXPIRED.inc(len(rows))
    metrics.ITEMS.labels(outcome=Outcome.EXPIRED.value).inc(len(rows))
    metrics.RELEASED_QUANTITY.inc(sum(r.quantity for r in rows))
    return enqueued


def expiry_result(row: Reservation, topic: str, now: datetime) -> OutboxMessage:
    """The `item_result` of an expired reservation; it names the reservation's partner."""
    event_id = f"{EXPIRY_EVENT_PREFIX}{row.reservation_id}"
    expired = ItemDecision(row.cart_item_id, row.reservation_id, Outcome.EXPIRED, row.quantity)
    payloads = item_payloads(event_id, Trigger.EXPIRY, row.cart_id, [expired], now)
    headers = result_headers(event_id, row.partner_id, None)
    (message,) = result_messages(topic, row.cart_id, payloads, headers)
    return message


async def run_sweeper(pool: asyncpg.Pool, settings: Settings, publisher: Publisher) -> None:
    """Sweep every `expiry_interval_s`; a full batch sweeps again at once.

    Outages and lock waits are retried inside a pass (G6). Any other failure ends the
    task, which its supervisor logs and restarts with backoff (`worker/supervisor.py`):
    a sweeper that died silently would leave reservations held for ever. Nothing is lost
    either way: a pass commits fully or not at all, and its results are in the outbox
    before they are published.
    """
    while True:
        async for attempt in transient_retrying(settings):
            with attempt:
                messages = await sweep_once(pool, settings)
        if messages:
            log.info("reservations_expired", count=len(messages))
            await publisher.publish(messages)
        if len(messages) < settings.expiry_batch_size:
            async for attempt in transient_retrying(settings):
                with attempt:
                    await refresh_summaries(pool, settings)
            await asyncio.sleep(settings.expiry_interval_s)


# Page ranges of the whole table re-summarised by each call, in turn (16 pages each).
ROLLING_RANGES = 64


async def refresh_summaries(pool: asyncpg.Pool, settings: Settings) -> int:
    """Keep the partial BRIN expiry index tight (migration ..._hot_releases.sql).

    Called once a pass has expired everything due: the page ranges holding rows that
    came due since the last call (by any worker) are re-summarised, their rows being
    expired, released or confirmed by now, so those ranges drop out of the due query's
    reads. Each call reaches back at least a minute and three sweep intervals, for a row
    that a release held during a pass (SKIP LOCKED) and released after it, and goes on
    with a rolling pass over the whole table (ROLLING_RANGES a call) for rows that left
    `reserved` long after they came due. Return how many ranges (-1: skipped).
    """
    interval = settings.expiry_interval_s
    async with pool.acquire() as conn:
        ranges = await store.resummarize_expiry(
            conn, max(60.0, 3 * interval), interval / 2, ROLLING_RANGES
        )
    if ranges < 0:
        log.info("expiry_summaries_skipped", reason="another sweeper or a VACUUM held the lock")
    elif ranges:
        log.debug("expiry_summaries_refreshed", ranges=ranges)
    return ranges
