"""Inbox pruning: rows older than `inbox_retention_hours` become tombstones, in small batches.

Replays inside the retention get the stored results byte for byte (G2). Pruning drops
a row's result payloads but keeps its key (partner, eventId), so a replay at any age is
still recognised and changes nothing (G3): it is answered from the reservations, which
carry the eventId that released them (`release.decide_pruned_replay`). A tombstone is
the row without its results, about 150 bytes with the index entry for short ids.
"""

from __future__ import annotations

import asyncio

import asyncpg
import structlog

from worker import store
from worker.config import Settings
from worker.retry import transient_retrying

log = structlog.get_logger("worker.inbox_pruner")

PRUNE_BATCH = 5000


async def prune_once(pool: asyncpg.Pool, settings: Settings) -> int:
    """Prune every inbox row past the retention, batch by batch; return how many."""
    total = 0
    while True:
        async for attempt in transient_retrying(settings):
            with attempt:
                pruned = await store.prune_inbox(
                    pool, settings.inbox_retention_hours * 3600, PRUNE_BATCH
                )
        total += pruned
        if pruned < PRUNE_BATCH:
            return total


async def run_inbox_pruner(pool: asyncpg.Pool, settings: Settings) -> None:
    """Prune every `inbox_prune_interval_s`. A failed pass only delays pruning: it ends the
    task, which its supervisor logs and restarts with backoff (`worker/supervisor.py`)."""
    while True:
        pruned = await prune_once(pool, settings)
        if pruned:
            log.info("inbox_pruned", rows=pruned)
        await asyncio.sleep(settings.inbox_prune_interval_s)
