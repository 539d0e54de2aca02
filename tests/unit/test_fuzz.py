"""Fuzzing the parse-and-validate path: whatever arrives, exactly one outcome, nothing raises.

Arbitrary bytes, arbitrary headers (null values, odd casing, duplicates) and arbitrary
JSON values in and around the contract's fields go through `parse_record`, then through
the rendering the worker does next (rejection, dead letter, outbox header encoding).
Every code that comes out must be one docs/errors.md documents, and the API key must
never come out at all.

Random bytes and JSON almost never make a valid command, so one more test starts from
valid records (with items, a share of whole-cart ones) and breaks each in one of the
ways parse_record refuses: each broken record must get exactly the code of its break,
each valid one a command equal to what was sent. An explicit example of every break runs
every time; the test prints the distribution it reached and fails below 30 % commands
with items.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from worker.auth import key_digest
from worker.contract import (
    DESCRIPTIONS,
    MAX_HEADER_BYTES,
    MAX_HEADERS_BYTES,
    Outcome,
    Rejection,
    ReleaseItem,
    Trigger,
    is_reserved_event_id,
)
from worker.records import RawRecord
from worker.results import Topics, item_result_payload, rejection_messages
from worker.store import decode_headers, encode_headers
from worker.validate import Item, Limits, ReleaseCommand, parse_record

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
        body = orjson.loads(payload)
        assert (body["eventId"], body["cartId"]) == (command.event_id, command.cart_id)
        assert (body["cartItemId"], body["itemReservationId"]) == (
            item.cart_item_id,
            item.item_reservation_id,
        )


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


# ---------------------------------------------------------------- valid records, broken once

# Any character but NUL (PostgreSQL text cannot hold it) and lone surrogates (not UTF-8).
id_chars = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")
ids = st.text(id_chars, min_size=1, max_size=40)
header_text = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.", min_size=1, max_size=40
)
valid_items = st.lists(
    st.fixed_dictionaries({"cartItemId": ids, "itemReservationId": ids}),
    min_size=1,
    max_size=LIMITS.max_items,
    unique_by=lambda item: item["itemReservationId"],
)
valid_bodies = st.fixed_dictionaries(
    {
        "cartId": ids,
        # About one whole-cart release (no items) in 25 (hypothesis favours small integers,
        # so not `k < 40`).
        "items": st.integers(min_value=0, max_value=999).flatmap(
            lambda k: st.none() if k % 25 == 7 else valid_items
        ),
    },
    optional={
        "eventId": ids.filter(lambda e: not is_reserved_event_id(e)),
        "attributes": st.dictionaries(ids, st.text(max_size=10), max_size=LIMITS.max_attributes),
        "occurredAt": st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat()),
    },
)
valid_headers = st.fixed_dictionaries(
    {"rokt-session-id": header_text, "rokt-tag-id": header_text},
    optional={
        "content-type": st.sampled_from(["application/json", "Application/JSON; charset=UTF-8"]),
        "accept-language": st.just("en-GB"),
    },
)
Body = dict[str, Any]
Headers = dict[str, str]
Value = bytes | None


def _dumps(body: Body) -> bytes:
    return json.dumps(body).encode()


def _body(change: Callable[[Body], None]) -> Callable[[Body, Headers, int], tuple[Value, Headers]]:
    def apply(body: Body, headers: Headers, n: int) -> tuple[Value, Headers]:
        body = dict(body)
        change(body)
        return _dumps(body), headers

    return apply


def _headers(
    change: Callable[[Headers, int], None],
) -> Callable[[Body, Headers, int], tuple[Value, Headers]]:
    def apply(body: Body, headers: Headers, n: int) -> tuple[Value, Headers]:
        headers = dict(headers)
        change(headers, n)
        return _dumps(body), headers

    return apply


def _value(
    make: Callable[[bytes, int], Value],
) -> Callable[[Body, Headers, int], tuple[Value, Headers]]:
    return lambda body, headers, n: (make(_dumps(body), n), headers)


def _items(body: Body) -> list[Body]:
    return list(body.get("items") or [{"cartItemId": "i", "itemReservationId": "r"}])


# Each break of a valid record, by the code it must get. `n` varies the break.
BREAKS: dict[str, Callable[[Body, Headers, int], tuple[Value, Headers]]] = {
    "missing_body": _value(lambda v, n: None if n % 2 else b""),
    "unreadable_record": _value(lambda v, n: v),  # the record is marked unreadable below
    "too_large": _value(lambda v, n: v[:-1] + b', "pad": "' + b"x" * (4096 + n) + b'"}'),
    "unsupported_content_type": _headers(
        lambda h, n: h.update(
            {"content-type": ["text/plain", "application/json; charset=latin-1"][n % 2]}
        )
    ),
    "invalid_utf8": _value(lambda v, n: v[:-1] + b', "x": "\xff\xfe"}'),
    "invalid_json": _value(
        lambda v, n: [
            v + b" x",
            v[:-1] + b', "a": NaN}',
            v[:-1] + b', "cartId": "again"}',
            b"\xef\xbb\xbf" + v,
        ][n % 4]
    ),
    "not_an_object": _value(lambda v, n: [b"[" + v + b"]", b'"text"', b"42", b"null"][n % 4]),
    "missing_field": _body(lambda b: b.pop("cartId")),
    "invalid_length": _body(lambda b: b.update(cartId=["", "c" * 129][len(b["cartId"]) % 2])),
    "invalid_type": _body(lambda b: b.update(cartId=len(b["cartId"]))),
    "invalid_value": _body(
        lambda b: (
            b.update(occurredAt="yesterday") if "occurredAt" in b else b.update(eventId="expiry:x")
        )
    ),
    "header_too_large": _headers(
        lambda h, n: h.update({"rokt-tag-id": "t" * (MAX_HEADER_BYTES + 1 + n)})
    ),
    "invalid_header": _headers(
        lambda h, n: h.update({"rokt-session-id": ["a\nb", "a\x00", "\x7f"][n % 3]})
    ),
    "headers_too_large": _headers(
        lambda h, n: h.update(
            {f"x-pad-{k}": "p" * 1000 for k in range(MAX_HEADERS_BYTES // 1000 + 1)}
        )
    ),
    "missing_header": _headers(
        lambda h, n: h.update({"rokt-tag-id": "  "} if n % 2 else {"rokt-session-id": ""})
    ),
    "empty_items": _body(lambda b: b.update(items=[])),
    "too_many_attributes": _body(
        lambda b: b.update(attributes={f"a{k}": "v" for k in range(LIMITS.max_attributes + 1)})
    ),
    "too_many_items": _body(
        lambda b: b.update(
            items=[
                {"cartItemId": f"i{k}", "itemReservationId": f"r{k}"}
                for k in range(LIMITS.max_items + 1)
            ]
        )
    ),
    "duplicate_item": _body(
        lambda b: b.update(items=[*_items(b)[: LIMITS.max_items - 1], _items(b)[0]])
    ),
}
# What parse_record can refuse: every documented code but those decided with the database.
DATABASE_CODES = {
    "missing_api_key",
    "unknown_api_key",
    "partner_suspended",
    "tag_not_allowed",
    "cart_not_found",
    "internal_error",
    "database_timeout",
}
# About two draws in three are valid records, the others one break each (drawn from a
# wide integer range: hypothesis favours the first of few choices, and small integers).
# The integers it favours most (0, and the bounds) map to a valid record: with
# `k % 3 == 0` a break, the share of commands with items fell to 0.316 in one run of
# twelve, near the floor the test asserts.
CASES = st.integers(min_value=0, max_value=1999).map(
    lambda k: list(BREAKS)[k // 3 % len(BREAKS)] if k % 3 == 1 else "valid"
)
EXAMPLE_BODY: Body = {"cartId": "c", "items": [{"cartItemId": "i", "itemReservationId": "r"}]}
EXAMPLE_HEADERS: Headers = {"rokt-session-id": "s", "rokt-tag-id": "t"}


def _every_break(test: Callable[..., None]) -> Callable[..., None]:
    for case in BREAKS:
        test = example(case=case, body=EXAMPLE_BODY, headers=EXAMPLE_HEADERS, n=0)(test)
    whole_cart = {"cartId": "c", "items": None}
    test = example(case="valid", body=whole_cart, headers=EXAMPLE_HEADERS, n=0)(test)
    return example(case="valid", body=EXAMPLE_BODY, headers=EXAMPLE_HEADERS, n=0)(test)


def test_the_breaks_cover_every_code_parse_record_can_give() -> None:
    assert set(BREAKS) == DOCUMENTED_CODES - DATABASE_CODES


def test_valid_records_give_their_command_and_each_break_exactly_its_code() -> None:
    reached: Counter[str] = Counter()

    @FUZZ
    @_every_break
    @given(
        case=CASES,
        body=valid_bodies,
        headers=valid_headers,
        n=st.integers(min_value=0, max_value=1000),
    )
    def run(case: str, body: Body, headers: Headers, n: int) -> None:
        value, sent = (_dumps(body), headers) if case == "valid" else BREAKS[case](body, headers, n)
        rec = RawRecord(
            "in",
            1,
            42,
            b"k",
            value,
            (*((k, v.encode()) for k, v in sent.items()), ("rokt-api-key", API_KEY.encode())),
            unreadable=case == "unreadable_record",
        )
        outcome = parse_record(rec, LIMITS)
        if case != "valid":
            assert isinstance(outcome, Rejection), (case, outcome)
            assert outcome.code == case, (case, outcome.code, outcome.message)
            check_rejection(rec, outcome)
            reached[case] += 1
            return
        assert isinstance(outcome, ReleaseCommand), outcome
        assert (outcome.event_id, outcome.cart_id) == (
            body.get("eventId", rec.position),
            body["cartId"],
        )
        items = body["items"]
        read = None if items is None else [ReleaseItem.model_validate(i) for i in items]
        assert outcome.items == (
            None
            if read is None
            else tuple(Item(i.cart_item_id, i.item_reservation_id) for i in read)
        )
        assert (outcome.session_id, outcome.tag_id) == (
            headers["rokt-session-id"],
            headers["rokt-tag-id"],
        )
        assert outcome.api_key_sha256 == key_digest(API_KEY)
        check_command(outcome)
        reached["command with items" if items else "whole-cart command"] += 1

    run()
    total = sum(reached.values())
    print(f"\n[fuzz] {total} records reached: {dict(reached.most_common())}")
    assert set(BREAKS) | {"whole-cart command"} <= set(reached), reached
    assert reached["command with items"] >= 0.3 * total, reached
