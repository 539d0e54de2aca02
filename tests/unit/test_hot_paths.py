"""Spellings of the hot paths agree with the plain ones they replace.

Some named tuples are made by `tuple.__new__(Cls, (every field, in order))` instead of
`Cls(...)` (the named tuple's own __new__ is a Python function, a frame per call); such a
tuple is only right while the fields given match the class's, so adding or reordering a
field fails here. `decide` writes out `_names` and `_decide_item`'s release, and the
headers are base64-encoded by binascii."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import orjson
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.unit.test_release import work
from worker import store, validate
from worker.contract import (
    LIMITED_HEADERS,
    MAX_HEADER_BYTES,
    MAX_HEADERS_BYTES,
    Outcome,
    Rejection,
)
from worker.records import Headers, OutboxMessage, RawRecord
from worker.release import (
    Accepted,
    BatchReads,
    InboxEntry,
    ItemDecision,
    Reservation,
    StoredResults,
    _decide_item,
    _names,
    decide,
    plan_batch,
    stock_deltas,
    stock_totals,
)
from worker.results import Topics, result_messages
from worker.validate import (
    Item,
    ReleaseCommand,
    acceptable_header,
    plain_request,
)

TOPICS = Topics("results", "dlq")
NOW = datetime(2026, 12, 3, 17, 0, tzinfo=UTC)


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
    # processor._prepare (3), results.result_messages (6), validate.plain_request (2 and 4),
    # validate.parse_record (7).
    assert len(ItemDecision._fields) == 5
    assert len(StoredResults._fields) == 3
    assert len(InboxEntry._fields) == 6
    assert len(Accepted._fields) == 3
    assert len(OutboxMessage._fields) == 6
    assert len(Item._fields) == 2
    assert len(ReleaseCommand._fields) == 7  # validate.parse_record
    assert len(validate._Request._fields) == 4  # validate.plain_request
    assert ItemDecision("i", "r", Outcome.RELEASED, 1) == tuple.__new__(
        ItemDecision, ("i", "r", Outcome.RELEASED, 1, False)
    )


header_values = st.one_of(st.none(), st.binary(max_size=40))
headers_drawn = st.lists(st.tuples(st.text(max_size=8), header_values), max_size=6).map(tuple)


@given(headers_drawn)
def test_encoded_headers_as_base64_module_encodes_them(headers: Headers) -> None:
    """`encode_headers` (binascii, no newline) writes what it wrote with `base64.b64encode`:
    stored result headers are replayed byte for byte (G2)."""
    before = orjson.dumps(
        [[n, None if v is None else base64.b64encode(v).decode()] for n, v in headers]
    )
    assert store.encode_headers(headers) == before
    assert store.decode_headers(store.encode_headers(headers)) == headers


def test_decide_writes_out_names_and_release_as_before() -> None:
    """`decide`'s inlined check and release give what `_names` and `_decide_item` give."""
    mine = Reservation("r1", "p", "c", "i1", "s", "l", 2, "reserved")
    other_item = Reservation("r2", "p", "c", "other", "s", "l", 1, "reserved")
    other_cart = Reservation("r3", "p", "c2", "i3", "s", "l", 1, "reserved")
    theirs = Reservation("r4", "q", "c", "i4", "s", "l", 1, "reserved")
    settled = Reservation("r5", "p", "c", "i5", "s", "l", 1, "expired")
    found = {r.reservation_id: r for r in (mine, other_item, other_cart, theirs, settled)}
    names = [("i1", "r1"), ("i2", "r2"), ("i3", "r3"), ("i4", "r4"), ("i5", "r5"), ("i1", "r1")]
    record = RawRecord("in", 0, 1, b"k", b"{}")
    items = tuple(Item(*n) for n in names)
    command = ReleaseCommand(record, "e", "c", items, "s", "t", b"")
    status: dict[str, str] = {}
    decided = decide(command, "p", found, [], {"r9"}, status)
    expected_status: dict[str, str] = {}
    expected = []
    for cart_item_id, rid in names:
        row = found[rid]
        if _names(row, "p", "c", cart_item_id):
            expected.append(_decide_item(row, expected_status))
        else:
            foreign = row.partner_id != "p"
            expected.append(ItemDecision(cart_item_id, rid, Outcome.NOT_FOUND, 0, foreign))
    assert decided == expected
    assert status == expected_status == {"r1": "released"}
    assert [type(d) for d in decided] == [ItemDecision] * len(names)
    assert [d.outcome for d in decided] == [
        Outcome.RELEASED,
        Outcome.NOT_FOUND,
        Outcome.NOT_FOUND,
        Outcome.NOT_FOUND,
        Outcome.EXPIRED,
        Outcome.ALREADY_RELEASED,
    ]


def _old_check_headers(record: RawRecord) -> Rejection | None:
    """`validate._check_headers` as it was, encoding every name to sum the sizes."""
    for name in LIMITED_HEADERS:
        value = record.header(name)
        if value is None or acceptable_header(value):
            continue
        if len(value) > MAX_HEADER_BYTES:
            message = f"Header {name} is {len(value)} bytes; the limit is {MAX_HEADER_BYTES}."
            return Rejection(400, "header_too_large", message, name)
        return Rejection(
            400,
            "invalid_header",
            f"Header {name} contains a control character; send printable text only.",
            name,
        )
    total = sum(len(n.encode("utf-8", "surrogatepass")) + len(v or b"") for n, v in record.headers)
    if total > MAX_HEADERS_BYTES:
        return Rejection(
            400,
            "headers_too_large",
            f"The record's headers take {total} bytes together (names and values); the limit "
            f"is {MAX_HEADERS_BYTES}.",
            total,
        )
    return None


# Names of 1-4 UTF-8 bytes a character (lone surrogates too), values up to past the limit
# in few headers, so that totals fall on both sides of MAX_HEADERS_BYTES.
header_names = st.one_of(
    st.sampled_from([*LIMITED_HEADERS, "rokt-api-key", "content-type"]),
    st.text(max_size=12),
    st.text(alphabet="é€😀\ud800", min_size=500, max_size=1500),
)
header_bytes = st.one_of(
    st.none(),
    st.binary(max_size=20),
    st.integers(0, 9000).map(lambda n: b"v" * n),
    st.sampled_from([b"a\nb", b"x" * 1024, b"x" * 1025]),
)


@given(
    st.lists(st.tuples(header_names, header_bytes), max_size=5).map(tuple),
    st.integers(0, 6000),
)
@example(((("x" * 4093), b""),), 0)
@example(((("😀" * 1024), b""),), 0)
@example(((("😀" * 1025), b""),), 0)
def test_headers_checked_as_before(headers: Headers, value_size: int) -> None:
    """The headers' total is skipped only when it cannot pass the limit: every record gets
    the same answer as with the total always computed, rejections and their texts included."""
    record = RawRecord("in", 0, 1, b"key", b"v" * value_size, headers)
    assert validate._check_headers(record) == _old_check_headers(record)


@pytest.mark.parametrize(
    "raw",
    [b"application/json", b"Application/JSON", b"application/json; charset=utf-8", b"text/plain"],
)
def test_json_media_type_fast_path(raw: bytes) -> None:
    assert validate._is_json_media_type(raw) == (
        raw.split(b";")[0].strip().lower() == b"application/json"
    )


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["s1", "s2", "b", "a"]),
            st.sampled_from(["default", "east"]),
            st.integers(1, 5),
            st.sampled_from(["reserved", "reserved", "released", "expired"]),
        ),
        max_size=12,
    )
)
def test_the_plans_stock_totals_are_the_released_rows_totals(
    rows: list[tuple[str, str, int, str]],
) -> None:
    """`plan_batch` sums the released rows' stock in a loop of its own and sorts it only when
    `stock_deltas` is asked for: the same totals, and the same sorted list, as before."""
    reservations = [
        Reservation(f"r{n}", "p1", "c1", f"i{n}", sku, loc, qty, status)
        for n, (sku, loc, qty, status) in enumerate(rows)
    ]
    items = [work(0, "c1", None, "e1")]
    planned = plan_batch(items, BatchReads({}, {}, reservations, set()), TOPICS, NOW)
    released = [r for r in reservations if r.status == "reserved"]
    moved = [(r.sku, r.location_id, r.quantity) for r in released]
    assert planned.stock_totals == stock_totals(moved)
    assert planned.stock_deltas == stock_deltas(moved)
