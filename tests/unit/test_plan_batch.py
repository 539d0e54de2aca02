"""`plan_batch`, the pure middle of `apply_batch`: reads in, writes out, no store at all."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

import orjson

from tests.unit.test_release import reservation, work
from worker.contract import Rejection
from worker.records import RawRecord
from worker.release import (
    BatchPlan,
    BatchReads,
    EventKey,
    Prepared,
    Rejected,
    Reservation,
    StoredResults,
    TopicPartition,
    plan_batch,
)
from worker.results import Topics

TOPICS = Topics("results", "dlq")
NOW = datetime(2026, 12, 3, 8, 0, tzinfo=UTC)


def plan(
    items: Sequence[Prepared],
    rows: Sequence[Reservation] = (),
    *,
    applied_up_to: Mapping[TopicPartition, int] | None = None,
    stored: Mapping[EventKey, StoredResults] | None = None,
    foreign: set[str] | None = None,
) -> BatchPlan:
    reads = BatchReads(applied_up_to or {}, stored or {}, rows, foreign or set())
    return plan_batch(items, reads, TOPICS, NOW)


def outcomes(plan: BatchPlan) -> list[tuple[str, str, int]]:
    bodies = [orjson.loads(m.payload or b"") for m in plan.outbox]
    return [(b["itemReservationId"], b["outcome"], b["quantity"]) for b in bodies]


def test_releases_and_stock_deltas_are_listed_in_the_lock_order() -> None:
    rows = [
        reservation("r3", cart="c2", sku="b"),
        reservation("r1", sku="b", quantity=1),
        reservation("r2", sku="a", quantity=3),
    ]
    items = [work(0, "c2", None, "e2"), work(1, "c1", [("i-r2", "r2"), ("i-r1", "r1")], "e1")]
    planned = plan(items, rows)
    assert planned.releases == [("r1", "p1", "e1"), ("r2", "p1", "e1"), ("r3", "p1", "e2")]
    assert planned.stock_deltas == [("a", "default", 3), ("b", "default", 3)]
    assert planned.report.released_quantity == 6
    assert planned.next_offsets == {("in", 0): 2}
    # One inbox row per decided event, with exactly the results the outbox publishes.
    assert [(e.event_id, len(e.results)) for e in planned.inbox] == [("e2", 1), ("e1", 2)]
    assert [m.payload for m in planned.outbox] == [p for e in planned.inbox for p in e.results]


def test_a_replay_publishes_what_was_stored_and_writes_nothing_else() -> None:
    stored = StoredResults("c-first", [b"first result"], (("event-id", b"e1"),))
    planned = plan(
        [work(5, "c1", [("i-r1", "r1")], "e1")], [reservation("r1")], stored={("p1", "e1"): stored}
    )
    assert [(m.key, m.payload, m.headers) for m in planned.outbox] == [
        (b"c-first", b"first result", (("event-id", b"e1"),))
    ]
    assert (planned.releases, planned.stock_deltas, planned.inbox) == ([], [], [])
    assert planned.report.replays == 1
    assert planned.next_offsets == {("in", 0): 6}


def test_records_below_the_stored_offset_are_skipped_but_counted() -> None:
    planned = plan(
        [work(0, "c1", None, "e1"), work(1, "c1", None, "e2")],
        [reservation("r1")],
        applied_up_to={("in", 0): 1},
    )
    assert (planned.report.records, planned.report.skipped) == (2, 1)
    assert [e.event_id for e in planned.inbox] == ["e2"]
    assert planned.releases == [("r1", "p1", "e2")]


def test_a_rejected_record_is_published_and_dead_lettered_but_not_recorded() -> None:
    record = RawRecord("in", 2, 9, b"k", b"{bad", ())
    rejection = Rejection(400, "invalid_json", "bad", None, record.position, None, True)
    planned = plan([Rejected(record, rejection)])
    assert [m.topic for m in planned.outbox] == ["results", "dlq"]
    assert planned.inbox == []
    assert planned.report.rejected == [(record, rejection)]
    assert planned.next_offsets == {("in", 2): 10}


def test_an_empty_cart_is_a_recorded_422_so_the_same_event_later_replays_it() -> None:
    planned = plan([work(0, "c9", None, "e1"), work(1, "c9", None, "e1")])
    (entry,) = planned.inbox
    assert orjson.loads(entry.results[0])["errors"][0]["code"] == "cart_not_found"
    # The second record is a replay of the first, within the batch.
    assert [m.payload for m in planned.outbox] == entry.results * 2
    assert planned.report.replays == 1


def test_a_foreign_reservation_is_not_found_and_reported() -> None:
    planned = plan([work(0, "c1", [("i-r7", "r7")], "e1")], foreign={"r7"})
    assert outcomes(planned) == [("r7", "not_found", 0)]
    assert planned.report.cross_partner == [("p1", "e1", "r7")]
    assert planned.releases == []


def test_the_same_reads_give_the_same_plan_byte_for_byte() -> None:
    rows = [reservation("r1"), reservation("r2", "expired")]
    items = [work(0, "c1", None, "e1"), work(1, "c1", [("i-r2", "r2")], "e2")]
    first, second = plan(items, rows), plan(items, rows)
    assert first.outbox == second.outbox
    assert first.inbox == second.inbox
    assert outcomes(first) == [("r1", "released", 2), ("r2", "expired", 0), ("r2", "expired", 0)]
