"""Publish outbox rows to the results and dead-letter topics, then delete them.

Fast path: a batch's messages are sent right after the transaction that wrote them
commits, without awaiting each send; acknowledged rows are deleted in batches.
Slow path: a periodic pass publishes rows left behind (a crash, a broker outage)
once they are older than a grace period, so it does not race the fast path.
Either way a message is published at least once, and a duplicate is the stored
bytes again (G2).

One bad message never blocks the others (DESIGN.md §7): a message the broker
refuses for good (`retry.broker_refusal`: too large, not authorised, ...) is left
by the fast path to the relay, and the relay parks its row (kept, counted, logged
once, listed by `doctor`, never re-sent) while it publishes and deletes the rows
around it. An outage parks nothing: the rows it touched wait for the next pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import asyncpg
import structlog
from aiokafka.partitioner import DefaultPartitioner

from worker import metrics, store
from worker.records import OutboxMessage
from worker.retry import BROKER_ERRORS, BROKER_REFUSAL_REASONS, DATABASE_ERRORS, broker_refusal

log = structlog.get_logger("worker.publisher")

# A relay pass gives the broker this long to acknowledge a batch of leftovers; what is not
# acknowledged by then waits for the next pass.
_RELAY_SEND_TIMEOUT_S = 30.0
# ... and a topic this long to show up in the cluster's metadata (aiokafka would wait its
# request timeout, 40 s, for each send to a missing topic, holding up the rows behind it).
_TOPIC_WAIT_S = 5.0
# Failures a background pass outlives: the rows stay in the outbox, the next pass takes them.
_RELAY_FAILURES = (*BROKER_ERRORS, *DATABASE_ERRORS)
_PARTITIONER = DefaultPartitioner()
for _reason in BROKER_REFUSAL_REASONS:
    metrics.PARKED.labels(reason=_reason)  # a 0, not a missing series, before the first


class Producer(Protocol):
    """What the publisher uses of `aiokafka.AIOKafkaProducer`.

    `send` returns once the message is queued, or raises what the client refuses by
    itself (a message over `max_request_size`, a topic it may not see); the future it
    returns holds the broker's answer. `partitions_for` waits for the topic's metadata.
    """

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        headers: list[tuple[str, bytes | None]] | None = None,
    ) -> asyncio.Future[Any]: ...

    async def partitions_for(self, topic: str) -> set[int]: ...

    async def flush(self) -> None: ...


@dataclass
class _Pass:
    """What became of the rows of one relay batch."""

    sent: list[OutboxMessage] = field(default_factory=list)
    refused: list[tuple[OutboxMessage, str, BaseException]] = field(default_factory=list)
    waiting: list[tuple[OutboxMessage, BaseException]] = field(default_factory=list)

    def failed(self, m: OutboxMessage, error: BaseException) -> None:
        reason = broker_refusal(error)
        if reason is None:
            self.waiting.append((m, error))
        else:
            self.refused.append((m, reason, error))


class Publisher:
    def __init__(
        self,
        producer: Producer,
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
        """Hand messages to the producer; acknowledgement is tracked in the background.

        A message the client refuses for good is skipped (the relay parks its row); an
        outage leaves it and the rest of the batch to the relay."""
        if not messages:
            return
        sent: list[OutboxMessage] = []
        futures: list[asyncio.Future[object]] = []
        try:
            partitions = await self._partitions(messages)
            for m, partition in zip(messages, partitions, strict=True):
                try:
                    futures.append(await self._send(m, partition))
                    sent.append(m)
                except BROKER_ERRORS as error:
                    if broker_refusal(error) is None:
                        raise
        except BROKER_ERRORS as error:
            # The rows stay in the outbox; the relay pass publishes them later.
            self.healthy = False
            log.warning("publish_failed_left_in_outbox", error=repr(error)[:200])
        task = asyncio.create_task(self._settle(sent, futures))
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
        failed = outage = 0
        for message, result in zip(messages, results, strict=True):
            if isinstance(result, BaseException):
                # Refused for good or not, the row stays: the relay parks or re-sends it.
                failed += 1
                outage += broker_refusal(result) is None
                continue
            if message.outbox_id is not None:
                self._acked.append(message.outbox_id)
            if message.source_ts_ms:
                metrics.LATENCY.observe(max(0.0, (now_ms - message.source_ts_ms) / 1000))
        self.published += len(messages) - failed
        if failed:
            log.warning("publish_not_acknowledged_left_in_outbox", messages=failed)
        # A refusal of one message says nothing about the broker's health.
        self.healthy = not outage
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
            except DATABASE_ERRORS as error:
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
        """Publish leftover rows older than the grace period, parking those the broker
        refuses for good; return how many were published."""
        grace = self._relay_grace_s if grace_s is None else grace_s
        total = 0
        while True:
            async with self._pool.acquire() as conn, conn.transaction():
                rows = await store.claim_outbox(conn, grace, self._relay_batch)
                if not rows:
                    break
                # The claimed rows stay locked while the broker acknowledges them (so other
                # workers' relays skip them); a stalled broker must not hold them forever:
                # what is not acknowledged in time stays, unlocked, for the next pass.
                done = await self._relay(rows)
                await store.delete_outbox(conn, [m.outbox_id for m in done.sent if m.outbox_id])
                if done.refused:
                    parked = [(m.outbox_id, r) for m, r, _ in done.refused if m.outbox_id]
                    await store.park_outbox(conn, parked)
            for m, reason, error in done.refused:
                metrics.PARKED.labels(reason=reason).inc()
                log.error(
                    "outbox_row_parked",
                    outbox_id=m.outbox_id,
                    topic=m.topic,
                    reason=reason,
                    payload_bytes=len(m.payload or b""),
                    error=repr(error)[:200],
                )
            total += len(done.sent)
            self.published += len(done.sent)
            # The broker acknowledges again: readiness must not wait for the fast path.
            self.healthy = self.healthy or bool(done.sent)
            if done.waiting:
                log.warning(
                    "outbox_relay_failed",
                    rows_waiting=len(done.waiting),
                    error=repr(done.waiting[0][1])[:200],
                )
                break
            if len(rows) < self._relay_batch:
                break
        if total:
            log.info("outbox_relayed", rows=total)
        return total

    async def _relay(self, rows: list[OutboxMessage]) -> _Pass:
        """Send the rows, each on its own: one's refusal or outage is not the others'."""
        done = _Pass()
        missing = await self._unavailable_topics({m.topic for m in rows})
        pending: list[tuple[OutboxMessage, asyncio.Future[object]]] = []
        for m in rows:
            if m.topic in missing:
                done.failed(m, missing[m.topic])
                continue
            try:
                pending.append((m, await self._send(m)))
            except BROKER_ERRORS as error:
                done.failed(m, error)
        if pending:
            await asyncio.wait([f for _, f in pending], timeout=_RELAY_SEND_TIMEOUT_S)
        suspects = []
        for m, future in pending:
            if not future.done() or future.cancelled():
                done.waiting.append((m, TimeoutError("not acknowledged in time")))
            elif (answer := future.exception()) is None:
                done.sent.append(m)
            elif broker_refusal(answer) is None:
                done.waiting.append((m, answer))
            else:
                suspects.append(m)
        # The broker answers for a whole batch of messages to one partition: a refusal
        # may be a neighbour's. Each suspect is sent again alone; only its own refusal
        # parks it.
        for m in suspects:
            try:
                async with asyncio.timeout(_RELAY_SEND_TIMEOUT_S):
                    await (await self._send(m))
                done.sent.append(m)
            except BROKER_ERRORS as error:  # TimeoutError among them
                done.failed(m, error)
        return done

    async def _unavailable_topics(self, topics: set[str]) -> dict[str, BaseException]:
        """The topics whose metadata the producer cannot get (in time), and why."""

        async def probe(topic: str) -> None:
            async with asyncio.timeout(_TOPIC_WAIT_S):
                await self._producer.partitions_for(topic)

        names = sorted(topics)
        results = await asyncio.gather(*(probe(t) for t in names), return_exceptions=True)
        unavailable = {}
        for topic, result in zip(names, results, strict=True):
            if isinstance(result, BROKER_ERRORS):
                unavailable[topic] = result
            elif isinstance(result, BaseException):
                raise result
        return unavailable

    async def relay_leftovers(self, grace_s: float | None = None) -> None:
        """One relay pass whose failure (broker or database away) is logged, not raised:
        the rows stay in the outbox for the next pass."""
        try:
            await self.relay_once(grace_s)
            waiting, parked = await store.outbox_backlog(self._pool)
            metrics.OUTBOX_BACKLOG.set(waiting)
            metrics.OUTBOX_PARKED.set(parked)
        except _RELAY_FAILURES as error:
            log.warning("outbox_relay_failed", error=repr(error)[:200])

    async def run_relay(self) -> None:
        """The periodic slow path; failures are logged and retried next period."""
        while True:
            await asyncio.sleep(self._relay_interval_s)
            await self.relay_leftovers()
