"""An in-memory `ReleaseStore` (our own Protocol), for unit tests of the domain."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from worker.records import OutboxMessage
from worker.release import EventKey, InboxEntry, Reservation, StoredResults, TopicPartition


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
        self.offsets: dict[TopicPartition, int] = {}

    async def lock_offsets(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.offsets[tp] for tp in partitions if tp in self.offsets}

    async def stored_results(self, keys: Sequence[EventKey]) -> dict[EventKey, StoredResults]:
        return {k: self.inbox[k] for k in keys if k in self.inbox}

    def prune(self, key: EventKey) -> None:
        """What `store.prune_inbox` does past the retention: only the key is kept."""
        self.inbox[key] = StoredResults(self.inbox[key].cart_id, None, None)

    async def lock_reservations(
        self, explicit: Sequence[tuple[str, str]], carts: Sequence[tuple[str, str]]
    ) -> list[Reservation]:
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
        return {
            rid
            for rid, partner in explicit
            if rid in self.reservations and self.reservations[rid].partner_id != partner
        }

    async def release(self, releases: Sequence[tuple[str, str, str]]) -> list[Reservation]:
        moved = []
        for rid, partner_id, event_id in releases:
            row = self.reservations[rid]
            if row.status == "reserved" and row.partner_id == partner_id:
                self.reservations[rid] = replace(row, status="released", release_event_id=event_id)
                moved.append(row)
        return moved

    async def return_stock(self, deltas: Sequence[tuple[str, str, int]]) -> None:
        assert list(deltas) == sorted(deltas), "stock must be locked in (sku, location) order"
        for sku, loc, qty in deltas:
            self.reserved[(sku, loc)] -= qty

    async def record_inbox(self, entries: Sequence[InboxEntry]) -> set[EventKey]:
        inserted = set()
        for e in entries:
            key = (e.partner_id, e.event_id)
            if key not in self.inbox:
                self.inbox[key] = StoredResults(e.cart_id, e.results, e.headers)
                inserted.add(key)
        return inserted

    async def enqueue(self, messages: Sequence[OutboxMessage]) -> list[OutboxMessage]:
        start = len(self.outbox)
        stored = [replace(m, outbox_id=start + n) for n, m in enumerate(messages)]
        self.outbox.extend(stored)
        return stored

    async def advance_offsets(self, next_offsets: dict[TopicPartition, int]) -> None:
        for tp, n in next_offsets.items():
            self.offsets[tp] = max(self.offsets.get(tp, 0), n)
