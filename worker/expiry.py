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
    summaries = ExpirySummaries()
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
                    await summaries.refresh(pool)
            await asyncio.sleep(settings.expiry_interval_s)


class ExpirySummaries:
    """Keeps the partial BRIN expiry index tight (migration ..._hot_releases.sql).

    Once a pass has expired everything due, the page ranges holding rows whose
    `expires_at` passed since the pass before the last one are re-summarised: their
    rows are now expired, released or confirmed, so those ranges drop out of the due
    query's reads. Each window overlaps the one before, so a row that a release held
    during one pass (SKIP LOCKED) and released after it is covered by the next. The
    first pass of a process covers every row up to now, which reads the table once; the
    second starts where it ended.
    """

    def __init__(self) -> None:
        self._until: list[datetime] = []

    async def refresh(self, pool: asyncpg.Pool) -> int:
        """Re-summarise the ranges of the current window; return how many (-1: skipped)."""
        after = self._until[-2] if len(self._until) >= 2 else None
        async with pool.acquire() as conn:
            until, ranges = await store.resummarize_expiry(conn, after)
        if ranges < 0:
            log.info("expiry_summaries_skipped", reason="reservations maintenance lock busy")
            return ranges
        self._until = [*(self._until or [until])[-1:], until]
        if ranges:
            log.debug("expiry_summaries_refreshed", ranges=ranges)
        return ranges
