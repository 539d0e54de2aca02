"""The hot paths make some named tuples with `tuple.__new__(Cls, (every field, in order))`
instead of `Cls(...)` (the named tuple's own __new__ is a Python function, a frame per
call). Such a tuple is only right while the fields given match the class's: these tests
hold the two ways to the same values, so adding or reordering a field fails here."""

from __future__ import annotations

from worker import store
from worker.contract import Outcome
from worker.records import OutboxMessage, RawRecord
from worker.release import Accepted, InboxEntry, ItemDecision, Reservation, StoredResults
from worker.results import result_messages
from worker.validate import Item, plain_request


def test_reservation_columns_are_the_fields_in_order() -> None:
    columns = store._RESERVATION_COLUMNS.split(", ")
    assert tuple(columns) == Reservation._fields
    row = ("r1", "p", "c", "ci", "sku", "loc", 2, "reserved", None)
    assert store._reservations([row]) == [Reservation(*row)]
    assert type(store._reservations([row])[0]) is Reservation


def test_item_results_messages_as_the_constructor_makes_them() -> None:
    record = RawRecord("in", 0, 7, b"k", b"{}", (), 1234)
    headers = (("event-id", b"e"),)
    made = result_messages("results", "cart", [b"a", b"b"], headers, record)
    assert made == [OutboxMessage("results", b"cart", p, headers, None, 1234) for p in (b"a", b"b")]
    assert [m.source_ts_ms for m in made] == [1234, 1234]
    assert all(m.outbox_id is None for m in made)


def test_plain_items_as_the_constructor_makes_them() -> None:
    body = {"cartId": "c", "items": [{"cartItemId": "i", "itemReservationId": "r"}]}
    request = plain_request(body)
    assert request is not None
    assert request.items == (Item("i", "r"),)
    assert type(request.items[0]) is Item


def test_field_counts_of_the_tuples_made_by_tuple_new() -> None:
    # The sites: release._decide_item (5), release.plan_batch (3 and 6),
    # processor._prepare (3), results.result_messages (6), validate.plain_request (2).
    assert len(ItemDecision._fields) == 5
    assert len(StoredResults._fields) == 3
    assert len(InboxEntry._fields) == 6
    assert len(Accepted._fields) == 3
    assert len(OutboxMessage._fields) == 6
    assert len(Item._fields) == 2
    assert ItemDecision("i", "r", Outcome.RELEASED, 1) == tuple.__new__(
        ItemDecision, ("i", "r", Outcome.RELEASED, 1, False)
    )
