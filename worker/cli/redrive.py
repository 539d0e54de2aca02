"""Dead letters as the operator sees them, and their re-drive (`release-worker dlq`).

A re-drive applies a dead letter's original record in this process, through the same
release code as the worker (`release.apply_batch`), as the partner its `dlq-partner-id`
header names: no API key is needed, and nothing is produced to the input topic, so
the re-drive opens no way in for records nobody authenticated.

**Idempotency key: the event's own inbox key, (partner_id, eventId).** A 500/504
records nothing in the inbox (the processor writes its rejection with the command
dropped: only the `event_rejected` result and the dead letter go to the outbox), so
the event is still unapplied when its dead letter is re-driven. The re-drive applies
it and writes its inbox row, with the original record's position (`dlq-source-*`), in
one transaction. Any later re-drive of it finds that row and changes and publishes
nothing ("already applied"); so does a second copy of the same dead letter (dead
letters are published at least once), and so does the partner's own re-send of the
eventId, whichever comes first. A record without an eventId has the one the worker
derives from its position (`<topic>/<partition>/<offset>`), and the re-drive keeps
that position, so the key is the same. Two re-drives at once meet on the inbox's
primary key: the second's insert waits, conflicts, and is retried, then finds the row.

A dead letter is applied as of now: the reservations as they stand (the cause fixed),
`already_released` for what was released meanwhile. Selected dead letters are applied in
their original order (source topic, partition, offset), so one cart's stay in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg
import orjson
import structlog

from worker import operator_store
from worker.auth import admit
from worker.cli.kafka import Message
from worker.config import Settings
from worker.contract import Rejection
from worker.errors import TransientError
from worker.records import OutboxMessage, RawRecord
from worker.release import Accepted, BatchReport, EventKey, InboxEntry, TopicPartition, apply_batch
from worker.results import DLQ_HEADER_PREFIX, DLQ_PARTNER_ID_HEADER, Topics
from worker.store import PgReleaseStore
from worker.validate import Limits, parse_record

log = structlog.get_logger("worker.cli.redrive")

# What each dead-letter code means for the operator (docs/errors.md has the full story).
EXPLANATIONS = {
    "unreadable_record": "The Kafka client could not decode the record (e.g. a header name "
    "that is not UTF-8): only its position is known, not its bytes. It cannot be re-driven; "
    "the producer must fix the record and send it again.",
    "too_large": "The value was over WORKER_MAX_RECORD_BYTES. The producer must send it "
    "smaller; it cannot be re-driven.",
    "missing_body": "The record had no value. Nothing to re-drive.",
    "unsupported_content_type": "content-type was not application/json. The producer "
    "must fix it; it cannot be re-driven.",
    "invalid_utf8": "The value was not UTF-8. The producer must fix it; it cannot be re-driven.",
    "invalid_json": "The value was not strict JSON. The producer must fix it; it cannot "
    "be re-driven.",
    "not_an_object": "The value was JSON but not an object. The producer must fix it; it "
    "cannot be re-driven.",
    "internal_error": "An unexpected error persisted for WORKER_POISON_MAX_ATTEMPTS "
    "attempts (the worker's log line `record_dead_lettered` has it). Fix the cause (data, "
    "schema, code), then re-drive it.",
    "database_timeout": "The database timed out on this record every attempt. Find the "
    "slow statement (pg_stat_statements, a trigger, a missing index), then re-drive it.",
}


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One message of the dead-letter topic."""

    message: Message

    @property
    def position(self) -> str:
        """Where it is in the dead-letter topic: `partition:offset`."""
        return f"{self.message.partition}:{self.message.offset}"

    def dlq(self, name: str) -> str | None:
        return self.message.header(f"{DLQ_HEADER_PREFIX}{name}")

    @property
    def status(self) -> int | None:
        status = self.dlq("status")
        return int(status) if status and status.isdigit() else None

    @property
    def code(self) -> str | None:
        return self.dlq("code")

    @property
    def partner_id(self) -> str | None:
        return self.dlq("partner-id")

    @property
    def source(self) -> tuple[str, int, int] | None:
        topic, partition, offset = (
            self.dlq(f"source-{n}") for n in ("topic", "partition", "offset")
        )
        if topic and partition and partition.isdigit() and offset and offset.isdigit():
            return topic, int(partition), int(offset)
        return None

    @property
    def source_position(self) -> str | None:
        return None if self.source is None else "/".join(map(str, self.source))

    def _body(self) -> dict[str, Any]:
        try:
            body = orjson.loads(self.message.value or b"")
        except orjson.JSONDecodeError:
            return {}
        return body if isinstance(body, dict) else {}

    @property
    def event_id(self) -> str | None:
        event_id = self._body().get("eventId")
        return event_id if isinstance(event_id, str) else self.source_position

    @property
    def cart_id(self) -> str | None:
        cart_id = self._body().get("cartId")
        if isinstance(cart_id, str):
            return cart_id
        return None if self.message.key is None else self.message.key.decode(errors="replace")

    def not_redrivable(self) -> str | None:
        """Why this dead letter cannot be re-driven, or None if it can."""
        if self.status not in (500, 504):
            return "the record itself could not be read: it must be sent again, fixed"
        names = [n.lower() for n, _ in self.message.headers]
        if names.count(DLQ_PARTNER_ID_HEADER) != 1:
            return (
                "no dlq-partner-id header: the record was not authenticated as a partner "
                "(or was dead-lettered before re-drive existed); the partner must send it again"
            )
        if self.dlq("truncated") is not None or self.dlq("headers-dropped") is not None:
            return "it was shrunk to fit the dead-letter topic: its original bytes are lost"
        if self.source is None:
            return "its dlq-source-* headers are missing or malformed"
        return None

    def original(self) -> RawRecord:
        """The input record as it came (without its API key, which was never kept)."""
        assert self.source is not None
        topic, partition, offset = self.source
        headers = tuple(
            (n, v) for n, v in self.message.headers if not n.lower().startswith(DLQ_HEADER_PREFIX)
        )
        return RawRecord(topic, partition, offset, self.message.key, self.message.value, headers)

    def summary(self) -> dict[str, Any]:
        reason = self.not_redrivable()
        return {
            "position": self.position,
            "time": self.message.timestamp_ms,
            "status": self.status,
            "code": self.code,
            "partner_id": self.partner_id,
            "cart_id": self.cart_id,
            "event_id": self.event_id,
            "source": self.source_position,
            "attempts": self.dlq("attempts"),
            "redrivable": reason is None,
            "why_not": reason,
        }


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a re-drive did with one dead letter."""

    letter: DeadLetter
    result: str  # applied | would_apply | already_applied | refused | failed | not_attempted
    detail: str
    messages: tuple[OutboxMessage, ...] = ()

    def row(self) -> dict[str, Any]:
        return {
            "position": self.letter.position,
            "source": self.letter.source_position,
            "partner_id": self.letter.partner_id,
            "event_id": self.letter.event_id,
            "result": self.result,
            "detail": self.detail,
        }


class _PastItsOffset(PgReleaseStore):
    """The worker's store, minus the offset books: a dead letter's record lies below its
    partition's stored offset (the worker moved past it when it dead-lettered it), so no
    offset row is read, locked or moved. The inbox key is what keeps it applied once."""

    async def lock_offsets(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        return {}

    async def record_inbox(
        self, entries: Sequence[InboxEntry], next_offsets: dict[TopicPartition, int]
    ) -> set[EventKey]:
        return await super().record_inbox(entries, {})

    async def advance_offsets(self, next_offsets: dict[TopicPartition, int]) -> None:
        return None


async def redrive_one(
    pool: asyncpg.Pool, settings: Settings, letter: DeadLetter, dry_run: bool
) -> Outcome:
    """Apply one dead letter (or, with `dry_run`, apply it and roll back)."""
    reason = letter.not_redrivable()
    if reason is not None:
        return Outcome(letter, "refused", reason)
    partner_id = letter.partner_id
    assert partner_id is not None
    limits = Limits(settings.max_record_bytes, settings.max_items, settings.max_attributes)
    command = parse_record(letter.original(), limits)
    if isinstance(command, Rejection):
        return Outcome(letter, "refused", f"the record is now a {command.status} {command.code}")
    partner = await operator_store.partner_by_id(pool, partner_id)
    if partner is None:
        return Outcome(letter, "refused", f"partner {partner_id!r} no longer exists")
    admitted = admit(command, partner)
    if isinstance(admitted, Rejection):
        return Outcome(letter, "refused", f"{admitted.status} {admitted.code}: {admitted.message}")
    accepted = Accepted(letter.original(), command, partner_id)
    topics = Topics(settings.results_topic, settings.dlq_topic, settings.max_message_bytes)
    for attempt in range(3):
        try:
            return await _apply(pool, settings, letter, accepted, topics, dry_run)
        except TransientError:  # a concurrent re-drive recorded it first: look again
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


async def _apply(
    pool: asyncpg.Pool,
    settings: Settings,
    letter: DeadLetter,
    accepted: Accepted,
    topics: Topics,
    dry_run: bool,
) -> Outcome:
    async with pool.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        try:
            done = await operator_store.applied_from(
                conn, accepted.partner_id, accepted.command.event_id
            )
            if done is not None:
                await transaction.rollback()
                how = (
                    f"re-driven before (its inbox row names {done})"
                    if done == letter.source_position
                    else f"applied from {done} (the partner sent the eventId again)"
                )
                return Outcome(letter, "already_applied", f"{how}; nothing changed")
            report = await apply_batch(_PastItsOffset(conn, settings.group_id), [accepted], topics)
        except BaseException:
            await transaction.rollback()
            raise
        if dry_run:
            await transaction.rollback()
            return Outcome(letter, "would_apply", _described(report))
        await transaction.commit()
    return Outcome(letter, "applied", _described(report), tuple(report.messages))


def _described(report: BatchReport) -> str:
    if report.rejected:
        rejection = report.rejected[0][1]
        return f"{rejection.status} {rejection.code} (recorded, as the worker would)"
    outcomes = ", ".join(f"{n} {outcome}" for outcome, n in sorted(report.outcomes.items()))
    return outcomes or "no items"


class Sleeper(Protocol):
    """How a re-drive waits between two dead letters (`asyncio.sleep`; tests count them)."""

    def __call__(self, delay: float, /) -> Awaitable[None]: ...


@dataclass
class Run:
    outcomes: list[Outcome]
    results: int = 0  # messages the applied dead letters produced
    published: int = 0  # of them, acknowledged by the broker (the rest wait in the outbox)


async def redrive(
    pool: asyncpg.Pool,
    settings: Settings,
    letters: Iterable[DeadLetter],
    dry_run: bool,
    rate_per_s: float,
    operator: str,
    sleep: Sleeper = asyncio.sleep,
) -> Run:
    """Re-drive the letters in their original order, at most `rate_per_s` a second, and
    publish the results of those applied through the outbox and the publisher, as the
    worker does. Stops at the first failure (the cause is not fixed): the letters after it,
    of the same cart perhaps, must not overtake it."""
    from worker.app import make_producer
    from worker.publisher import Publisher

    ordered = sorted(letters, key=lambda d: d.source or ("", 0, 0))
    run = Run([])
    # A dry run publishes nothing: no producer at all.
    producer = None if dry_run else make_producer(settings)
    if producer is not None:
        await producer.start()
    try:
        publisher = producer and Publisher(
            producer,
            pool,
            settings.outbox_relay_interval_s,
            settings.outbox_relay_grace_s,
            max_message_bytes=settings.max_message_bytes,
        )
        for n, letter in enumerate(ordered):
            if n:
                await sleep(1 / rate_per_s)
            outcome = await _guarded(pool, settings, letter, dry_run, operator)
            run.outcomes.append(outcome)
            if outcome.messages and publisher is not None:
                run.results += len(outcome.messages)
                await publisher.publish(list(outcome.messages))
            if outcome.result == "failed":
                # The letters after it (of the same cart perhaps) must not overtake it; each
                # is reported, so that none looks handled.
                for later in ordered[n + 1 :]:
                    skipped = Outcome(
                        later,
                        "not_attempted",
                        f"not attempted: the run stopped at {letter.position}, which failed; "
                        "fix its cause, then run the same command again (what was applied "
                        "is then reported already_applied)",
                    )
                    run.outcomes.append(skipped)
                    _log(skipped, operator, dry_run)
                break
        if publisher is not None:
            await publisher.flush(settings.shutdown_timeout_s)
            run.published = publisher.published
    finally:
        if producer is not None:
            await producer.stop()
    return run


async def _guarded(
    pool: asyncpg.Pool, settings: Settings, letter: DeadLetter, dry_run: bool, operator: str
) -> Outcome:
    """`redrive_one`, its failure an outcome too; logged either way (the audit trail)."""
    try:
        outcome = await redrive_one(pool, settings, letter, dry_run)
    except Exception as error:  # reported and logged; then the run stops
        outcome = Outcome(
            letter,
            "failed",
            f"{type(error).__name__}: {error}"[:300]
            + f" (nothing of it changed; fix the cause, `release-worker dlq show "
            f"{letter.position}` explains its code, then re-drive it)",
        )
    _log(outcome, operator, dry_run)
    return outcome


def _log(outcome: Outcome, operator: str, dry_run: bool) -> None:
    fields = outcome.row()
    event = "dlq_redrive_failed" if outcome.result == "failed" else "dlq_redriven"
    (log.error if outcome.result == "failed" else log.info)(
        event,
        operator=operator,
        dry_run=dry_run,
        dlq_position=fields.pop("position"),
        source_position=fields.pop("source"),
        **fields,
    )
