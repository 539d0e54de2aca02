"""parse_record: each malformed input earns its documented status and code (docs/errors.md)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from worker.auth import key_digest
from worker.contract import DESCRIPTIONS, Rejection
from worker.records import RawRecord
from worker.results import Topics, rejection_messages
from worker.validate import MAX_ECHO_CHARS, Limits, ReleaseCommand, parse_record

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
LIMITS = Limits(max_record_bytes=16_384, max_items=3, max_attributes=2)
API_KEY = "rk_unit_secret_key"
HEADERS = (
    ("rokt-session-id", b"s-1"),
    ("rokt-tag-id", b"tag-1"),
    ("content-type", b"application/json"),
    ("rokt-api-key", API_KEY.encode()),
)


def parse(
    value: bytes | dict[str, Any] | None,
    headers: tuple[tuple[str, bytes | None], ...] = HEADERS,
    key: bytes | None = b"c1",
) -> ReleaseCommand | Rejection:
    raw = json.dumps(value).encode() if isinstance(value, dict) else value
    return parse_record(RawRecord("in", 2, 7, key, raw, headers), LIMITS)


def rejected(value: bytes | dict[str, Any] | None, **kwargs: Any) -> Rejection:
    result = parse(value, **kwargs)
    assert isinstance(result, Rejection), result
    return result


def without(name: str) -> tuple[tuple[str, bytes | None], ...]:
    return tuple(h for h in HEADERS if h[0] != name)


ITEM = {"cartItemId": "i1", "itemReservationId": "r1"}
BODY: dict[str, Any] = {"eventId": "e1", "cartId": "c1", "items": [ITEM]}


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (None, "missing_body"),
        (b"", "missing_body"),
        (b"{" + b" " * 20_000 + b"}", "too_large"),
        (b'{"cartId": "caf\xe9"}', "invalid_utf8"),
        (b"\xff\xfe[]", "invalid_utf8"),
        (b'{"cartId": ', "invalid_json"),
        (b'{"cartId": "c"} trailing', "invalid_json"),
        (b"[" * 2000 + b"]" * 2000, "invalid_json"),  # nesting: no RecursionError
        (b'{"a":' + b"[" * 1000 + b"]" * 1000 + b"}", "invalid_json"),
        (b"9" * 5000, "invalid_json"),  # a number beyond the parser's digit limit
        (b'{"cartId": ' + b"9" * 5000 + b"}", "invalid_json"),
        (b'\xef\xbb\xbf{"cartId": "c"}', "invalid_json"),  # byte order mark
        (b"NaN", "invalid_json"),
        (b"   ", "invalid_json"),
        (b"[1, 2]", "not_an_object"),
        (b'"text"', "not_an_object"),
        (b"null", "not_an_object"),
        (b"12", "not_an_object"),
    ],
)
def test_unreadable_bodies_are_400_dead_lettered_under_the_record_position(
    value: bytes | None, code: str
) -> None:
    rejection = rejected(value)
    assert (rejection.status, rejection.code, rejection.dead_letter) == (400, code, True)
    assert (rejection.event_id, rejection.cart_id) == ("in/2/7", None)
    assert rejection.description == DESCRIPTIONS[400]


@pytest.mark.parametrize(
    ("body", "code", "value"),
    [
        ({"eventId": "e1", "items": [ITEM]}, "missing_field", "cartId"),
        ({**BODY, "items": [{"cartItemId": "i1"}]}, "missing_field", "items.0.itemReservationId"),
        ({**BODY, "cartId": ""}, "invalid_length", ""),
        ({**BODY, "cartId": "c" * 129}, "invalid_length", "c" * 129),
        ({**BODY, "items": [{**ITEM, "itemReservationId": "r" * 257}]}, "invalid_length", None),
        ({**BODY, "cartId": 42}, "invalid_type", 42),
        ({**BODY, "cartId": None}, "invalid_type", None),
        ({**BODY, "cartId": 10**30}, "invalid_type", str(10**30)),  # beyond 2**53: as text
        ({**BODY, "cartId": 1.5}, "invalid_type", 1.5),
        ({**BODY, "cartId": {"nested": "object"}}, "invalid_type", "object"),
        ({**BODY, "items": {"not": "a list"}}, "invalid_type", "object"),
        ({**BODY, "items": [None]}, "invalid_type", None),
        ({**BODY, "attributes": {"a": None}}, "invalid_type", None),
        ({**BODY, "attributes": ["a"]}, "invalid_type", "array"),
        ({**BODY, "occurredAt": "yesterday"}, "invalid_value", "yesterday"),
        ({**BODY, "occurredAt": "2026-11-27T10:00:00"}, "invalid_value", "2026-11-27T10:00:00"),
        ({**BODY, "occurredAt": 17}, "invalid_type", 17),
    ],
)
def test_schema_violations_are_400_with_the_field_and_the_offending_value(
    body: dict[str, Any], code: str, value: Any
) -> None:
    rejection = rejected(body)
    assert (rejection.status, rejection.code, rejection.dead_letter) == (400, code, False)
    if value is not None or code != "invalid_length":
        echoed = value if not isinstance(value, str) else value[:MAX_ECHO_CHARS]
        assert str(rejection.value).rstrip("…") == str(echoed)
    assert rejection.event_id == "e1"  # salvaged from the body, so the partner can match it
    assert rejection.cart_id == (body["cartId"] if body.get("cartId") in ("c1",) else None)


def test_a_missing_field_names_where_it_is_missing() -> None:
    rejection = rejected({"eventId": "e1", "items": [ITEM]})
    assert rejection.message == "cartId is required."


def test_echoed_values_are_short() -> None:
    rejection = rejected({**BODY, "cartId": "x" * 10_000})
    assert isinstance(rejection.value, str)
    assert len(rejection.value) == MAX_ECHO_CHARS + 1


def test_an_eventid_that_breaks_the_schema_falls_back_to_the_record_position() -> None:
    rejection = rejected({**BODY, "eventId": "e" * 129})
    assert (rejection.code, rejection.event_id, rejection.cart_id) == (
        "invalid_length",
        "in/2/7",
        "c1",
    )


@pytest.mark.parametrize(
    ("headers", "value"),
    [
        (without("rokt-session-id"), "rokt-session-id"),
        (without("rokt-tag-id"), "rokt-tag-id"),
        ((*without("rokt-tag-id"), ("rokt-tag-id", b"  ")), "rokt-tag-id"),
        ((*without("rokt-tag-id"), ("rokt-tag-id", None)), "rokt-tag-id"),
        ((*without("rokt-session-id"), ("rokt-session-id", b"\xff")), "rokt-session-id"),
    ],
)
def test_a_missing_blank_or_binary_required_header_is_400_missing_header(
    headers: tuple[tuple[str, bytes | None], ...], value: str
) -> None:
    rejection = rejected(BODY, headers=headers)
    assert (rejection.status, rejection.code, rejection.value) == (400, "missing_header", value)
    assert (rejection.event_id, rejection.cart_id, rejection.dead_letter) == ("e1", "c1", False)


@pytest.mark.parametrize(
    "content_type",
    [b"text/plain", b"application/xml", b"application/json; charset=latin-1", b"\xff"],
)
def test_a_content_type_other_than_json_is_400(content_type: bytes) -> None:
    headers = (*without("content-type"), ("content-type", content_type))
    rejection = rejected(BODY, headers=headers)
    assert (rejection.code, rejection.dead_letter) == ("unsupported_content_type", True)


@pytest.mark.parametrize(
    "content_type",
    [b"application/json", b"Application/JSON", b"application/json; charset=UTF-8", b""],
)
def test_json_content_types_or_none_are_accepted(content_type: bytes) -> None:
    headers = without("content-type")
    if content_type:
        headers = (*headers, ("Content-Type", content_type))
    assert isinstance(parse(BODY, headers=headers), ReleaseCommand)


@pytest.mark.parametrize(
    ("body", "status", "code", "value"),
    [
        ({**BODY, "items": []}, 400, "empty_items", []),
        ({**BODY, "attributes": {"a": "1", "b": "2", "c": "3"}}, 400, "too_many_attributes", 3),
        (
            {
                **BODY,
                "items": [{"cartItemId": f"i{n}", "itemReservationId": f"r{n}"} for n in range(4)],
            },
            422,
            "too_many_items",
            4,
        ),
        ({**BODY, "items": [ITEM, {**ITEM, "cartItemId": "i2"}]}, 422, "duplicate_item", "r1"),
    ],
)
def test_item_rules(body: dict[str, Any], status: int, code: str, value: Any) -> None:
    rejection = rejected(body)
    assert (rejection.status, rejection.code, rejection.value) == (status, code, value)
    assert (rejection.event_id, rejection.cart_id, rejection.dead_letter) == ("e1", "c1", False)


def test_a_valid_record_becomes_a_command_that_keeps_only_the_key_digest() -> None:
    command = parse({**BODY, "attributes": {"a": "1"}, "unknown": [1, 2]})
    assert isinstance(command, ReleaseCommand)
    assert (command.event_id, command.cart_id, command.session_id, command.tag_id) == (
        "e1",
        "c1",
        "s-1",
        "tag-1",
    )
    assert command.api_key_sha256 == key_digest(API_KEY)
    assert API_KEY not in repr(command)
    assert not any(API_KEY in str(v) for v in vars_of(command))


def vars_of(command: ReleaseCommand) -> list[Any]:
    return [getattr(command, name) for name in command._fields]


@pytest.mark.parametrize("key", [None, b"", b"\xff\xfe", b"other-cart"])
def test_the_kafka_key_is_not_validated_the_body_cartid_is_authoritative(
    key: bytes | None,
) -> None:
    command = parse(BODY, key=key)
    assert isinstance(command, ReleaseCommand)
    assert command.cart_id == "c1"


def test_null_items_mean_the_whole_cart() -> None:
    command = parse({"cartId": "c1", "items": None, "eventId": None})
    assert isinstance(command, ReleaseCommand)
    assert command.whole_cart
    assert command.event_id == "in/2/7"  # no eventId: the record position is its identity


@pytest.mark.parametrize(
    ("raw", "digest"),
    [
        (None, b""),
        (b"", b""),
        (b"   ", b""),
        (b" " + API_KEY.encode() + b" ", key_digest(API_KEY)),
        (b"\xff\xfe", key_digest(b"\xff\xfe")),  # not UTF-8: hashed as sent, matches nobody
    ],
)
def test_the_api_key_header_becomes_its_digest(raw: bytes | None, digest: bytes) -> None:
    headers = without("rokt-api-key") + ((("rokt-api-key", raw),) if raw is not None else ())
    command = parse(BODY, headers=headers)
    assert isinstance(command, ReleaseCommand)
    assert command.api_key_sha256 == digest


def test_header_names_match_case_insensitively() -> None:
    headers = tuple((name.upper(), value) for name, value in HEADERS)
    command = parse(BODY, headers=headers)
    assert isinstance(command, ReleaseCommand)
    assert command.api_key_sha256 == key_digest(API_KEY)


@pytest.mark.parametrize(
    "value",
    [
        b'{"cartId": "c1", "x": NaN}',
        b'{"cartId": "c1", "x": [Infinity]}',
        b'{"cartId": "c1", "x": {"y": -Infinity}}',
        b'{"cartId": "c1", "x": 1e400}',  # beyond a double: Infinity by another name
        # A repeated key used to resolve to the last one: here, a whole-cart release.
        b'{"cartId": "c1", "items": [{"cartItemId": "i1", "itemReservationId": "r1"}], '
        b'"items": null}',
        b'{"cartId": "c1", "cartId": "c2"}',
        b'{"cartId": "c1", "items": [{"cartItemId": "i1", "itemReservationId": "r1", '
        b'"itemReservationId": "r2"}]}',
        b'{"cartId": "c1", "x": {"y": {"z": 1, "z": 1}}}',
        b'{"cartId": "c1", "cart\\u0049d": "c2"}',  # the same name, spelled with an escape
        b'{"cartId": "c1", "a\\u003ab": 1, "x": 1, "x": 2}',  # an escaped colon hides nothing
        b'{\n  "cartId": "c1",\n  "x": "1:2",\n  "x": "3"\n}',
    ],
)
def test_non_finite_numbers_and_repeated_keys_are_400_invalid_json(value: bytes) -> None:
    rejection = rejected(value)
    assert (rejection.status, rejection.code, rejection.dead_letter) == (400, "invalid_json", True)
    assert (rejection.event_id, rejection.cart_id) == ("in/2/7", None)


def test_a_repeated_key_is_named_in_the_message() -> None:
    rejection = rejected(b'{"cartId": "c1", "items": [], "items": null}')
    assert "'items'" in rejection.message


@pytest.mark.parametrize(
    "value",
    [
        # The same names in different objects are not repeats.
        b'{"cartId": "c1", "items": [{"cartItemId": "i1", "itemReservationId": "r1"}, '
        b'{"cartItemId": "i2", "itemReservationId": "r2"}]}',
        b'{"cartId": "c1", "attributes": {"k": "a:b", "\\u003a": "\\u003A"}, "x": {"k:": ":"}}',
        b'{ "cartId" : "c\\u00e9" , "n" : 1.5e3, "big": 100000000000000000000000000000 }',
        b'{"cartId": "c1", "x": {"cartId": {"cartId": null}}}',
    ],
)
def test_strict_json_accepts_what_json_allows(value: bytes) -> None:
    assert isinstance(parse(value), ReleaseCommand)


@pytest.mark.parametrize(
    ("body", "code", "value"),
    [
        ({"cart_id": "c1"}, "missing_field", "cartId"),
        (
            {"cartId": "c1", "items": [{"cart_item_id": "i1", "item_reservation_id": "r1"}]},
            "missing_field",
            "items.0.cartItemId",
        ),
    ],
)
def test_snake_case_field_names_are_not_aliases(
    body: dict[str, Any], code: str, value: str
) -> None:
    rejection = rejected(body)
    assert (rejection.status, rejection.code, rejection.value) == (400, code, value)


def test_a_snake_case_eventid_is_an_unknown_field() -> None:
    command = parse({"cartId": "c1", "event_id": "e1"})
    assert isinstance(command, ReleaseCommand)
    assert command.event_id == "in/2/7"


def header_bytes(headers: tuple[tuple[str, bytes | None], ...]) -> int:
    """All headers of a record together: names and values."""
    return sum(len(name.encode()) + len(value or b"") for name, value in headers)


PADDED = (*HEADERS, ("x-padding", b"p" * (16_385 - header_bytes(HEADERS) - 9)))


def with_header(name: str, value: bytes) -> tuple[tuple[str, bytes | None], ...]:
    return (*without(name), (name, value))


@pytest.mark.parametrize(
    ("headers", "code", "value"),
    [
        (with_header("rokt-session-id", b"s" * 1025), "header_too_large", "rokt-session-id"),
        (with_header("rokt-tag-id", b"t" * 1025), "header_too_large", "rokt-tag-id"),
        (with_header("accept-language", b"e" * 1025), "header_too_large", "accept-language"),
        (
            with_header("rokt-session-id", b"s-1\r\nx-injected: 1"),
            "invalid_header",
            "rokt-session-id",
        ),
        (with_header("rokt-tag-id", b"tag\x00"), "invalid_header", "rokt-tag-id"),
        (with_header("Accept-Language", b"en\x7f"), "invalid_header", "accept-language"),
        (PADDED, "headers_too_large", header_bytes(PADDED)),
    ],
)
def test_oversized_or_control_character_headers_are_400(
    headers: tuple[tuple[str, bytes | None], ...], code: str, value: Any
) -> None:
    rejection = rejected(BODY, headers=headers)
    assert (rejection.status, rejection.code, rejection.value) == (400, code, value)
    assert (rejection.event_id, rejection.cart_id, rejection.dead_letter) == ("e1", "c1", False)


def test_headers_at_their_limits_are_accepted() -> None:
    headers = (
        ("rokt-session-id", b"s\t" * 512),  # a tab is not a control character in HTTP
        ("rokt-tag-id", b"t" * 1024),
        ("accept-language", "é".encode() * 512),
        ("content-type", b"application/json"),
        ("rokt-api-key", API_KEY.encode()),
    )
    padded = (*headers, ("x-padding", b"p" * (16_384 - header_bytes(headers) - 9)))
    assert header_bytes(padded) == 16_384
    assert isinstance(parse(BODY, headers=padded), ReleaseCommand)


def test_a_64_kib_session_header_is_refused_and_not_copied_into_the_rejection() -> None:
    # Finding 4: it used to be copied onto each of the record's item results.
    items = [{"cartItemId": f"i{n}", "itemReservationId": f"r{n}"} for n in range(100)]
    record = RawRecord(
        "in",
        2,
        7,
        b"c1",
        json.dumps({**BODY, "items": items}).encode(),
        with_header("rokt-session-id", b"s" * 65_536),
    )
    rejection = parse_record(record, Limits())
    assert isinstance(rejection, Rejection)
    assert rejection.code == "header_too_large"
    (result,) = rejection_messages(record, rejection, Topics("results", "dlq"), NOW)
    assert dict(result.headers) == {"event-id": b"e1", "rokt-tag-id": b"tag-1"}


@pytest.mark.parametrize("event_id", ["expiry:r1", "expiry:", "cart.abandoned/0/12", "in/2/7"])
def test_reserved_event_ids_are_400_invalid_value(event_id: str) -> None:
    rejection = rejected({**BODY, "eventId": event_id})
    assert (rejection.status, rejection.code, rejection.value) == (400, "invalid_value", event_id)
    # The rejection does not answer under the reserved identity either.
    assert (rejection.event_id, rejection.cart_id) == ("in/2/7", "c1")


@pytest.mark.parametrize("event_id", ["expiry-r1", "Expiry", "order/12", "in/2/x", "a b/1/2"])
def test_event_ids_that_only_resemble_reserved_ones_are_accepted(event_id: str) -> None:
    command = parse({**BODY, "eventId": event_id})
    assert isinstance(command, ReleaseCommand)
    assert command.event_id == event_id
