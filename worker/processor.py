"""The batch processor: parse, authenticate and apply records, isolating the failing ones.

A batch of consumed records becomes one committed database transaction.

How each failure is handled follows its verdict (`worker/retry.py`):
- outages (and lost races: serialisation failures, deadlocks) retry the whole
  transaction with capped exponential backoff and jitter, for as long as they last;
- a lock wait (`lock_timeout`) or any other failure splits the batch, so one busy or
  bad record cannot hold back the records before it;
- a single record waiting for a lock is deferred, never rejected (DESIGN.md §7): it and
  the later records of its partition go back to the consumer (`BatchReport.deferred`),
  which offers them again after a backoff, while the rest of the batch is applied. A
  record deferred before goes first, alone, so a lock still held costs one wait;
- a single record that keeps failing otherwise becomes a 500 (or 504 after statement
  timeouts) rejection and a dead letter after `poison_max_attempts`;
- a fatal failure (the database refuses the worker itself) is raised: no record is
  at fault, so none is rejected, and the process stops.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import structlog

from worker import metrics, tracing
from worker.auth import Authenticator, Partner
from worker.config import Settings
from worker.contract import Outcome, Rejection
from worker.logs import LineBudget
from worker.records import RawRecord
from worker.release import Accepted, BatchReport, Prepared, Rejected, Transactions, apply_batch
from worker.results import Topics
from worker.retry import Verdict, classify, note_retry, retry_transient
from worker.validate import Limits, parse_record

log = structlog.get_logger("worker.processor")

_OUTAGES = frozenset({Verdict.TRANSIENT})
_ALL_BUT_FATAL = frozenset(Verdict) - {Verdict.FATAL}
# A sender controls how many `security_cross_partner_attempt` lines it causes: one per
# record, with this many of its reservation ids, and this many lines a second at most.
CROSS_PARTNER_IDS_LOGGED = 5
CROSS_PARTNER_LINES_PER_S = 10
# A sender controls how many records are rejected too (a flood of unknown keys is one
# `record_rejected` line each): at most this many lines a second, the rest counted.
REJECTION_LINES_PER_S = 100

_RECORDS = {result: metrics.RECORDS.labels(result=result) for result in metrics.RECORD_RESULTS}
_ITEMS = {outcome.value: metrics.ITEMS.labels(outcome=outcome.value) for outcome in Outcome}


class BatchProcessor:
    def __init__(
        self,
        transactions: Transactions,
        settings: Settings,
        authenticator: Authenticator,
        on_retry: Callable[[str], None] | None = None,
        on_success: Callable[[], None] | None = None,
    ) -> None:
        self._transactions = transactions
        self._settings = settings
        self._auth = authenticator
        self._limits = Limits(
            settings.max_record_bytes, settings.max_items, settings.max_attributes
        )
        self._topics = Topics(
            settings.results_topic, settings.dlq_topic, settings.max_message_bytes
        )
        self._on_retry = on_retry
        self._on_success = on_success
        # One budget per processor, so per worker process.
        self._cross_partner_lines = LineBudget(CROSS_PARTNER_LINES_PER_S)
        self._rejection_lines = LineBudget(REJECTION_LINES_PER_S)
        self._tracing = tracing.active()

    async def process(self, records: Sequence[RawRecord]) -> BatchReport:
        """Apply the records (offset order per partition) and return what was committed."""
        if self._tracing is None:
            return await self._process(records)
        return await self._tracing.batch(self._settings.input_topic, records, self._process)

    async def _process(self, records: Sequence[RawRecord]) -> BatchReport:
        started = time.perf_counter()
        works = await self._prepare(records)
        deferral = _Deferral()
        # A record that waited for a lock before (the head of its partition here) is tried
        # alone first: if the lock is still held, one wait defers its partition again.
        report = BatchReport()
        for work in works:
            if work.record.lock_waits:
                report = _merge(report, await self._apply_isolating([work], deferral))
        fresh = [w for w in works if not w.record.lock_waits]
        report = _merge(report, await self._apply_isolating(fresh, deferral))
        report.deferred = deferral.records()
        metrics.BATCH_SIZE.observe(len(records))
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        _count(report, self._cross_partner_lines, self._rejection_lines)
        return report

    async def _prepare(self, records: Sequence[RawRecord]) -> list[Prepared]:
        """Parse and authenticate the records (the partners' lookup retried through
        outages): each is a command accepted for its partner, or rejected."""
        parsed = [parse_record(r, self._limits) for r in records]
        commands = [p for p in parsed if not isinstance(p, Rejection)]
        decisions: dict[int, Partner | Rejection] = {}
        if commands:
            authorized = await retry_transient(
                self._settings, lambda: self._auth.authorize(commands), self._on_retry
            )
            decisions = {id(c): verdict for c, verdict in authorized}
        works: list[Prepared] = []
        new = tuple.__new__
        for record, item in zip(records, parsed, strict=True):
            if isinstance(item, Rejection):
                works.append(Rejected(record, item))
            elif isinstance(verdict := decisions[id(item)], Rejection):
                works.append(Rejected(record, verdict))
            else:
                # An `Accepted`, made without its Python-level __new__ (one per record).
                works.append(new(Accepted, (record, item, verdict.partner_id)))
        return works

    async def _apply_isolating(self, works: list[Prepared], deferral: _Deferral) -> BatchReport:
        works = deferral.hold_back(works)
        if not works:
            return BatchReport()
        if len(works) == 1:
            return await self._apply_single(works[0], deferral)
        try:
            return await self._apply(works, retry_on=_OUTAGES)
        except Exception as error:
            if classify(error) is Verdict.FATAL:
                raise
            # A lock wait or a failure: the halves go apart, so only the record at fault
            # waits or fails; the others commit (in offset order, so G4 holds).
            middle = len(works) // 2
            log.warning("batch_failed_splitting", records=len(works), error=repr(error)[:200])
            first = await self._apply_isolating(works[:middle], deferral)
            return _merge(first, await self._apply_isolating(works[middle:], deferral))

    async def _apply_single(self, work: Prepared, deferral: _Deferral) -> BatchReport:
        """One record: outages are retried for as long as they last; a lock wait defers it
        (with its partition); any other failure is retried `poison_max_attempts` times,
        then it is rejected (504 or 500)."""
        record = work.record
        command = work.command if isinstance(work, Accepted) else None
        event_id = command.event_id if command else record.position
        cart_id = command.cart_id if command else None
        # Bound once: these logs, and the retries' own, all name the record.
        with structlog.contextvars.bound_contextvars(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            event_id=event_id,
            cart_id=cart_id,
        ):
            attempt = 1
            while True:
                try:
                    return await self._apply([work], retry_on=_OUTAGES)
                except Exception as error:
                    verdict = classify(error)
                    if verdict is Verdict.FATAL:
                        raise
                    if verdict is Verdict.LOCK_WAIT:
                        note_retry(error, attempt=record.lock_waits + 1)
                        deferral.defer(work)
                        return BatchReport()
                    if attempt >= self._settings.poison_max_attempts:
                        return await self._reject(work, attempt, error, event_id, cart_id)
                    note_retry(error, attempt=attempt)
                    await asyncio.sleep(min(self._settings.retry_max_s, 0.1 * 2**attempt))
                    attempt += 1

    async def _reject(
        self, work: Prepared, attempt: int, error: Exception, event_id: str, cart_id: str | None
    ) -> BatchReport:
        timeout = classify(error) is Verdict.STATEMENT_TIMEOUT
        status, code, message = (
            (
                504,
                "database_timeout",
                f"The database timed out {attempt} times on this record; retry it later.",
            )
            if timeout
            else (
                500,
                "internal_error",
                f"The record failed {attempt} times "
                f"({type(error).__name__}); it was dead-lettered for investigation.",
            )
        )
        rejection = Rejection(
            status,
            code,
            message,
            None,
            event_id,
            cart_id,
            dead_letter=True,
            attempts=attempt,
            # An authenticated command's result names its partner.
            partner_id=work.partner_id if isinstance(work, Accepted) else None,
        )
        log.error("record_dead_lettered", status=status, error=repr(error)[:300])
        # Writing the rejection is retried whatever fails (a busy offset row, a slow
        # statement): raising here would end the lane, and with it every partition it serves.
        return await self._apply(
            [Rejected(work.record, rejection)],
            retry_on=_ALL_BUT_FATAL,
        )

    async def _apply(self, works: list[Prepared], retry_on: frozenset[Verdict]) -> BatchReport:
        async def applied() -> BatchReport:
            async with self._transactions.begin() as store:
                return await apply_batch(store, works, self._topics, fresh_from_inbox=True)

        report = await retry_transient(self._settings, applied, self._on_retry, retry_on=retry_on)
        if self._on_success is not None:
            self._on_success()
        return report


class _Deferral:
    """The partitions of a batch whose next record waits for a lock, and their records
    held back from the rest of the batch, in offset order (the batch is applied in order,
    so every record of such a partition met after the waiting one is a later one)."""

    def __init__(self) -> None:
        self._held: dict[tuple[str, int], list[RawRecord]] = {}

    def defer(self, work: Prepared) -> None:
        record = work.record
        self._held[(record.topic, record.partition)] = [
            replace(record, lock_waits=record.lock_waits + 1)
        ]

    def hold_back(self, works: list[Prepared]) -> list[Prepared]:
        """`works` without the records of deferred partitions, which are held back."""
        kept = []
        for work in works:
            held = self._held.get((work.record.topic, work.record.partition))
            if held is None:
                kept.append(work)
            else:
                held.append(work.record)
        return kept

    def records(self) -> list[RawRecord]:
        return [record for held in self._held.values() for record in held]


def _merge(first: BatchReport, second: BatchReport) -> BatchReport:
    first.messages.extend(second.messages)
    first.publications.extend(second.publications)
    first.outcomes.update(second.outcomes)
    first.records += second.records
    first.skipped += second.skipped
    first.replays += second.replays
    first.cross_partner.extend(second.cross_partner)
    first.rejected.extend(second.rejected)
    first.released_quantity += second.released_quantity
    first.deferred.extend(second.deferred)
    for tp, offset in second.next_offsets.items():
        first.next_offsets[tp] = max(first.next_offsets.get(tp, 0), offset)
    return first


def _log_cross_partner(report: BatchReport, budget: LineBudget) -> None:
    """One line per record naming other partners' reservations (answered not_found, nothing
    changed), within the budget: a sender can name 50,000 of them in one batch."""
    by_record: dict[tuple[str, str], list[str]] = {}
    for partner_id, event_id, reservation_id in report.cross_partner:
        by_record.setdefault((partner_id, event_id), []).append(reservation_id)
    for (partner_id, event_id), reservation_ids in by_record.items():
        held_back = budget.take()
        if held_back is None:
            continue
        log.warning(
            "security_cross_partner_attempt",
            partner_id=partner_id,
            event_id=event_id,
            items=len(reservation_ids),
            reservation_ids=reservation_ids[:CROSS_PARTNER_IDS_LOGGED],
            suppressed=held_back,
        )


def _count(
    report: BatchReport, cross_partner_lines: LineBudget, rejection_lines: LineBudget
) -> None:
    # Every batch: the series' children are looked up once (`labels` costs more than
    # `inc`), and zeros are not added.
    rejected = len(report.rejected)
    processed = report.records - report.skipped - report.replays - rejected
    for result, n in (
        ("skipped", report.skipped),
        ("replayed", report.replays),
        ("rejected", rejected),
        ("processed", processed),
    ):
        if n:
            _RECORDS[result].inc(n)
    if rejected:
        for status, n in report.rejections.items():
            metrics.REJECTIONS.labels(status=str(status)).inc(n)
        metrics.DEAD_LETTERS.inc(report.dead_letters)
    for outcome, n in report.outcomes.items():
        _ITEMS[outcome].inc(n)
    if report.cross_partner:
        metrics.CROSS_PARTNER.inc(report.foreign)
    if report.released_quantity:
        metrics.RELEASED_QUANTITY.inc(report.released_quantity)
    _log_cross_partner(report, cross_partner_lines)
    for record, rejection in report.rejected:
        held_back = rejection_lines.take()
        if held_back is None:
            continue
        log.info(
            "record_rejected",
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            event_id=rejection.event_id,
            cart_id=rejection.cart_id,
            status=rejection.status,
            code=rejection.code,
            dead_lettered=rejection.dead_letter,
            suppressed=held_back,
        )
