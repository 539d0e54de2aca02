"""`BatchProcessor` over the in-memory store: a record waiting for a lock defers only its
partition (DESIGN.md §7, "A busy row is not poison")."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import asyncpg
from prometheus_client import REGISTRY

from tests.unit.fake_store import FakeStore
from tests.unit.test_release import inbox_bodies, reservation
from worker.auth import Authenticator, Partner
from worker.config import Settings
from worker.processor import BatchProcessor
from worker.records import RawRecord
from worker.release import BatchReport, ReleaseStore, Reservation, TopicPartition
from worker.testing.scenario import abandon_event

API_KEY = "key"


class BusyStore(FakeStore):
    """A reservation row, or a partition's offset row, locked by another session: every
    statement that needs it ends in a lock wait while it is held."""

    def __init__(self, reservations: Sequence[Reservation]) -> None:
        super().__init__(reservations)
        self.busy_reservations: set[str] = set()
        self.busy_offsets: set[TopicPartition] = set()
        self.lock_waits = 0

    def _lock_wait(self) -> None:
        self.lock_waits += 1
        raise asyncpg.exceptions.LockNotAvailableError("canceling statement due to lock timeout")

    async def lock_offsets(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        if self.busy_offsets & set(partitions):
            self._lock_wait()
        return await super().lock_offsets(partitions)

    async def release(self, releases: Sequence[tuple[str, str, str]]) -> list[tuple[str, str, int]]:
        if self.busy_reservations & {rid for rid, _, _ in releases}:
            self._lock_wait()
        return await super().release(releases)


class Transactions:
    """Every lock wait above is raised before the batch writes anything, so the store needs
    no rollback."""

    def __init__(self, store: BusyStore) -> None:
        self.store = store

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[ReleaseStore]:
        yield self.store


async def _partners(digests: list[bytes]) -> list[Partner]:
    return [Partner("p1", d, ("tag-1",), "active") for d in digests]


def _processor(store: BusyStore) -> BatchProcessor:
    settings = Settings(retry_initial_s=0.001, retry_max_s=0.01)
    return BatchProcessor(Transactions(store), settings, Authenticator(_partners, 60))


def _record(partition: int, offset: int, reservation_id: str) -> RawRecord:
    event = abandon_event(
        f"c{partition}", [(f"i-{reservation_id}", reservation_id)], API_KEY, event_id=reservation_id
    )
    return RawRecord("in", partition, offset, event.key, event.value, event.headers)


def _positions(records: Sequence[RawRecord]) -> list[tuple[int, int]]:
    return [(r.partition, r.offset) for r in records]


def _lock_waits_total() -> float:
    return REGISTRY.get_sample_value("release_worker_lock_waits_total") or 0.0


BATCH = [
    _record(0, 0, "a0"),
    _record(0, 1, "busy"),  # its row is locked elsewhere
    _record(1, 0, "b0"),
    _record(0, 2, "a2"),
    _record(1, 1, "b1"),
]


def _store() -> BusyStore:
    rows = [reservation(rid, cart=f"c{p}") for p, rid in [(0, "a0"), (0, "busy"), (0, "a2")]]
    rows += [reservation(rid, cart="c1") for rid in ["b0", "b1", "b2"]]
    return BusyStore(rows)


def _status(store: BusyStore) -> dict[str, str]:
    return {rid: r.status for rid, r in store.reservations.items()}


async def _process(processor: BatchProcessor, records: Sequence[RawRecord]) -> BatchReport:
    # Before deferral, `process` retried the lock wait inline until the row was free.
    async with asyncio.timeout(5):
        return await processor.process(records)


async def test_a_record_waiting_for_a_lock_defers_its_partition_and_the_rest_is_applied() -> None:
    store = _store()
    store.busy_reservations = {"busy"}
    waits = _lock_waits_total()
    report = await _process(_processor(store), BATCH)
    # Partition 1's records, after the busy one in the batch, are applied; so is the
    # record of partition 0 before it. The busy one and partition 0's later record wait.
    assert _status(store) == {
        "a0": "released",
        "busy": "reserved",
        "a2": "reserved",  # never before the busy record (G4)
        "b0": "released",
        "b1": "released",
        "b2": "reserved",
    }
    assert _positions(report.deferred) == [(0, 1), (0, 2)]
    assert [r.lock_waits for r in report.deferred] == [1, 0]
    assert report.next_offsets == {("in", 0): 1, ("in", 1): 2}
    assert store.offsets == {("in", 0): 1, ("in", 1): 2}
    assert report.records == 3
    assert not report.rejected
    assert _lock_waits_total() > waits


async def test_a_deferred_record_offered_again_waits_alone_then_applies_in_order() -> None:
    store = _store()
    store.busy_reservations = {"busy"}
    processor = _processor(store)
    first = await _process(processor, BATCH)
    later = [_record(1, 2, "b2")]  # another partition's record joins the batch

    # Still held: the record that waited goes first and alone, so one lock wait defers
    # its partition again, without splitting the batch down to it.
    store.lock_waits = 0
    again = await _process(processor, [*first.deferred, *later])
    assert store.lock_waits == 1
    assert _positions(again.deferred) == [(0, 1), (0, 2)]
    assert [r.lock_waits for r in again.deferred] == [2, 0]
    assert _status(store)["b2"] == "released"

    store.busy_reservations = set()  # the lock is let go
    done = await _process(processor, again.deferred)
    assert done.deferred == []
    assert _status(store) == dict.fromkeys(["a0", "busy", "a2", "b0", "b1", "b2"], "released")
    assert store.offsets == {("in", 0): 3, ("in", 1): 3}
    # Fresh results are stored in the inbox only (published from memory): in the order
    # their records were applied.
    released = [b["itemReservationId"] for b in inbox_bodies(store)]
    assert released.index("busy") < released.index("a2")
    assert done.next_offsets == {("in", 0): 3}


async def test_an_offset_row_held_elsewhere_defers_its_whole_partition() -> None:
    store = _store()
    store.busy_offsets = {("in", 0)}
    report = await _process(_processor(store), BATCH)
    assert _positions(report.deferred) == [(0, 0), (0, 1), (0, 2)]
    assert store.offsets == {("in", 1): 2}
    assert _status(store)["a0"] == "reserved"
    assert _status(store)["b1"] == "released"
