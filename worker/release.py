"""The domain: decide and apply the releases of a batch of records in one transaction.

No Kafka here. `apply_batch` reads (offsets, stored results, reservations), hands the
reads to `plan_batch`, which decides every record without any I/O (outcomes, rendered
results and the list of writes: a `BatchPlan`), and writes the plan. It runs inside a
database transaction through the `ReleaseStore` protocol; it takes locks in one fixed
order (offset rows, then reservations by id, then stock by (sku, location), then inbox
keys) so concurrent batches, the expiry sweeper and confirmations serialise instead of
deadlocking.
Reservations are read without a lock and claimed by the release `UPDATE` itself,
only where they are still `reserved`: a reservation leaves `reserved` at most once
(released, expired and confirmed are final), so a row read is either still as read
or has left `reserved` since, and a claim that moves fewer rows than decided retries
the batch on fresh reads.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import itemgetter
from typing import NamedTuple, Protocol

from worker.contract import Outcome, Rejection, Trigger
from worker.errors import TransientError
from worker.records import Headers, OutboxMessage, Publication, RawRecord
from worker.results import (
    Topics,
    item_results,
    rejection_messages,
    rejection_payload,
    result_headers,
    result_messages,
)
from worker.validate import ReleaseCommand

TopicPartition = tuple[str, int]
EventKey = tuple[str, str]  # (partner_id, event_id)


class Reservation(NamedTuple):
    """A reservation row as read. A tuple (immutable, as a frozen dataclass would be, but
    made without a __setattr__ call per field): one is made per item."""

    reservation_id: str
    partner_id: str
    cart_id: str
    cart_item_id: str
    sku: str
    location_id: str
    quantity: int
    status: str
    release_event_id: str | None = None  # the eventId that released it, if one did


# The types made once per record or item are named tuples, immutable as frozen dataclasses
# but made without a __setattr__ call per field (a frozen dataclass's __init__ costs ~8,000
# instructions for six fields).


class InboxEntry(NamedTuple):
    partner_id: str
    event_id: str
    cart_id: str
    record: RawRecord
    results: list[bytes]
    headers: Headers  # of the results, so a replay carries the same (G2)


class StoredResults(NamedTuple):
    """How an event's results were first published; a replay publishes exactly this (G2)."""

    cart_id: str  # their key
    results: list[bytes] | None  # None: pruned past the retention (a tombstone)
    # None: pruned, or recorded before headers were kept; rebuilt from the replaying record.
    headers: Headers | None


class Accepted(NamedTuple):
    """A record that is a valid command, authenticated as its partner: it is decided."""

    record: RawRecord
    command: ReleaseCommand
    partner_id: str

    @property
    def key(self) -> EventKey:
        """The event's identity: a partner's eventIds are its own."""
        return (self.partner_id, self.command.event_id)


class Rejected(NamedTuple):
    """A record refused before it reached the reservations (parse, auth, or a poison record's
    500/504): its rejection is published, nothing else changes."""

    record: RawRecord
    rejection: Rejection


# One record of a batch, parsed and authenticated (`processor.BatchProcessor`).
Prepared = Accepted | Rejected


class ReleaseStore(Protocol):
    """The SQL `apply_batch` needs; `store.PgReleaseStore` implements it on one transaction."""

    async def lock_offsets(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """Lock the partitions' offset rows; return the next offset to apply (absent: any)."""
        ...

    async def stored_results(self, keys: Sequence[EventKey]) -> Mapping[EventKey, StoredResults]:
        """The inbox's results of the events recorded among `keys` (their `results` None for
        an event whose results were pruned past the retention: only its key is kept)."""
        ...

    async def find_reservations(
        self, explicit: Sequence[tuple[str, str]], carts: Sequence[tuple[str, str]]
    ) -> list[Reservation]:
        """Read (no lock), in reservation_id order, the partner's reservations named by
        (reservation_id, partner_id) and all of each (partner_id, cart_id)."""
        ...

    async def foreign_reservations(self, explicit: Sequence[tuple[str, str]]) -> set[str]:
        """Which of (reservation_id, partner_id) exist under another partner."""
        ...

    async def release(self, releases: Sequence[tuple[str, str, str]]) -> list[tuple[str, str, int]]:
        """Claim: move (reservation_id, partner_id, event_id), given in reservation_id order
        (the lock order), from reserved to released, only where the reservation is that
        partner's and still reserved, and return the moved rows' quantities to stock
        (reserved -= their sum per (sku, location_id), the stock rows locked after every
        reservation, in that sorted order); return (sku, location_id, quantity) per moved
        row."""
        ...

    async def record_inbox(
        self, entries: Sequence[InboxEntry], next_offsets: dict[TopicPartition, int]
    ) -> set[EventKey]:
        """Insert the entries and, in the same statement, do what `advance_offsets` does
        (the offset rows are this transaction's since `lock_offsets`: no new lock, and a
        round trip less); return the keys inserted (fewer: a key was taken by a concurrent
        transaction, and the batch is to be retried: nothing of it is kept)."""
        ...

    async def enqueue(self, messages: Sequence[OutboxMessage]) -> list[OutboxMessage]:
        """Write the messages to the outbox; return them with their outbox ids."""
        ...

    async def advance_offsets(self, next_offsets: dict[TopicPartition, int]) -> None:
        """Move the locked offset rows to `next_offsets` (never back), with the published
        watermark: for a batch that records no inbox row (else `record_inbox` does it)."""
        ...


class Transactions(Protocol):
    """Where `ReleaseStore`s come from: `store.PgTransactions` in the worker, a fake in tests."""

    def begin(self) -> AbstractAsyncContextManager[ReleaseStore]:
        """A store on a new transaction: committed if the block ends normally, else rolled
        back (whatever the block raised is raised again)."""
        ...


@dataclass
class BatchReport:
    """What one batch did, for metrics, logs and the demo summary."""

    messages: list[OutboxMessage] = field(default_factory=list)
    # Fresh results stored only in their inbox rows, per partition and transaction (see
    # `apply_batch(fresh_from_inbox=True)`): published from memory, no outbox rows.
    publications: list[Publication] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    records: int = 0
    skipped: int = 0  # below the stored offset: already applied before a crash or rebalance
    replays: int = 0
    # (partner_id, event_id, reservation_id) of each item naming another partner's reservation.
    cross_partner: list[tuple[str, str, str]] = field(default_factory=list)
    released_quantity: int = 0
    next_offsets: dict[TopicPartition, int] = field(default_factory=dict)
    rejected: list[tuple[RawRecord, Rejection]] = field(default_factory=list)
    # Not applied: a record that waited for a row lock held elsewhere and every later
    # record of its partition in the batch, in offset order; `next_offsets` stops before them.
    deferred: list[RawRecord] = field(default_factory=list)

    @property
    def foreign(self) -> int:
        return len(self.cross_partner)

    @property
    def rejections(self) -> Counter[int]:
        """Rejected records by status."""
        return Counter(rejection.status for _, rejection in self.rejected)

    @property
    def dead_letters(self) -> int:
        return sum(rejection.dead_letter for _, rejection in self.rejected)


# Makes a named tuple from all its fields without its Python-level __new__ (a frame per
# call), where one is made per item or record: `_new(Cls, (every field, in order))`.
_new = tuple.__new__


class ItemDecision(NamedTuple):
    """One item's outcome. A tuple, not a frozen dataclass: one is made per item, and a
    frozen dataclass's __init__ sets each field through object.__setattr__."""

    cart_item_id: str
    reservation_id: str
    outcome: Outcome
    quantity: int
    foreign: bool = False


def decide(
    command: ReleaseCommand,
    partner_id: str,
    found: dict[str, Reservation],
    cart_rows: Sequence[Reservation],
    foreign: set[str],
    status: dict[str, str],
) -> list[ItemDecision] | Rejection:
    """Outcomes of one command; `status` is the batch's running view and is updated."""
    if command.items is None:
        if not cart_rows:
            return _cart_not_found(command, partner_id)
        return [_decide_item(row, status) for row in cart_rows]
    decisions: list[ItemDecision] = []
    cart_id = command.cart_id
    for cart_item_id, rid in command.items:
        row = found.get(rid)
        # `_names` and `_decide_item`'s release, written out: two calls an item fewer.
        if (
            row is not None
            and row.partner_id == partner_id
            and row.cart_id == cart_id
            and row.cart_item_id == cart_item_id
        ):
            if status.get(rid, row.status) == "reserved":
                status[rid] = "released"
                released = (cart_item_id, rid, Outcome.RELEASED, row.quantity, False)
                decisions.append(_new(ItemDecision, released))
            else:
                decisions.append(_decide_item(row, status))
            continue
        # Another partner's reservation is reported exactly like a missing one.
        is_foreign = rid in foreign or (row is not None and row.partner_id != partner_id)
        decisions.append(ItemDecision(cart_item_id, rid, Outcome.NOT_FOUND, 0, is_foreign))
    return decisions


def _cart_not_found(command: ReleaseCommand, partner_id: str) -> Rejection:
    return Rejection(
        422,
        "cart_not_found",
        "No reservation of this partner belongs to this cart.",
        command.cart_id,
        command.event_id,
        command.cart_id,
        partner_id=partner_id,
    )


def _names(row: Reservation, partner_id: str, cart_id: str, cart_item_id: str) -> bool:
    """Whether an item of this partner's cart names this reservation."""
    return (row.partner_id, row.cart_id, row.cart_item_id) == (partner_id, cart_id, cart_item_id)


def decide_pruned_replay(
    command: ReleaseCommand,
    partner_id: str,
    found: dict[str, Reservation],
    cart_rows: Sequence[Reservation],
    status: dict[str, str],
) -> list[ItemDecision] | Rejection:
    """Outcomes reported again for a replay whose stored results were pruned; it releases
    nothing, whatever was added to the cart since (G3 at any age).

    The event was applied when it first came: what it released carries its eventId
    (`release_event_id`) and is reported `released` again. A whole-cart event reports its
    cart's other settled items as they stand now, never one still `reserved` (added since:
    the event would have released it otherwise), and its 422 again when none is left. An
    explicit one reports each named item as it stands now, and an item still `reserved` is
    `not_found`, as it was then.
    """

    def released_by_it(row: Reservation) -> bool:
        return row.status == "released" and row.release_event_id == command.event_id

    def released(row: Reservation) -> ItemDecision:
        return ItemDecision(row.cart_item_id, row.reservation_id, Outcome.RELEASED, row.quantity)

    if command.items is None:
        # A row still reserved was not in the cart then (the event would have released it).
        # If nothing else is left, the event found nothing then either: its 422 again.
        settled = [
            row for row in cart_rows if status.get(row.reservation_id, row.status) != "reserved"
        ]
        if not settled:
            return _cart_not_found(command, partner_id)
        return [
            released(row) if released_by_it(row) else _decide_item(row, status) for row in settled
        ]
    decisions = []
    for item in command.items:
        rid = item.item_reservation_id
        row = found.get(rid)
        if row is None or not _names(row, partner_id, command.cart_id, item.cart_item_id):
            decisions.append(ItemDecision(item.cart_item_id, rid, Outcome.NOT_FOUND, 0))
        elif released_by_it(row):
            decisions.append(released(row))
        elif status.get(rid, row.status) == "reserved":
            decisions.append(ItemDecision(item.cart_item_id, rid, Outcome.NOT_FOUND, 0))
        else:
            decisions.append(_decide_item(row, status))
    return decisions


def _decide_item(row: Reservation, status: dict[str, str]) -> ItemDecision:
    current = status.get(row.reservation_id, row.status)
    rid = row.reservation_id
    if current == "reserved":
        status[rid] = "released"
        # Every field given, by `tuple.__new__`: the named tuple's own __new__ is a Python
        # function, a frame per item.
        return _new(ItemDecision, (row.cart_item_id, rid, Outcome.RELEASED, row.quantity, False))
    outcome = {
        "released": Outcome.ALREADY_RELEASED,
        "expired": Outcome.EXPIRED,
        "confirmed": Outcome.CONFIRMED,
    }.get(current)
    if outcome is None:
        raise ValueError(f"reservation {rid} has an unknown status {current!r}")
    return ItemDecision(row.cart_item_id, rid, outcome, 0)


@dataclass(frozen=True, slots=True)
class BatchReads:
    """What `apply_batch` read for a batch, all `plan_batch` needs to decide it."""

    applied_up_to: Mapping[TopicPartition, int]  # the next offset to apply (absent: any)
    stored: Mapping[EventKey, StoredResults]  # of the fresh commands' events, if recorded
    reservations: Sequence[Reservation]  # named by the looked-up commands, by id
    foreign: set[str]  # ids named but not found that exist under another partner


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """The writes of a batch, each list in its lock order, and what to report of it.

    Inbox rows and outbox messages are kept apart: the inbox records what each event
    answered (for replays), the outbox holds what is to be published, in record order.
    """

    releases: list[tuple[str, str, str]]  # (reservation_id, partner_id, event_id), by id
    # (sku, location_id) -> quantity: what the claim is to return to stock (checked against
    # what it returned; the claim's statement locks and updates stock in its own order)
    stock_totals: dict[tuple[str, str], int]
    inbox: list[InboxEntry]
    outbox: list[OutboxMessage]  # results, replays, rejections and dead letters
    next_offsets: dict[TopicPartition, int]
    report: BatchReport  # its `messages` are the outbox's once enqueued
    # With `fresh_from_inbox`: the results of the inbox rows, per partition, in record order
    # (published from memory; not in `outbox`).
    fresh: dict[TopicPartition, list[OutboxMessage]] = field(default_factory=dict)

    @property
    def stock_deltas(self) -> list[tuple[str, str, int]]:
        """`stock_totals` as (sku, location_id, quantity), sorted: the stock lock order.
        Made only when asked (the batch itself needs the totals alone)."""
        totals = self.stock_totals
        return [(sku, loc, totals[sku, loc]) for sku, loc in sorted(totals)]


async def apply_batch(
    store: ReleaseStore,
    items: Sequence[Prepared],
    topics: Topics,
    now: datetime | None = None,
    fresh_from_inbox: bool = False,
) -> BatchReport:
    """Apply a batch (records in offset order per partition) inside the caller's transaction:
    read (in the lock order), plan, write (in the lock order).

    `fresh_from_inbox`: the results recorded in this batch's inbox rows (a fresh apply's
    item results, its 422) are not written to the outbox but returned in
    `report.publications`, to be published from memory; the partition's published watermark
    covers them (`worker/watermarks.py`). Only for a caller that locks and advances the
    offset rows (the worker): the rows it writes are then those of [stored next offset,
    new next offset). Replays, rejections and dead letters keep their outbox rows.
    """
    applied_up_to = await store.lock_offsets(
        sorted({(i.record.topic, i.record.partition) for i in items})
    )
    fresh = unapplied(items, applied_up_to)
    # Read without locks: any order will do, and a sort costs more than the rest.
    keys = list(dict.fromkeys(i.key for i in fresh if isinstance(i, Accepted)))
    stored = await store.stored_results(keys) if keys else {}
    explicit, carts = reservations_to_read(fresh, stored)
    rows = await store.find_reservations(explicit, carts) if (explicit or carts) else []
    found = {r.reservation_id for r in rows}
    missing = [(rid, partner) for rid, partner in explicit if rid not in found]
    foreign = await store.foreign_reservations(missing) if missing else set()
    reads = BatchReads(applied_up_to, stored, rows, foreign)
    plan = plan_batch(items, reads, topics, now or datetime.now(UTC), fresh_from_inbox)

    if plan.releases:
        moved = await store.release(plan.releases)
        if len(moved) != len(plan.releases):
            # Confirmed, expired or released elsewhere since it was read: decide again.
            raise TransientError("a reservation left 'reserved' after it was read; retrying")
        if stock_totals(moved) != plan.stock_totals:
            # The results quote the quantities read: a claim returning others decides again
            # (and what it returned to stock is rolled back with it).
            raise TransientError("a reservation changed after it was read; retrying")
    plan.report.messages = await store.enqueue(plan.outbox) if plan.outbox else []
    if plan.inbox:
        # The last write carries the offsets' advance: one round trip a batch less.
        inserted = await store.record_inbox(plan.inbox, plan.next_offsets)
        if len(inserted) != len(plan.inbox):
            raise TransientError("a concurrent transaction recorded the same event; retrying")
    else:
        await store.advance_offsets(plan.next_offsets)
    if fresh_from_inbox:
        # One per partition whose offset row this transaction moved, results or not: the
        # inbox rows it wrote are those of [start, end), start being the next offset it
        # found under the row lock (none: nothing applied before, no rows).
        for tp, end in sorted(plan.next_offsets.items()):
            start = applied_up_to.get(tp, 0)
            plan.report.publications.append(
                Publication(tp[0], tp[1], start, max(start, end), plan.fresh.get(tp, []))
            )
    return plan.report


_reservation_id = itemgetter(0)


def _partition(record: RawRecord) -> TopicPartition:
    return (record.topic, record.partition)


def unapplied(
    items: Sequence[Prepared], applied_up_to: Mapping[TopicPartition, int]
) -> list[Prepared]:
    """The items at or past their partition's stored offset: the others were applied before
    a crash or rebalance."""
    # `_partition` written out: a call fewer per record
    return [
        i for i in items if (r := i.record).offset >= applied_up_to.get((r.topic, r.partition), -1)
    ]


def reservations_to_read(
    fresh: Sequence[Prepared], stored: Mapping[EventKey, StoredResults]
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(reservation_id, partner_id) named and (partner_id, cart_id) of whole carts, each
    once (in the order first named), of the commands to decide.

    A record whose (partner, eventId) has results, stored or produced earlier in this
    batch, is a replay: it gets those results again and changes nothing. A rejected
    event records nothing, so the same eventId again is decided afresh, here as in a
    later batch (the same body earns the same rejection). So every record without
    stored results has its reservations looked up and locked, and replays whose stored
    results were pruned too: the reservations tell what the event did.
    """
    looked_up = [
        i
        for i in fresh
        if isinstance(i, Accepted) and (i.key not in stored or stored[i.key].results is None)
    ]
    # Read without locks (`find_reservations` answers in id order): not sorted here.
    explicit = list(
        dict.fromkeys(
            (item.item_reservation_id, i.partner_id)
            for i in looked_up
            if i.command.items
            for item in i.command.items
        )
    )
    carts = list(
        dict.fromkeys((i.partner_id, i.command.cart_id) for i in looked_up if not i.command.items)
    )
    return explicit, carts


def plan_batch(
    items: Sequence[Prepared],
    reads: BatchReads,
    topics: Topics,
    processed_at: datetime,
    fresh_from_inbox: bool = False,
) -> BatchPlan:
    """Decide every record of a batch from its reads, render its results and list the
    writes. Pure: no I/O, and the same inputs give the same plan, byte for byte.
    `fresh_from_inbox`: the results of the inbox rows go to `fresh`, not `outbox`."""
    report = BatchReport(records=len(items))
    next_offsets = report.next_offsets
    for i in items:
        record = i.record
        tp = (record.topic, record.partition)  # `_partition`, without the call
        end = record.next_offset
        if end > next_offsets.get(tp, 0):
            next_offsets[tp] = end
    fresh = unapplied(items, reads.applied_up_to)
    report.skipped = len(items) - len(fresh)

    found = {r.reservation_id: r for r in reads.reservations}
    by_cart: dict[tuple[str, str], list[Reservation]] = {}
    for r in reads.reservations:
        by_cart.setdefault((r.partner_id, r.cart_id), []).append(r)
    status: dict[str, str] = {}  # the batch's running view of the reservations' status
    produced: dict[EventKey, StoredResults] = dict(reads.stored)
    releases: list[tuple[str, str, str]] = []
    inbox: list[InboxEntry] = []
    outbox: list[OutboxMessage] = []
    from_inbox: dict[TopicPartition, list[OutboxMessage]] = {}

    for i in fresh:
        if isinstance(i, Rejected):
            report.rejected.append((i.record, i.rejection))
            outbox.extend(rejection_messages(i.record, i.rejection, topics, processed_at))
            continue
        command, partner_id, record = i.command, i.partner_id, i.record
        key = (partner_id, command.event_id)  # `i.key`, without the property's call
        if key in produced:
            report.replays += 1
            first, count = produced[key], None  # count: a rebuilt replay's item results
            if first.results is None:  # pruned: the reservations tell what the event did
                cart_rows = by_cart.get((partner_id, command.cart_id), [])
                first, count = _rebuilt_replay(i, found, cart_rows, status, processed_at)
                produced[key] = first
            headers = first.headers or result_headers(command.event_id, partner_id, record, count)
            payloads = first.results or []
            outbox.extend(result_messages(topics.results, first.cart_id, payloads, headers, record))
            continue
        # `command.whole_cart`, without the property's call
        cart_rows = by_cart.get((partner_id, command.cart_id), []) if command.items is None else []
        decided = decide(command, partner_id, found, cart_rows, reads.foreign, status)
        if isinstance(decided, Rejection):
            # Recorded like any result: the same eventId again is a replay of this 422,
            # even once the cart has reservations (a replay never releases anything new).
            report.rejected.append((record, decided))
            rejected = rejection_messages(record, decided, topics, processed_at)
            answer = rejected[0]
            assert answer.payload is not None
            payloads, headers = [answer.payload], answer.headers
            if fresh_from_inbox:
                from_inbox.setdefault(_partition(record), []).append(answer)
                outbox.extend(rejected[1:])
            else:
                outbox.extend(rejected)
        else:
            for d in decided:
                report.outcomes[d.outcome] += 1  # a StrEnum: equal to its value
                if d.foreign:
                    report.cross_partner.append((partner_id, command.event_id, d.reservation_id))
                if d.outcome is Outcome.RELEASED:
                    releases.append((d.reservation_id, partner_id, command.event_id))
                    report.released_quantity += d.quantity
            payloads = item_payloads(
                command.event_id, Trigger.RELEASE_REQUEST, command.cart_id, decided, processed_at
            )
            headers = result_headers(command.event_id, partner_id, record, len(payloads))
            tp = (record.topic, record.partition)  # `_partition`, without the call
            into = from_inbox.setdefault(tp, []) if fresh_from_inbox else outbox
            into.extend(result_messages(topics.results, command.cart_id, payloads, headers, record))
        produced[key] = _new(StoredResults, (command.cart_id, payloads, headers))
        inbox.append(
            _new(
                InboxEntry,
                (partner_id, command.event_id, command.cart_id, record, payloads, headers),
            )
        )

    releases.sort(key=_reservation_id)  # ids are unique: one release per reservation
    # `stock_totals` of the released rows, written out (no generators: one step per item)
    totals: dict[tuple[str, str], int] = {}
    for rid, _, _ in releases:
        row = found[rid]
        stock = (row.sku, row.location_id)
        totals[stock] = totals.get(stock, 0) + row.quantity
    return BatchPlan(releases, totals, inbox, outbox, next_offsets, report, from_inbox)


def _rebuilt_replay(
    accepted: Accepted,
    found: dict[str, Reservation],
    cart_rows: Sequence[Reservation],
    status: dict[str, str],
    processed_at: datetime,
) -> tuple[StoredResults, int | None]:
    """The results of a replay whose stored ones were pruned, from what its reservations
    say now (`decide_pruned_replay`), and how many item results (None: a rejection)."""
    command, cart_id = accepted.command, accepted.command.cart_id
    replayed = decide_pruned_replay(command, accepted.partner_id, found, cart_rows, status)
    if isinstance(replayed, Rejection):
        return StoredResults(cart_id, [rejection_payload(replayed, processed_at)], None), None
    payloads = item_payloads(
        command.event_id, Trigger.RELEASE_REQUEST, cart_id, replayed, processed_at
    )
    return StoredResults(cart_id, payloads, None), len(payloads)


def item_payloads(
    event_id: str,
    trigger: Trigger,
    cart_id: str,
    decisions: Iterable[ItemDecision],
    processed_at: datetime,
) -> list[bytes]:
    """The `item_result` bodies of one event's items: of a release request, of a replay
    rebuilt after pruning, or of an expiry."""
    return item_results(event_id, trigger, cart_id, decisions, processed_at)


def stock_totals(moved: Iterable[tuple[str, str, int]]) -> dict[tuple[str, str], int]:
    """Quantity to return per (sku, location_id), from (sku, location_id, quantity) per
    moved reservation."""
    totals: dict[tuple[str, str], int] = {}
    for sku, location_id, quantity in moved:
        key = (sku, location_id)
        totals[key] = totals.get(key, 0) + quantity
    return totals


def stock_deltas(moved: Iterable[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    """`stock_totals` as (sku, location_id, quantity), sorted: the stock lock order."""
    totals = stock_totals(moved)
    # The keys alone are sorted: comparing ((sku, location), quantity) pairs costs more.
    return [(sku, loc, totals[sku, loc]) for sku, loc in sorted(totals)]
