"""An in-memory `ReleaseStore` (our own Protocol), for unit tests of the domain.

The simulation (tests/simulation) runs it as the committed state of a fake database: a
transaction works on a `copy()`, and every awaited method first awaits `checkpoint`,
where the simulation injects outages, lock waits and crashes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from worker.records import OutboxMessage
from worker.release import EventKey, InboxEntry, Reservation, StoredResults, TopicPartition

Checkpoint = Callable[[str], Awaitable[None]]


async def _no_checkpoint(_: str) -> None:
    return None


class FakeStore:
    def __init__(self, reservations: Sequence[Reservation] = ()) -> None:
        self.reservations = {r.reservation_id: r for r in reservations}
        self.reserved: dict[tuple[str, str], int] = {}
        for r in reservations:
            if r.status == "reserved":
                key = (r.sku, r.location_id)
                self.reserved[key] = self.reserved.get(key, 0) + r.quantity
        self.inbox: dict[EventKey, StoredResults] = {}
        self.outbox: list[OutboxMessage] = []
        # Every `enqueue` call's messages, never deleted (a history for the simulation).
        self.enqueued: list[tuple[OutboxMessage, ...]] = []
        self.next_outbox_id = 0
        self.offsets: dict[TopicPartition, int] = {}
        # consumer_offsets.published_offset, and each inbox row's (source, offset, key).
        self.published_offsets: dict[TopicPartition, int] = {}
        self.inbox_rows: list[tuple[TopicPartition, int, EventKey]] = []
        # Per committed transaction (for the simulation): its outbox rows and inbox keys.
        self.transactions: list[tuple[tuple[OutboxMessage, ...], tuple[EventKey, ...]]] = []
        self._written: tuple[list[OutboxMessage], list[EventKey]] = ([], [])
        # The published watermark this worker claims, folded into `advance_offsets`.
        self.claim: Callable[[TopicPartition], int | None] = lambda tp: None
        # Every reservation the code asked `release` to move, moved or not: the fake refuses
        # another partner's or a settled reservation, so only this shows the code asked.
        self.asked_to_release: list[str] = []
        self.checkpoint: Checkpoint = _no_checkpoint

    def copy(self) -> FakeStore:
        """An independent copy of the state (the rows are immutable), for a transaction."""
        twin = FakeStore()
        twin.reservations = dict(self.reservations)
        twin.reserved = dict(self.reserved)
        twin.inbox = dict(self.inbox)
        twin.outbox = list(self.outbox)
        twin.enqueued = list(self.enqueued)
        twin.next_outbox_id = self.next_outbox_id
        twin.offsets = dict(self.offsets)
        twin.asked_to_release = list(self.asked_to_release)
        twin.published_offsets = dict(self.published_offsets)
        twin.inbox_rows = list(self.inbox_rows)
        twin.transactions = list(self.transactions)
        return twin

    async def lock_offsets(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        await self.checkpoint("lock_offsets")
        return {tp: self.offsets[tp] for tp in partitions if tp in self.offsets}

    async def stored_results(self, keys: Sequence[EventKey]) -> dict[EventKey, StoredResults]:
        await self.checkpoint("stored_results")
        return {k: self.inbox[k] for k in keys if k in self.inbox}

    def prune(self, key: EventKey) -> None:
        """What `store.prune_inbox` does past the retention: only the key is kept."""
        self.inbox[key] = StoredResults(self.inbox[key].cart_id, None, None)

    async def find_reservations(
        self, explicit: Sequence[tuple[str, str]], carts: Sequence[tuple[str, str]]
    ) -> list[Reservation]:
        await self.checkpoint("find_reservations")
        wanted = set(explicit)
        cart_set = set(carts)
        return sorted(
            (
                r
                for r in self.reservations.values()
                if (r.reservation_id, r.partner_id) in wanted
                or (r.partner_id, r.cart_id) in cart_set
            ),
            key=lambda r: r.reservation_id,
        )

    async def foreign_reservations(self, explicit: Sequence[tuple[str, str]]) -> set[str]:
        await self.checkpoint("foreign_reservations")
        return {
            rid
            for rid, partner in explicit
            if rid in self.reservations and self.reservations[rid].partner_id != partner
        }

    async def release(self, releases: Sequence[tuple[str, str, str]]) -> list[tuple[str, str, int]]:
        await self.checkpoint("release")
        assert list(releases) == sorted(releases), "reservations are claimed in id order"
        moved = []
        for rid, partner_id, event_id in releases:
            self.asked_to_release.append(rid)
            row = self.reservations[rid]
            if row.status == "reserved" and row.partner_id == partner_id:
                self.reservations[rid] = row._replace(status="released", release_event_id=event_id)
                moved.append((row.sku, row.location_id, row.quantity))
        # The moved rows' quantities back to stock, in the stock lock order.
        totals: dict[tuple[str, str], int] = {}
        for sku, loc, qty in moved:
            totals[(sku, loc)] = totals.get((sku, loc), 0) + qty
        for key in sorted(totals):
            self.reserved[key] -= totals[key]
        return moved

    async def record_inbox(
        self, entries: Sequence[InboxEntry], next_offsets: dict[TopicPartition, int]
    ) -> set[EventKey]:
        await self.checkpoint("record_inbox")
        inserted = set()
        for e in entries:
            key = (e.partner_id, e.event_id)
            if key not in self.inbox:
                self.inbox[key] = StoredResults(e.cart_id, e.results, e.headers)
                self.inbox_rows.append(((e.record.topic, e.record.partition), e.record.offset, key))
                self._written[1].append(key)
                inserted.add(key)
        # One statement with the inbox rows (a failed insert rolls the transaction back).
        self._advance(next_offsets)
        return inserted

    async def enqueue(self, messages: Sequence[OutboxMessage]) -> list[OutboxMessage]:
        await self.checkpoint("enqueue")
        start = self.next_outbox_id
        stored = [m._replace(outbox_id=start + n) for n, m in enumerate(messages)]
        self.next_outbox_id += len(stored)
        self.outbox.extend(stored)
        self.enqueued.append(tuple(stored))  # the caller may extend the list it gets
        self._written[0].extend(stored)
        return stored

    async def advance_offsets(self, next_offsets: dict[TopicPartition, int]) -> None:
        await self.checkpoint("advance_offsets")
        self._advance(next_offsets)

    def _advance(self, next_offsets: dict[TopicPartition, int]) -> None:
        for tp, n in next_offsets.items():
            self.offsets[tp] = max(self.offsets.get(tp, 0), n)
            claim = self.claim(tp)
            if claim is not None:
                self.published_offsets[tp] = max(self.published_offsets.get(tp, 0), claim)
        # `apply_batch`'s last write: what this transaction wrote, should it commit.
        outbox, keys = self._written
        self.transactions.append((tuple(outbox), tuple(keys)))
        self._written = ([], [])

    def store_published(self, marks: dict[TopicPartition, int]) -> None:
        for tp, mark in marks.items():
            self.published_offsets[tp] = max(self.published_offsets.get(tp, 0), mark)

    def stored_range(
        self, tp: TopicPartition, start: int, end: int
    ) -> list[tuple[int, StoredResults]]:
        """(source offset, stored results) of `tp`'s inbox rows in [start, end), in order."""
        rows = sorted((o, k) for t, o, k in self.inbox_rows if t == tp and start <= o < end)
        return [(o, self.inbox[k]) for o, k in rows]

    def delete_outbox(self, ids: Sequence[int]) -> None:
        gone = set(ids)
        self.outbox = [m for m in self.outbox if m.outbox_id not in gone]
