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
from collections import Counter
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import asyncpg
import structlog
from aiokafka.errors import MessageSizeTooLargeError

from worker import metrics, store
from worker.config import KAFKA_DEFAULT_MAX_MESSAGE_BYTES
from worker.partitioning import murmur2_many, partition_of
from worker.records import OutboxMessage, Publication
from worker.results import message_bytes
from worker.retry import BROKER_ERRORS, BROKER_REFUSAL_REASONS, DATABASE_ERRORS, broker_refusal
from worker.watermarks import Batch, TopicPartition, Watermarks

log = structlog.get_logger("worker.publisher")

# A relay pass gives the broker this long to acknowledge a batch of leftovers; what is not
# acknowledged by then waits for the next pass.
_RELAY_SEND_TIMEOUT_S = 30.0
# ... and a topic this long to show up in the cluster's metadata (aiokafka would wait its
# request timeout, 40 s, for each send to a missing topic, holding up the rows behind it).
_TOPIC_WAIT_S = 5.0
# Failures a background pass outlives: the rows stay in the outbox, the next pass takes them.
_RELAY_FAILURES = (*BROKER_ERRORS, *DATABASE_ERRORS)
# Inbox rows a catch-up reads (and holds the results of) at a time.
_CATCH_UP_ROWS = 200
_STORE_FAILURES: tuple[type[BaseException], ...] = (*DATABASE_ERRORS, TimeoutError)
# More than aiokafka's estimate of a record's size adds to its key, value and headers (the
# batch header, the record's overhead, varint lengths): a message below the bound with
# these fits without computing the estimate (`results.message_bytes`).
_FRAMING = 61 + 21 + 3 * 5
_HEADER_FRAMING = 2 * 5
_TOO_LARGE = "The message is larger than the maximum request size (max_request_size)"
for _reason in BROKER_REFUSAL_REASONS:
    metrics.PARKED.labels(reason=_reason)  # a 0, not a missing series, before the first


class RecordBatch(Protocol):
    """What the publisher uses of aiokafka's `BatchBuilder` (`Producer.create_batch`)."""

    def append(
        self,
        *,
        timestamp: int | None,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes | None]],
    ) -> object | None:
        """Add a message; None when the batch is full (its first message always fits)."""

    def close(self) -> None: ...


class Producer(Protocol):
    """What the publisher uses of `aiokafka.AIOKafkaProducer`.

    `send` returns once the message is queued, or raises what the client refuses by
    itself (a message over `max_request_size`, a topic it may not see); the future it
    returns holds the broker's answer. `partitions_for` waits for the topic's metadata.
    `create_batch` gives an empty batch (at most the producer's `max_batch_size` bytes,
    compressed as its messages would be); `send_batch` queues it for one partition, after
    that partition's batch queued before it (it waits for that one to be taken), and
    returns a future of the broker's one answer for the whole batch. It does not check
    the size of a message against `max_request_size`: the publisher does.
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

    def create_batch(self) -> RecordBatch: ...

    async def send_batch(
        self, batch: RecordBatch, topic: str, *, partition: int
    ) -> asyncio.Future[Any]: ...


@dataclass
class _Handover:
    """Messages handed to the producer in one go (`Publisher._hand_over`): each future is
    the broker's one answer for the messages at its indexes (a partition's batch, or one
    message sent alone); `refused`: indexes the client refused by itself, and why; `outage`:
    the error that stopped the hand-over (the messages after it were not handed over)."""

    sent: list[tuple[list[int], asyncio.Future[object]]] = field(default_factory=list)
    refused: list[tuple[int, BaseException]] = field(default_factory=list)
    outage: BaseException | None = None


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
        group_id: str = "",
        results_topic: str = "",
        max_message_bytes: int = KAFKA_DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self._producer = producer
        self._pool = pool
        self._group_id = group_id
        self._results_topic = results_topic
        # The producer's `max_request_size`: a batch is not checked against it message by
        # message, so `_hand_over` refuses a larger message itself, as `send` would.
        self._max_message_bytes = max_message_bytes
        # How far each owned partition's fresh results (inbox only) are acknowledged.
        self.watermarks = Watermarks()
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

        A message the client or the broker refuses for good stays in the outbox (the relay
        parks its row); an outage leaves it and the rest of the batch to the relay."""
        if not messages:
            return
        handover = await self._hand_over(messages)
        if handover.outage is not None:
            # The rows stay in the outbox; the relay pass publishes them later.
            self.healthy = False
            log.warning("publish_failed_left_in_outbox", error=repr(handover.outage)[:200])
        self._track(self._settle(list(messages), handover))

    async def publish_fresh(self, publications: Sequence[Publication]) -> None:
        """Hand committed fresh results (stored in the inbox only) to the producer; their
        acknowledgement advances the partition's watermark (`worker/watermarks.py`).

        The publications' messages go out together, one batch per results partition: a
        cart's results are all in one publication (one input partition), in order.
        A failure drops them from memory: the partition's watermark stops before them and
        a catch-up republishes them from the inbox (`catch_up`)."""
        # These transactions committed, with the watermarks they carried.
        self.watermarks.claims_committed([(p.topic, p.partition) for p in publications])
        messages: list[OutboxMessage] = []
        spans: list[tuple[Batch, int, int]] = []
        for pub in publications:
            tp = (pub.topic, pub.partition)
            batch = self.watermarks.committed(tp, pub.start, pub.end, len(pub.messages))
            if pub.messages:
                spans.append((batch, len(messages), len(messages) + len(pub.messages)))
                messages += pub.messages
        if not messages:
            return
        handover = await self._hand_over(messages)
        if handover.outage is not None:
            self.healthy = False
            log.warning(
                "publish_failed_left_in_inbox",
                partitions=sorted({b.tp for b, _, _ in spans}),
                error=repr(handover.outage)[:200],
            )
        self._track(self._settle_fresh(messages, handover, spans))

    def _track(self, settling: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(settling)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _settle_fresh(
        self,
        messages: list[OutboxMessage],
        handover: _Handover,
        spans: list[tuple[Batch, int, int]],
    ) -> None:
        answers = await self._answers(messages, handover)
        _observe_latencies(messages, answers, time.time() * 1000)
        any_outage = False
        for batch, first, last in spans:
            failed = outage = 0
            refused: list[tuple[OutboxMessage, str, BaseException]] = []
            for message, result in zip(messages[first:last], answers[first:last], strict=True):
                if not isinstance(result, BaseException):
                    continue
                if (reason := broker_refusal(result)) is None:
                    failed += 1
                    outage += 1
                else:
                    refused.append((message, reason, result))
            self.published += last - first - failed - len(refused)
            # A result refused for good is parked (committed) before the watermark may pass
            # it; if parking fails, the batch is a gap and a catch-up republishes it.
            if refused and not await self._park_fresh(batch.tp, refused):
                failed += len(refused)
            self.watermarks.settled(batch, failed=bool(failed))
            if failed:
                log.warning(
                    "publish_not_acknowledged_left_in_inbox",
                    topic=batch.tp[0],
                    partition=batch.tp[1],
                    messages=failed,
                )
            any_outage = any_outage or bool(outage)
        self.healthy = not any_outage

    async def _hand_over(self, messages: Sequence[OutboxMessage]) -> _Handover:
        """Hand `messages` to the producer: one batch per results partition (a full batch is
        sent and the next one started), each keyed message on the partition the producer's
        own partitioner gives its key, so a key's messages stay in order in one partition
        (G4); a keyless message alone through `send`. A message over the producer's
        `max_request_size` is refused here, as `send` refuses it, so it never takes a
        batch down with it. An outage stops the hand-over (`_Handover.outage`)."""
        handover = _Handover()
        try:
            partitions = await self._partitions(messages)
        except BROKER_ERRORS as error:
            handover.outage = error
            return handover
        open_batches: dict[tuple[str, int], tuple[RecordBatch, list[int]]] = {}
        # The items of a record follow one another with one headers tuple and one key (so
        # one partition): its headers are listed and sized, and its batch looked up, once.
        last_headers: object = None
        last_tp: tuple[str, int | None] = ("", None)
        headers: list[tuple[str, bytes | None]] = []
        headers_size = 0
        tp = ("", 0)
        entry: tuple[RecordBatch, list[int]] | None = None
        try:
            for index, (m, partition) in enumerate(zip(messages, partitions, strict=True)):
                if partition is None:
                    try:
                        handover.sent.append(([index], await self._send(m)))
                    except BROKER_ERRORS as error:
                        if broker_refusal(error) is None:
                            raise
                        handover.refused.append((index, error))  # the client's own refusal
                    continue
                if m.headers is not last_headers:
                    headers, headers_size = list(m.headers), _headers_size(m.headers)
                    last_headers = m.headers
                size = len(m.payload or b"") + len(m.key or b"") + headers_size + _FRAMING
                if size > self._max_message_bytes and (
                    message_bytes(m.key, m.payload, m.headers) > self._max_message_bytes
                ):
                    handover.refused.append((index, MessageSizeTooLargeError(_TOO_LARGE)))
                    continue
                if entry is None or partition != last_tp[1] or m.topic != last_tp[0]:
                    tp = last_tp = (m.topic, partition)
                    entry = open_batches.get(tp)
                    if entry is None:
                        entry = open_batches[tp] = (self._producer.create_batch(), [])
                value = m.payload
                if entry[0].append(timestamp=None, key=m.key, value=value, headers=headers) is None:
                    # Full: it goes now, the message opens the next one (a batch takes its
                    # first message whatever its size).
                    await self._send_batch(handover, tp, *entry)
                    entry = open_batches[tp] = (self._producer.create_batch(), [])
                    entry[0].append(timestamp=None, key=m.key, value=value, headers=headers)
                entry[1].append(index)
            for tp, (batch, indexes) in open_batches.items():
                await self._send_batch(handover, tp, batch, indexes)
        except BROKER_ERRORS as error:
            handover.outage = error
        return handover

    async def _send_batch(
        self, handover: _Handover, tp: tuple[str, int], batch: RecordBatch, indexes: list[int]
    ) -> None:
        # Closed: a `send` to the same partition must not add to it while it waits.
        batch.close()
        try:
            future = await self._producer.send_batch(batch, tp[0], partition=tp[1])
        except BROKER_ERRORS as error:
            if broker_refusal(error) is None:
                raise
            handover.refused.extend((i, error) for i in indexes)  # e.g. a topic it may not see
            return
        handover.sent.append((indexes, future))

    async def _answers(
        self, messages: Sequence[OutboxMessage], handover: _Handover
    ) -> list[object]:
        """The broker's (or the client's) answer for each message, an exception if it was
        not acknowledged. The broker answers for a whole batch: a batch refused for good is
        sent again message by message, each alone, so that only a message's own refusal
        counts as its. A message the hand-over did not reach gets its outage."""
        answers: list[object] = [handover.outage] * len(messages)
        for index, error in handover.refused:
            answers[index] = error
        results = await asyncio.gather(*(f for _, f in handover.sent), return_exceptions=True)
        for (indexes, _), result in zip(handover.sent, results, strict=True):
            if len(indexes) > 1 and isinstance(result, BaseException) and broker_refusal(result):
                for index in indexes:
                    answers[index] = await self._alone(messages[index])
            else:
                for index in indexes:
                    answers[index] = result
        return answers

    async def _alone(self, m: OutboxMessage) -> object:
        """Send one message on its own and wait for the answer (an exception if refused)."""
        try:
            async with asyncio.timeout(_RELAY_SEND_TIMEOUT_S):
                return await (await self._send(m))
        except BROKER_ERRORS as error:  # TimeoutError among them
            return error

    async def _park_fresh(
        self, tp: TopicPartition, refused: list[tuple[OutboxMessage, str, BaseException]]
    ) -> bool:
        """Write fresh results the broker refuses for good as parked outbox rows (the same
        bytes, key and headers; `outbox retry` re-sends them) in their own transaction;
        return whether it committed."""
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                rows = await store.enqueue(conn, [m for m, _, _ in refused])
                await store.park_outbox(
                    conn,
                    [
                        (row.outbox_id, r)
                        for row, (_, r, _) in zip(rows, refused, strict=True)
                        if row.outbox_id is not None
                    ],
                )
        except _STORE_FAILURES as failure:
            log.warning(
                "results_park_failed_left_in_inbox",
                topic=tp[0],
                partition=tp[1],
                messages=len(refused),
                error=repr(failure)[:200],
            )
            return False
        for row, (m, reason, error) in zip(rows, refused, strict=True):
            _count_parked(
                row.outbox_id, m, reason, error, source_topic=tp[0], source_partition=tp[1]
            )
        return True

    async def catch_up(self, tp: TopicPartition, timeout_s: float = _RELAY_SEND_TIMEOUT_S) -> bool:
        """Republish, in offset order, the stored results of `tp`'s inbox rows from its
        watermark up to its next offset, wait for the broker's acknowledgements, then raise
        the watermark; return whether it got there (else the gap stays for the next try).
        A duplicate is the first publication's bytes, key and headers (G2)."""
        start = self.watermarks.covered(tp)
        if start is None:
            return True  # not ours (any more)
        state = await store.publication_state(self._pool, self._group_id, [tp])
        if tp not in state:  # nothing applied yet: no inbox rows
            self.watermarks.caught_up(tp, start, start)
            return True
        published, end = state[tp]
        self.watermarks.adopt(tp, published)
        start = self.watermarks.covered(tp)
        if start is None:
            return True
        position: int | None = start
        sent = skipped = 0
        while position is not None and position < end:
            results, position, missing = await store.stored_range(
                self._pool, tp, position, end, _CATCH_UP_ROWS
            )
            skipped += missing
            messages = [
                OutboxMessage(self._results_topic, r.key, r.payload, r.headers) for r in results
            ]
            if not messages:
                continue
            handover = await self._hand_over(messages)
            if handover.outage is not None:
                raise handover.outage
            async with asyncio.timeout(timeout_s):
                answers = await self._answers(messages, handover)
            refused = [
                (m, reason, a)
                for m, a in zip(messages, answers, strict=True)
                if isinstance(a, BaseException) and (reason := broker_refusal(a)) is not None
            ]
            errors = [a for a in answers if isinstance(a, BaseException)]
            if len(errors) == len(refused) and refused:
                # Refused for good: parked (committed) before the watermark passes them.
                if not await self._park_fresh(tp, refused):
                    return False
                sent -= len(refused)
                errors = []
            if errors:
                log.warning(
                    "results_republish_failed",
                    topic=tp[0],
                    partition=tp[1],
                    messages=len(errors),
                    error=repr(errors[0])[:200],
                )
                return False
            sent += len(messages)
        self.watermarks.caught_up(tp, start, end)
        self.published += sent
        # The broker acknowledges again: readiness must not wait for the next batch.
        self.healthy = self.healthy or bool(sent)
        await self.store_watermarks([tp])
        if sent or skipped:
            # Rows without results below the watermark's first value (pruned, or recorded
            # before headers were kept) were published through the outbox back then.
            log.info(
                "results_republished",
                topic=tp[0],
                partition=tp[1],
                start=start,
                end=end,
                messages=sent,
                rows_without_results=skipped,
            )
        return True

    async def recover(self, partitions: Sequence[TopicPartition], timeout_s: float) -> None:
        """After an assignment: catch each partition up before anything new is applied, for
        at most `timeout_s` in all; what is left is the periodic pass's (`run_watermarks`)."""
        for tp in partitions:
            # Nothing known yet: the catch-up adopts the database's watermark first.
            self.watermarks.assign((tp[0], tp[1]), 0)
        try:
            async with asyncio.timeout(timeout_s):
                for tp in sorted(partitions):
                    await self.catch_up(tp, timeout_s)
        except _RELAY_FAILURES as error:
            log.warning("results_republish_deferred", error=repr(error)[:200])

    async def store_watermarks(self, partitions: Sequence[TopicPartition] | None = None) -> None:
        """Write the watermarks known higher than the database's (of `partitions`)."""
        marks = self.watermarks.to_store(None if partitions is None else list(partitions))
        if marks:
            await store.store_published(self._pool, self._group_id, marks)
            self.watermarks.stored(marks)

    async def watermarks_once(self) -> None:
        """Catch up gapped partitions and store watermarks no batch has carried (an idle
        partition's last acknowledgements); failures wait for the next pass."""
        try:
            for tp in self.watermarks.gapped():
                await self.catch_up(tp)
            await self.store_watermarks()
        except _RELAY_FAILURES as error:
            log.warning("results_watermark_pass_failed", error=repr(error)[:200])

    async def run_watermarks(self, interval_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.watermarks_once()

    async def release(self, partitions: Sequence[TopicPartition], timeout_s: float) -> None:
        """Revoked or stopping: after `flush`, store what was acknowledged, then forget them."""
        try:
            async with asyncio.timeout(max(0.1, timeout_s)):
                await self.store_watermarks(partitions)
        except _STORE_FAILURES as error:
            # A lower watermark is only more to republish for the next owner.
            log.warning("results_watermark_not_stored", error=repr(error)[:200])
        for tp in partitions:
            self.watermarks.forget(tp)

    async def _send(self, m: OutboxMessage, partition: int | None = None) -> asyncio.Future[object]:
        # aiokafka refuses a record with neither key nor value (it asserts), which a dead
        # letter of a keyless, valueless record would be: it gets an empty value instead.
        value = b"" if m.payload is None and m.key is None else m.payload
        future: asyncio.Future[object] = await self._producer.send(
            m.topic, value, key=m.key, headers=list(m.headers), partition=partition
        )
        return future

    async def _partitions(self, messages: Sequence[OutboxMessage]) -> list[int | None]:
        """The producer's own key partitioning (`partition_for`, `worker/partitioning.py`),
        murmur2 computed once per distinct key and for all of them together
        (`murmur2_many`): the items of a cart share its key (and follow one another)."""
        by_topic: dict[str, list[int]] = {}
        keys: dict[bytes, None] = {}  # distinct, in first-seen order
        last_key: bytes | None = None
        for m in messages:
            key = m.key
            if key is None:
                continue
            if m.topic not in by_topic:
                by_topic[m.topic] = sorted(await self._producer.partitions_for(m.topic))
            if key is not last_key:
                keys[key] = None
                last_key = key
        hashes = dict(zip(keys, murmur2_many(list(keys)), strict=True))
        partitions: list[int | None] = []
        last: tuple[str, bytes | None, int | None] = ("", None, None)
        for m in messages:
            key = m.key
            if key is None:
                partitions.append(None)  # the producer spreads keyless records itself
                continue
            if key is last[1] and m.topic == last[0]:
                partitions.append(last[2])  # the next item of the same record
                continue
            found = partition_of(hashes[key], by_topic[m.topic])
            partitions.append(found)
            last = (m.topic, key, found)
        return partitions

    async def _settle(self, messages: list[OutboxMessage], handover: _Handover) -> None:
        results = await self._answers(messages, handover)
        _observe_latencies(messages, results, time.time() * 1000)
        failed = outage = 0
        for message, result in zip(messages, results, strict=True):
            if isinstance(result, BaseException):
                # Refused for good or not, the row stays: the relay parks or re-sends it.
                failed += 1
                outage += broker_refusal(result) is None
                continue
            if message.outbox_id is not None:
                self._acked.append(message.outbox_id)
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
                _count_parked(m.outbox_id, m, reason, error)
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
            metrics.UNPUBLISHED_BACKLOG.set(await store.unpublished_backlog(self._pool))
        except _RELAY_FAILURES as error:
            log.warning("outbox_relay_failed", error=repr(error)[:200])

    async def run_relay(self) -> None:
        """The periodic slow path; failures are logged and retried next period."""
        while True:
            await asyncio.sleep(self._relay_interval_s)
            await self.relay_leftovers()


def _count_parked(
    outbox_id: int | None, m: OutboxMessage, reason: str, error: BaseException, **where: object
) -> None:
    """Count and log one row parked because the broker refused it for good."""
    metrics.PARKED.labels(reason=reason).inc()
    log.error(
        "outbox_row_parked",
        outbox_id=outbox_id,
        topic=m.topic,
        reason=reason,
        **where,
        payload_bytes=len(m.payload or b""),
        error=repr(error)[:200],
    )


def _observe_latencies(
    messages: Sequence[OutboxMessage], answers: Sequence[object], now_ms: float
) -> None:
    """The record->result latency of each acknowledged message that has a source record.
    A record's results share its timestamp, and a backlog's records many a millisecond:
    each distinct timestamp is observed once, as often as it occurs (one `observe` per
    message cost two locks each)."""
    stamps = Counter(
        m.source_ts_ms
        for m, answer in zip(messages, answers, strict=True)
        if m.source_ts_ms and not isinstance(answer, BaseException)
    )
    for source_ts_ms, times in stamps.items():
        metrics.LATENCY.observe_times(max(0.0, (now_ms - source_ts_ms) / 1000), times)


def _headers_size(headers: Sequence[tuple[str, bytes | None]]) -> int:
    """At least what a message's headers add to aiokafka's size estimate."""
    size = _HEADER_FRAMING * len(headers)
    for k, v in headers:  # a loop, not a generator: one record's headers at a time
        size += len(k.encode()) + len(v or b"")
    return size
