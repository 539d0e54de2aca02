"""Prune inbox rows older than `inbox_retention_hours`, in small batches.

Replays inside the retention get the stored results byte for byte (G2). A replay
older than it is applied afresh and can still never change stock again (G3): a
released reservation never goes back to `reserved`, so it reports `already_released`.
"""

from __future__ import annotations

import asyncio

import asyncpg
import structlog

from worker import store
from worker.config import Settings
from worker.retry import transient_retrying

log = structlog.get_logger("worker.housekeeping")

PRUNE_BATCH = 5000


async def prune_once(pool: asyncpg.Pool, settings: Settings) -> int:
    """Delete every inbox row past the retention, batch by batch; return how many."""
    total = 0
    while True:
        async for attempt in transient_retrying(settings):
            with attempt:
                deleted = await store.prune_inbox(
                    pool, settings.inbox_retention_hours * 3600, PRUNE_BATCH
                )
        total += deleted
        if deleted < PRUNE_BATCH:
            return total


async def run_inbox_pruner(pool: asyncpg.Pool, settings: Settings) -> None:
    while True:
        try:
            pruned = await prune_once(pool, settings)
            if pruned:
                log.info("inbox_pruned", rows=pruned)
        except Exception:
            # A failed pass only delays pruning; the next period tries again.
            log.exception("inbox_prune_failed")
        await asyncio.sleep(settings.inbox_prune_interval_s)
