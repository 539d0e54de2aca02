"""The release decision and the batch application, on an in-memory store."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tests.unit.fake_store import FakeStore
from worker.contract import Rejection
from worker.records import OutboxMessage, RawRecord
from worker.release import Accepted, Rejected, Reservation, apply_batch
from worker.results import Topics
from worker.testing.scenario import abandon_event
from worker.validate import Limits, ReleaseCommand, parse_record

TOPICS = Topics("results", "dlq")


def reservation(
    rid: str,
    status: str = "reserved",
    cart: str = "c1",
    partner: str = "p1",
    item: str | None = None,
    sku: str = "s1",
    quantity: int = 2,
) -> Reservation:
    return Reservation(rid, partner, cart, item or f"i-{rid}", sku, "default", quantity, status)


def work(
    offset: int,
    cart: str,
    items: list[tuple[str, str]] | None,
    event_id: str | None = None,
    partner: str = "p1",
    partition: int = 0,
) -> Accepted:
    event = abandon_event(cart, items, "key", event_id=event_id)
    record = RawRecord("in", partition, offset, event.key, event.value, event.headers)
    command = parse_record(record, Limits())
    assert isinstance(command, ReleaseCommand)
    return Accepted(record, command, partner)


def bodies(store: FakeStore) -> list[dict[str, Any]]:
    return [orjson.loads(m.payload or b"") for m in store.outbox]


def inbox_bodies(store: FakeStore) -> list[dict[str, Any]]:
    """The results stored in the inbox, in the order their events were recorded."""
    return [orjson.loads(p) for s in store.inbox.values() for p in s.results or []]


def outcomes(store: FakeStore) -> list[tuple[str, str, int]]:
    return [(b["itemReservationId"], b["outcome"], b["quantity"]) for b in bodies(store)]


async def test_each_status_maps_to_its_outcome_and_only_reserved_returns_stock() -> None:
    rows = [
        reservation("r1"),
        reservation("r2", "released"),
        reservation("r3", "expired"),
        reservation("r4", "confirmed"),
    ]
    store = FakeStore(rows)
    items = [(f"i-r{n}", f"r{n}") for n in range(1, 5)] + [("i-x", "missing")]
    report = await apply_batch(store, [work(0, "c1", items, "e1")], TOPICS)
    assert outcomes(store) == [
        ("r1", "released", 2),
        ("r2", "already_released", 0),
        ("r3", "expired", 0),
        ("r4", "confirmed", 0),
        ("missing", "not_found", 0),
    ]
    assert [b["success"] for b in bodies(store)] == [True, True, True, False, False]
    assert store.reserved[("s1", "default")] == 0
    assert report.released_quantity == 2
    assert store.offsets == {("in", 0): 1}


async def test_wrong_cart_item_or_partner_is_not_found_and_counted_as_foreign() -> None:
    store = FakeStore([reservation("r1", partner="p2"), reservation("r2", cart="other")])
    report = await apply_batch(
        store, [work(0, "c1", [("i-r1", "r1"), ("i-r2", "r2")], "e1")], TOPICS
    )
    assert outcomes(store) == [("r1", "not_found", 0), ("r2", "not_found", 0)]
    assert report.foreign == 1
    # Never asked: the fake would refuse another partner's row, so its status proves nothing.
    assert store.asked_to_release == []
    assert store.reservations["r1"].status == "reserved"


async def test_a_later_record_in_the_same_batch_sees_the_earlier_release() -> None:
    store = FakeStore([reservation("r1")])
    batch = [work(0, "c1", [("i-r1", "r1")], "e1"), work(1, "c1", [("i-r1", "r1")], "e2")]
    await apply_batch(store, batch, TOPICS)
    assert outcomes(store) == [("r1", "released", 2), ("r1", "already_released", 0)]
    assert store.reserved[("s1", "default")] == 0


async def test_a_replayed_event_gets_the_stored_bytes_and_changes_nothing() -> None:
    store = FakeStore([reservation("r1")])
    first = work(0, "c1", [("i-r1", "r1")], "e1")
    await apply_batch(store, [first], TOPICS)
    report = await apply_batch(store, [work(1, "c1", [("i-r1", "r1")], "e1")], TOPICS)
    assert report.replays == 1
    assert store.outbox[0].payload == store.outbox[1].payload
    assert store.reserved[("s1", "default")] == 0


async def test_a_whole_cart_replay_after_pruning_releases_nothing_added_since() -> None:
    store = FakeStore([reservation("r1"), reservation("r2", "confirmed")])
    await apply_batch(store, [work(0, "c1", None, "e1")], TOPICS)
    store.prune(("p1", "e1"))  # pruned past the retention: only the key is kept
    added = reservation("r3", quantity=5)
    store.reservations["r3"] = added
    store.reserved[("s1", "default")] += added.quantity
    # Replayed alone, then twice in one batch.
    for offsets in ([1], [2, 3]):
        before = len(store.outbox)
        report = await apply_batch(store, [work(n, "c1", None, "e1") for n in offsets], TOPICS)
        assert (report.replays, report.released_quantity) == (len(offsets), 0)
        # What the event released is reported again, and the cart's settled r2 as it
        # stands; nothing about r3, added since.
        assert outcomes(store)[before:] == [("r1", "released", 2), ("r2", "confirmed", 0)] * len(
            offsets
        )
    assert store.reservations["r3"].status == "reserved"
    assert store.reserved[("s1", "default")] == 5


async def test_an_explicit_replay_after_pruning_reports_each_item_as_it_stands() -> None:
    store = FakeStore([reservation("r1"), reservation("r2", "confirmed")])
    items = [("i-r1", "r1"), ("i-r2", "r2"), ("i-r9", "r9")]
    await apply_batch(store, [work(0, "c1", items, "e1")], TOPICS)
    store.prune(("p1", "e1"))
    # r9 did not exist when the event ran; it does now, in this cart.
    store.reservations["r9"] = reservation("r9", quantity=4)
    store.reserved[("s1", "default")] += 4
    report = await apply_batch(store, [work(1, "c1", items, "e1")], TOPICS)
    assert report.replays == 1
    assert outcomes(store)[3:] == [
        ("r1", "released", 2),
        ("r2", "confirmed", 0),
        ("r9", "not_found", 0),
    ]
    assert store.reservations["r9"].status == "reserved"
    assert store.reserved[("s1", "default")] == 4


async def test_records_below_the_stored_offset_are_skipped() -> None:
    store = FakeStore([reservation("r1")])
    store.offsets[("in", 0)] = 5
    report = await apply_batch(store, [work(4, "c1", [("i-r1", "r1")], "e1")], TOPICS)
    assert report.skipped == 1
    assert store.outbox == []
    assert store.reservations["r1"].status == "reserved"


async def test_whole_cart_reports_every_reservation_of_the_partner_in_that_cart() -> None:
    store = FakeStore(
        [
            reservation("r1"),
            reservation("r2", "confirmed"),
            reservation("r3", partner="p2"),
            reservation("r4", cart="c2"),
        ]
    )
    await apply_batch(store, [work(0, "c1", None, "e1")], TOPICS)
    assert outcomes(store) == [("r1", "released", 2), ("r2", "confirmed", 0)]
    # Only r1 was asked for: not the confirmed r2, another partner's r3 or another cart's r4.
    assert store.asked_to_release == ["r1"]
    # Each result says how many the event has: a reader knows when the whole cart is in.
    assert [headers_of(m)["result-count"] for m in store.outbox] == [b"2", b"2"]


async def test_whole_cart_without_reservations_is_rejected_422() -> None:
    store = FakeStore()
    report = await apply_batch(store, [work(0, "c9", None, "e1")], TOPICS)
    assert report.rejections == {422: 1}
    assert bodies(store)[0]["errors"][0]["code"] == "cart_not_found"


async def test_a_422_is_recorded_so_its_event_id_again_is_a_replay_that_releases_nothing() -> None:
    """A whole-cart release that found no reservation is answered 422 and recorded like
    any result: the same (partner, eventId) again, in the same batch (it raised KeyError,
    finding 8) or later, after the cart got reservations, gets the same 422 bytes and
    releases nothing (G3: a replay never releases anything new)."""
    store = FakeStore()
    batch = [work(0, "c1", None, "e1"), work(1, "c1", None, "e1")]
    report = await apply_batch(store, batch, TOPICS)
    assert (report.rejections, report.replays) == ({422: 1}, 1)
    assert list(store.inbox) == [("p1", "e1")]
    store.reservations["r1"] = reservation("r1", cart="c1")
    store.reserved[("s1", "default")] = 2
    report = await apply_batch(store, [work(2, "c1", None, "e1")], TOPICS)
    assert (report.replays, report.released_quantity) == (1, 0)
    assert [m.payload for m in store.outbox] == [store.outbox[0].payload] * 3
    assert bodies(store)[0]["errors"][0]["code"] == "cart_not_found"
    assert store.reservations["r1"].status == "reserved"
    assert store.reserved[("s1", "default")] == 2


async def test_a_pruned_whole_cart_replay_that_released_nothing_still_answers() -> None:
    """Past the retention a replay is rebuilt from the reservations; one whose event
    released nothing still gets an answer (its cart's settled items, or the 422 again),
    never silence, and never a release of what was added since."""
    store = FakeStore([reservation("r2", "confirmed", cart="c1")])
    await apply_batch(store, [work(0, "c1", None, "e1"), work(1, "c9", None, "e9")], TOPICS)
    store.prune(("p1", "e1"))
    store.prune(("p1", "e9"))
    for rid, cart in (("r3", "c1"), ("r4", "c9")):
        store.reservations[rid] = reservation(rid, cart=cart)
        store.reserved[("s1", "default")] = store.reserved.get(("s1", "default"), 0) + 2
    before = len(store.outbox)
    report = await apply_batch(
        store, [work(2, "c1", None, "e1"), work(3, "c9", None, "e9")], TOPICS
    )
    assert (report.replays, report.released_quantity) == (2, 0)
    replayed = bodies(store)[before:]
    assert [(b["itemReservationId"], b["outcome"]) for b in replayed[:1]] == [("r2", "confirmed")]
    assert (replayed[1]["status"], replayed[1]["errors"][0]["code"]) == (422, "cart_not_found")
    assert len(replayed) == 2
    assert {store.reservations[r].status for r in ("r3", "r4")} == {"reserved"}


async def test_stock_is_returned_per_sku_in_sorted_order() -> None:
    store = FakeStore(
        [reservation("r1", sku="b"), reservation("r2", sku="a"), reservation("r3", sku="b")]
    )
    items = [("i-r1", "r1"), ("i-r2", "r2"), ("i-r3", "r3")]
    await apply_batch(store, [work(0, "c1", items, "e1")], TOPICS)
    assert store.reserved == {("a", "default"): 0, ("b", "default"): 0}


@pytest.mark.parametrize("dead_letter", [True, False])
async def test_a_rejection_is_published_and_its_offset_advances(dead_letter: bool) -> None:
    store = FakeStore()
    record = RawRecord("in", 3, 7, b"k", b"{bad", ())
    rejection = Rejection(400, "invalid_json", "bad", None, record.position, None, dead_letter)
    await apply_batch(store, [Rejected(record, rejection)], TOPICS)
    assert [m.topic for m in store.outbox] == ["results", "dlq"][: 1 + dead_letter]
    assert store.offsets == {("in", 3): 8}


def headers_of(message: OutboxMessage) -> dict[str, bytes | None]:
    return dict(message.headers)


async def test_another_partner_reusing_an_eventid_gets_results_named_for_it() -> None:
    # Finding 5: B's not_found had the same (eventId, itemReservationId) as A's released,
    # so a consumer deduplicating on those two dropped one of them.
    store = FakeStore([reservation("r1", partner="pA")])
    a = work(0, "c1", [("i-r1", "r1")], "e1", partner="pA")
    b = work(1, "c1", [("i-r1", "r1")], "e1", partner="pB")
    await apply_batch(store, [a, b], TOPICS)
    assert outcomes(store) == [("r1", "released", 2), ("r1", "not_found", 0)]
    assert [headers_of(m)["partner-id"] for m in store.outbox] == [b"pA", b"pB"]
    assert [headers_of(m)["event-id"] for m in store.outbox] == [b"e1", b"e1"]


@pytest.mark.parametrize("same_batch", [True, False], ids=["same_batch", "later_batch"])
async def test_a_replay_is_the_first_publication_byte_for_byte(same_batch: bool) -> None:
    store = FakeStore([reservation("r1")])
    first = work(0, "c1", [("i-r1", "r1")], "e1")
    # Same partner and eventId, from another session (work() draws one) and naming another
    # cart: a replay, answered with what was published the first time, key and headers too.
    again = work(1, "c2", [("i-r1", "r1")], "e1")
    for batch in [[first, again]] if same_batch else [[first], [again]]:
        await apply_batch(store, batch, TOPICS)
    original, replay = store.outbox
    assert (replay.key, replay.payload, replay.headers) == (
        original.key,
        original.payload,
        original.headers,
    )
    assert headers_of(original)["partner-id"] == b"p1"


async def test_a_rejection_decided_after_authentication_names_the_partner() -> None:
    store = FakeStore()
    await apply_batch(store, [work(0, "c9", None, "e1")], TOPICS)
    (result,) = store.outbox
    assert bodies(store)[0]["errors"][0]["code"] == "cart_not_found"
    assert (result.key, headers_of(result)["partner-id"]) == (b"c9", b"p1")


async def test_a_rejection_before_the_partner_is_known_is_keyed_by_the_record() -> None:
    # A 401 names no partner, and is not steered onto the cart its body names.
    store = FakeStore()
    record = RawRecord("in", 0, 1, b"record-key", b"{}", (("rokt-session-id", b"s"),))
    rejection = Rejection(401, "unknown_api_key", "unknown", None, "e1", "someone-elses-cart")
    await apply_batch(store, [Rejected(record, rejection)], TOPICS)
    (result,) = store.outbox
    assert result.key == b"record-key"
    assert headers_of(result) == {"event-id": b"e1", "rokt-session-id": b"s"}


async def test_fresh_results_from_the_inbox_skip_the_outbox_and_name_their_offset_range() -> None:
    store = FakeStore([reservation("r1"), reservation("r2", cart="c2")])
    store.offsets[("in", 0)] = 5
    batch = [
        work(3, "c1", [("i-r1", "r1")], "old"),  # below the stored offset: skipped
        work(5, "c1", [("i-r1", "r1")], "e1"),
        work(6, "c1", [("i-r1", "r1")], "e1"),  # a replay: its results keep the outbox
        work(7, "c9", None, "e9"),  # a 422, recorded in the inbox: from the inbox too
        work(0, "c2", [("i-r2", "r2")], "e2", partition=1),
    ]
    report = await apply_batch(store, batch, TOPICS, fresh_from_inbox=True)
    assert [(p.topic, p.partition, p.start, p.end) for p in report.publications] == [
        ("in", 0, 5, 8),
        ("in", 1, 0, 1),
    ]
    fresh = {(p.partition): p.messages for p in report.publications}
    # Byte for byte what the inbox holds, keyed by the cart, with the stored headers (G2).
    for partition, key in [(0, ("p1", "e1")), (1, ("p1", "e2"))]:
        stored = store.inbox[key]
        ours = [m for m in fresh[partition] if m.key == stored.cart_id.encode()]
        assert [m.payload for m in ours] == stored.results
        assert {m.headers for m in ours} == {stored.headers}
    assert [m.key for m in fresh[0]] == [b"c1", b"c9"]
    assert orjson.loads(fresh[0][1].payload or b"")["errors"][0]["code"] == "cart_not_found"
    # Only the replay went to the outbox.
    assert [m.payload for m in store.outbox] == store.inbox[("p1", "e1")].results
    assert report.messages == store.outbox


async def test_without_fresh_from_inbox_every_result_is_an_outbox_row() -> None:
    store = FakeStore([reservation("r1")])
    report = await apply_batch(store, [work(0, "c1", [("i-r1", "r1")], "e1")], TOPICS)
    assert report.publications == []
    assert outcomes(store) == [("r1", "released", 2)]


async def test_a_batch_recording_inbox_rows_advances_its_offsets_with_them() -> None:
    store = FakeStore([reservation("r1")])
    calls: list[str] = []

    async def checkpoint(what: str) -> None:
        calls.append(what)

    store.checkpoint = checkpoint
    await apply_batch(store, [work(4, "c1", [("i-r1", "r1")], "e1")], TOPICS)
    assert calls[-1] == "record_inbox"
    assert "advance_offsets" not in calls
    assert store.offsets == {("in", 0): 5}
