"""Fuzzing the parse-and-validate path: whatever arrives, exactly one outcome, nothing raises.

Arbitrary bytes, arbitrary headers (null values, odd casing, duplicates) and arbitrary
JSON values in and around the contract's fields go through `parse_record`, then through
the rendering the worker does next (rejection, dead letter, outbox header encoding).
Every code that comes out must be one docs/errors.md documents, and the API key must
never come out at all.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.contract import Outcome, Trigger
from worker.messages import Topics, item_result_payload, rejection_messages
from worker.records import RawRecord
from worker.store import decode_headers, encode_headers
from worker.validate import DESCRIPTIONS, Limits, Rejection, ReleaseCommand, parse_record

LIMITS = Limits(max_record_bytes=4096, max_items=5, max_attributes=3)
TOPICS = Topics("results", "dlq")
NOW = datetime(2026, 11, 27, 15, 0, tzinfo=UTC)
# Not drawn by hypothesis: a random body cannot contain it by chance, so finding it in an
# output can only mean the worker copied the header there.
API_KEY = f"rk_fuzz_{uuid.uuid4().hex}"
# Modest by default so the unit suite stays fast; FUZZ_EXAMPLES=5000 for a deeper run.
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

DOCUMENTED_CODES = set(
    re.findall(
        r"^\| \d{3} \| `([a-z0-9_]+)`",
        (Path(__file__).parents[2] / "docs" / "errors.md").read_text(),
        re.M,
    )
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats()
    | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
texts = st.text(min_size=1, max_size=20)
items = st.lists(
    st.fixed_dictionaries(
        {},
        optional={"cartItemId": texts | json_values, "itemReservationId": texts | json_values},
    )
    | json_values,
    max_size=7,
)
bodies = st.fixed_dictionaries(
    {},
    optional={
        "eventId": texts | json_values,
        "cartId": texts | json_values,
        "items": items | json_values,
        "attributes": st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=5)
        | json_values,
        "occurredAt": st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat())
        | json_values,
    },
).map(lambda body: json.dumps(body).encode())
values = (
    st.none() | st.binary(max_size=256) | bodies | json_values.map(lambda v: json.dumps(v).encode())
)
header_names = st.sampled_from(
    ["rokt-session-id", "ROKT-TAG-ID", "rokt-tag-id", "content-type", "Content-Type", "x-other"]
) | st.text(max_size=12)
header_values = (
    st.none()
    | st.binary(max_size=24)
    | st.sampled_from(
        [b"s-1", b"tag-1", b"application/json", b"application/json; charset=utf-8", b" ", b""]
    )
)
headers = st.lists(st.tuples(header_names, header_values), max_size=6)
keys = st.none() | st.binary(max_size=16)


def record(
    key: bytes | None, value: bytes | None, extra: list[tuple[str, bytes | None]]
) -> RawRecord:
    return RawRecord("in", 1, 42, key, value, (*extra, ("rokt-api-key", API_KEY.encode())))


def check_outcome(rec: RawRecord) -> None:
    outcome = parse_record(rec, LIMITS)
    assert isinstance(outcome, ReleaseCommand | Rejection)
    if isinstance(outcome, Rejection):
        check_rejection(rec, outcome)
    else:
        check_command(outcome)


def check_rejection(rec: RawRecord, rejection: Rejection) -> None:
    assert rejection.status in DESCRIPTIONS
    assert rejection.code in DOCUMENTED_CODES, rejection.code
    assert rejection.message
    assert rejection.event_id
    messages = rejection_messages(rec, rejection, TOPICS, NOW)
    assert len(messages) == (2 if rejection.dead_letter else 1)
    body = orjson.loads(messages[0].payload or b"")
    assert (body["status"], body["errors"][0]["code"]) == (rejection.status, rejection.code)
    for message in messages:
        rendered = (message.payload or b"") + encode_headers(message.headers)
        if message.topic == TOPICS.results:
            assert API_KEY.encode() not in rendered
        assert all(name.lower() != "rokt-api-key" for name, _ in message.headers)
        assert decode_headers(encode_headers(message.headers)) == message.headers
    if rejection.dead_letter:
        letter = messages[1]
        assert (letter.key, letter.payload) == (rec.key, rec.value)


def check_command(command: ReleaseCommand) -> None:
    assert command.session_id
    assert command.tag_id
    assert len(command.items or ()) <= LIMITS.max_items
    for item in command.items or ():
        payload = item_result_payload(
            event_id=command.event_id,
            trigger=Trigger.RELEASE_REQUEST,
            cart_id=command.cart_id,
            cart_item_id=item.cart_item_id,
            reservation_id=item.item_reservation_id,
            outcome=Outcome.NOT_FOUND,
            quantity=0,
            processed_at=NOW,
        )
        assert orjson.loads(payload)["cartId"] == command.cart_id


@FUZZ
@given(key=keys, value=st.none() | st.binary(max_size=512), extra=headers)
def test_arbitrary_bytes_yield_exactly_one_outcome(
    key: bytes | None, value: bytes | None, extra: list[tuple[str, bytes | None]]
) -> None:
    check_outcome(record(key, value, extra))


@FUZZ
@given(key=keys, value=values, extra=headers)
def test_arbitrary_json_in_and_around_the_contract_yields_exactly_one_outcome(
    key: bytes | None, value: bytes | None, extra: list[tuple[str, bytes | None]]
) -> None:
    check_outcome(record(key, value, extra))


@FUZZ
@given(body=bodies, extra=headers)
def test_arbitrary_bodies_with_the_required_headers_yield_exactly_one_outcome(
    body: bytes, extra: list[tuple[str, bytes | None]]
) -> None:
    required = [("rokt-session-id", b"s-1"), ("rokt-tag-id", b"tag-1")]
    check_outcome(record(b"k", body, [*required, *extra]))


@FUZZ
@given(depth=st.integers(min_value=1, max_value=3000), opener=st.sampled_from([b"[", b'{"a":']))
def test_any_nesting_depth_is_answered_without_recursion_errors(depth: int, opener: bytes) -> None:
    closer = b"]" if opener == b"[" else b"}"
    value = opener * depth + b"1" + closer * depth
    rec = record(b"k", value, [("rokt-session-id", b"s"), ("rokt-tag-id", b"t")])
    outcome = parse_record(rec, Limits(max_record_bytes=1_048_576))
    assert isinstance(outcome, Rejection)
    assert outcome.code in ("invalid_json", "not_an_object", "missing_field")


def test_the_documented_codes_were_found() -> None:
    assert {"invalid_json", "unknown_api_key", "database_timeout"} <= DOCUMENTED_CODES
