"""The fast read of a body (`plain_request`) agrees with pydantic's `ReleaseRequest` on
every body it takes, and `parse_record` answers every record as it does without it."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from worker import validate
from worker.contract import ReleaseRequest
from worker.records import RawRecord
from worker.validate import Limits, parse_record, plain_request

LIMITS = Limits(max_record_bytes=8192, max_items=4, max_attributes=2)

# Ids near every rule: empty, at and past 128/256 characters, NUL, reserved eventIds,
# non-ASCII; and values of other types in their place.
plain = st.text(min_size=1, max_size=6)
ids = st.one_of(
    plain,
    plain,
    plain,
    st.text(max_size=6),
    st.sampled_from(["", "\x00", "a\x00b", "expiry:r1", "in/1/2", "é😀", "x" * 128, "x" * 129]),
    st.sampled_from(["x" * 256, "x" * 257]),
)
scalars = st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False) | ids
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=6)
items = st.one_of(
    st.fixed_dictionaries({"cartItemId": ids, "itemReservationId": ids}),
    st.fixed_dictionaries({"cartItemId": ids, "itemReservationId": ids}),
    st.fixed_dictionaries(
        {"cartItemId": ids, "itemReservationId": ids}, optional={"extra": values}
    ),
    st.dictionaries(st.sampled_from(["cartItemId", "itemReservationId", "x"]), values),
    values,
)
contract_keys = {
    "eventId": ids | ids | values,
    "items": st.none() | st.lists(items, max_size=5) | st.lists(items, max_size=5) | values,
    "attributes": st.none()
    | st.dictionaries(st.text(max_size=3), st.text(max_size=3) | values, max_size=3)
    | values,
    "occurredAt": st.none() | st.sampled_from(["2026-12-03T10:00:00Z", "noon"]),
}
contract_bodies = st.fixed_dictionaries({"cartId": ids | ids | values}, optional=contract_keys)
other_keys = {"cart_id": ids, "other": values}
bodies = (
    contract_bodies
    | contract_bodies
    | st.fixed_dictionaries({"cartId": ids}, optional=contract_keys | other_keys)
)
HEADERS = (("rokt-session-id", b"s"), ("rokt-tag-id", b"t"), ("rokt-api-key", b"k"))


def _slow(body: dict[str, Any]) -> validate._Request | None:
    try:
        return validate._request(ReleaseRequest.model_validate_json(orjson.dumps(body)))
    except ValueError:
        return None


@given(bodies)
@example(
    {"eventId": "e1", "cartId": "c1", "items": [{"cartItemId": "i", "itemReservationId": "r"}]}
)
def test_a_body_read_fast_is_read_alike_by_pydantic(body: dict[str, Any]) -> None:
    fast = plain_request(body)
    if fast is not None:
        assert fast == _slow(body)


@pytest.mark.parametrize(
    "body",
    [
        {"cartId": "c1"},
        {"eventId": None, "cartId": "c1", "items": None, "attributes": None, "occurredAt": None},
        {"eventId": "e", "cartId": "c", "items": [], "attributes": {"a": "b", "c": "d", "e": "f"}},
        {"cartId": "c", "items": [{"cartItemId": "i", "itemReservationId": "r"}] * 3},
    ],
)
def test_the_common_shapes_are_read_fast(body: dict[str, Any]) -> None:
    assert plain_request(body) is not None
    assert plain_request(body) == _slow(body)


@given(bodies)
def test_parse_record_answers_as_it_does_without_the_fast_read(body: dict[str, Any]) -> None:
    record = RawRecord("in", 0, 1, b"k", orjson.dumps(body), HEADERS)
    fast = parse_record(record, LIMITS)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(validate, "plain_request", lambda _: None)
        slow = parse_record(record, LIMITS)
    assert fast == slow
