"""Publish outbox rows to the results and dead-letter topics, then delete them.

Fast path: a batch's messages are sent right after the transaction that wrote them
commits, without awaiting each send; acknowledged rows are deleted in batches.
Slow path: a periodic pass publishes rows left behind (a crash, a broker outage)
once they are older than a grace period, so it does not race the fast path.
Either way a message is published at least once, and a duplicate is the stored
bytes again (G2).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence

import asyncpg
import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner

from worker import metrics, store
from worker.records import OutboxMessage
from worker.retry import BROKER_ERRORS, DATABASE_ERRORS

log = structlog.get_logger("worker.publisher")

# A relay pass gives the broker this long to acknowledge a batch of leftovers.
_RELAY_SEND_TIMEOUT_S = 30.0
# Failures a background pass outlives: the rows stay in the outbox, the next pass takes them.
_DB_FAILURES = DATABASE_ERRORS
_RELAY_FAILURES = (*BROKER_ERRORS, *DATABASE_ERRORS)
_PARTITIONER = DefaultPartitioner()


class Publisher:
    def __init__(
        self,
        producer: AIOKafkaProducer,
        pool: asyncpg.Pool,
        relay_interval_s: float,
        relay_grace_s: float,
        relay_batch: int = 1000,
    ) -> None:
        self._producer = producer
        self._pool = pool
        self._relay_interval_s = relay_interval_s
        self._relay_grace_s = relay_grace_s
        self._relay_batch = relay_batch
        self._inflight: set[asyncio.Task[None]] = set()
        self._acked: list[int] = []
        self._acked_event = asyncio.Event()
        self.healthy = True
        self.published = 0

    async def publish(self, messages: Sequence[OutboxMessage]) -> None:
        """Hand messages to the producer; acknowledgement is tracked in the background."""
        if not messages:
            return
        futures: list[asyncio.Future[object]] = []
        try:
            partitions = await self._partitions(messages)
            for m, partition in zip(messages, partitions, strict=True):
                futures.append(await self._send(m, partition))
        except KafkaError as error:
            # The rows stay in the outbox; the relay pass publishes them later.
            self.healthy = False
            log.warning("publish_failed_left_in_outbox", error=repr(error)[:200])
        task = asyncio.create_task(self._settle(list(messages[: len(futures)]), futures))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _send(self, m: OutboxMessage, partition: int | None = None) -> asyncio.Future[object]:
        # aiokafka refuses a record with neither key nor value (it asserts), which a dead
        # letter of a keyless, valueless record would be: it gets an empty value instead.
        value = b"" if m.payload is None and m.key is None else m.payload
        future: asyncio.Future[object] = await self._producer.send(
            m.topic, value, key=m.key, headers=list(m.headers), partition=partition
        )
        return future

    async def _partitions(self, messages: Sequence[OutboxMessage]) -> list[int | None]:
        """The producer's own key partitioning (murmur2), computed once per key: the items
        of a cart share its key, and murmur2 in pure Python is the costliest part of a send."""
        by_topic: dict[str, list[int]] = {}
        chosen: dict[tuple[str, bytes], int] = {}
        partitions: list[int | None] = []
        for m in messages:
            if m.key is None:
                partitions.append(None)  # the producer spreads keyless records itself
                continue
            found = chosen.get((m.topic, m.key))
            if found is None:
                if m.topic not in by_topic:
                    by_topic[m.topic] = sorted(await self._producer.partitions_for(m.topic))
                everything = by_topic[m.topic]
                found = chosen[(m.topic, m.key)] = _PARTITIONER(m.key, everything, everything)
            partitions.append(found)
        return partitions

    async def _settle(
        self, messages: list[OutboxMessage], futures: list[asyncio.Future[object]]
    ) -> None:
        results = await asyncio.gather(*futures, return_exceptions=True)
        now_ms = time.time() * 1000
        failed = 0
        for message, result in zip(messages, results, strict=True):
            if isinstance(result, BaseException):
                failed += 1
                continue
            if message.outbox_id is not None:
                self._acked.append(message.outbox_id)
            if message.source_ts_ms:
                metrics.LATENCY.observe(max(0.0, (now_ms - message.source_ts_ms) / 1000))
        self.published += len(messages) - failed
        if failed:
            self.healthy = False
            log.warning("publish_not_acknowledged_left_in_outbox", messages=failed)
        else:
            self.healthy = True
        self._acked_event.set()

    async def run_deleter(self) -> None:
        """Delete acknowledged outbox rows in batches, for as long as the worker runs."""
        while True:
            await self._acked_event.wait()
            self._acked_event.clear()
            await self.delete_acked()
            await asyncio.sleep(0.05)

    async def delete_acked(self) -> None:
        while self._acked:
            ids, self._acked = self._acked, []
            try:
                await store.delete_outbox(self._pool, ids)
            except _DB_FAILURES as error:
                # Not deleting only means the relay may publish them again (identical bytes).
                self._acked.extend(ids)
                log.warning("outbox_delete_failed", rows=len(ids), error=repr(error)[:200])
                await asyncio.sleep(1)
                return

    async def flush(self, timeout_s: float) -> None:
        """Wait until everything handed over is acknowledged and deleted (bounded)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._producer.flush()
                while self._inflight:
                    await asyncio.gather(*list(self._inflight), return_exceptions=True)
                await self.delete_acked()

    async def relay_once(self, grace_s: float | None = None) -> int:
        """Publish leftover rows older than the grace period; return how many."""
        grace = self._relay_grace_s if grace_s is None else grace_s
        total = 0
        while True:
            async with self._pool.acquire() as conn, conn.transaction():
                rows = await store.claim_outbox(conn, grace, self._relay_batch)
                if not rows:
                    break
                # The claimed rows stay locked while the broker acknowledges them (so other
                # workers' relays skip them); a stalled broker must not hold them forever:
                # on timeout the transaction rolls back and the rows wait for the next pass.
                async with asyncio.timeout(_RELAY_SEND_TIMEOUT_S):
                    futures = [await self._send(m) for m in rows]
                    await asyncio.gather(*futures)
                await store.delete_outbox(conn, [m.outbox_id for m in rows if m.outbox_id])
            total += len(rows)
            self.published += len(rows)
            if len(rows) < self._relay_batch:
                break
        if total:
            log.info("outbox_relayed", rows=total)
        return total

    async def relay_leftovers(self, grace_s: float | None = None) -> None:
        """One relay pass whose failure (broker or database away) is logged, not raised:
        the rows stay in the outbox for the next pass."""
        try:
            await self.relay_once(grace_s)
            metrics.OUTBOX_BACKLOG.set(await store.outbox_backlog(self._pool))
        except _RELAY_FAILURES as error:
            log.warning("outbox_relay_failed", error=repr(error)[:200])

    async def run_relay(self) -> None:
        """The periodic slow path; failures are logged and retried next period."""
        while True:
            await asyncio.sleep(self._relay_interval_s)
            await self.relay_leftovers()
