"""Record validation: one consumed record to a `ReleaseCommand` or a `Rejection`, no I/O.

A record is checked in this order; the first failure is the rejection:
1. framing: value present, within the size limit, `content-type`, UTF-8 JSON object, strict
   JSON: no NaN or Infinity, no key repeated in an object (400; these are dead-lettered too,
   since the body could not be read, or not unambiguously);
2. body schema and types, reserved eventIds (400);
3. headers: all together within 16 KiB, `rokt-session-id`, `rokt-tag-id`, `accept-language`
   each within 1 KiB and free of control characters, the first two present (400);
4. item rules: attributes, empty list (400), too many items, duplicates (422).
Credentials (401/403) are checked afterwards by `auth.py`, which needs the database.

`parse_record` never raises: whatever the bytes, a record yields exactly one command
or one rejection (the fuzz tests hold it to that). Every code is listed in docs/errors.md.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, TypeGuard

import orjson
from pydantic import ValidationError
from pydantic_core import ErrorDetails, from_json

from worker.auth import key_digest
from worker.contract import (
    API_KEY_HEADER,
    CONTENT_TYPE_HEADER,
    LIMITED_HEADERS,
    MAX_HEADER_BYTES,
    MAX_HEADERS_BYTES,
    SESSION_HEADER,
    TAG_HEADER,
    Rejection,
    ReleaseRequest,
    is_reserved_event_id,
)
from worker.records import RawRecord

MAX_ECHO_CHARS = 200
_UTF8_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class Limits:
    max_record_bytes: int = 1_048_576
    max_items: int = 100
    max_attributes: int = 50


# Makes a named tuple from all its fields without its Python-level __new__ (a frame per
# call), where one is made per record or item: `_new(Cls, (every field, in order))`.
_new = tuple.__new__


class Item(NamedTuple):
    """One item of a command (`contract.ReleaseItem` as read): a tuple, one is made per item."""

    cart_item_id: str
    item_reservation_id: str


class _Request(NamedTuple):
    """What the checks after the schema need of a body `ReleaseRequest` accepts."""

    event_id: str | None
    cart_id: str
    items: tuple[Item, ...] | None
    attributes: int | None  # how many entries, None: absent


class ReleaseCommand(NamedTuple):
    """A valid release request, with the headers the worker needs (a named tuple: one is
    made per record).

    The API key itself is not kept: only its sha256 (empty when the header is missing or
    blank, and left out of the repr), so no repr, log line or trace of a command can carry
    the secret.
    """

    record: RawRecord
    event_id: str
    cart_id: str
    items: tuple[Item, ...] | None  # None: release the whole cart
    session_id: str
    tag_id: str
    api_key_sha256: bytes = b""

    @property
    def whole_cart(self) -> bool:
        return self.items is None

    def __repr__(self) -> str:
        return (
            f"ReleaseCommand(record={self.record!r}, event_id={self.event_id!r}, "
            f"cart_id={self.cart_id!r}, items={self.items!r}, session_id={self.session_id!r}, "
            f"tag_id={self.tag_id!r})"
        )


def parse_record(record: RawRecord, limits: Limits) -> ReleaseCommand | Rejection:
    """Turn a record into a command or exactly one rejection. Never raises."""
    body = _check_framing(record, limits)
    if isinstance(body, Rejection):
        return body
    assert record.value is not None
    request = plain_request(body)
    if request is None:  # not in the common shape: pydantic reads it, and words any error
        try:
            request = _request(ReleaseRequest.model_validate_json(record.value))
        except ValidationError as error:
            return _schema_rejection(record, error)

    event_id = request.event_id or record.position
    header_rule = _check_headers(record)
    if header_rule is not None:
        return replace(header_rule, event_id=event_id, cart_id=request.cart_id)
    named = record.named_headers()  # one call for the lookups below
    session_id = _text_header(named.get(SESSION_HEADER))
    tag_id = _text_header(named.get(TAG_HEADER))
    for name, value in ((SESSION_HEADER, session_id), (TAG_HEADER, tag_id)):
        if not value:
            return Rejection(
                400,
                "missing_header",
                f"Header {name} is required and must be non-empty UTF-8 text.",
                name,
                event_id,
                request.cart_id,
            )
    item_rule = _check_items(request, limits)
    if item_rule is not None:
        return replace(item_rule, event_id=event_id, cart_id=request.cart_id)
    # Keys are compared as the exact bytes sent (minus surrounding blanks, as HTTP does):
    # a key that is not UTF-8 simply matches no partner (401 unknown_api_key).
    api_key = (named.get(API_KEY_HEADER) or b"").strip()
    # Every field in order, by `tuple.__new__`: the named tuple's own __new__ is a Python
    # function, a frame per record (tests/unit/test_hot_paths.py holds the fields).
    return _new(
        ReleaseCommand,
        (
            record,
            event_id,
            request.cart_id,
            request.items,
            session_id or "",
            tag_id or "",
            key_digest(api_key) if api_key else b"",
        ),
    )


def _request(model: ReleaseRequest) -> _Request:
    items = model.items
    return _Request(
        model.event_id,
        model.cart_id,
        None
        if items is None
        else tuple(Item(i.cart_item_id, i.item_reservation_id) for i in items),
        None if model.attributes is None else len(model.attributes),
    )


_BODY_KEYS = frozenset({"eventId", "cartId", "items", "attributes", "occurredAt"})
_ITEM_KEYS = frozenset({"cartItemId", "itemReservationId"})


def _plain_id(value: object, longest: int) -> TypeGuard[str]:
    return type(value) is str and 0 < len(value) <= longest and "\x00" not in value


def plain_request(body: object) -> _Request | None:
    """The request of a body in the common shape, read without pydantic: no key but the
    contract's, `occurredAt` absent or null, every value of the type and length the contract
    wants. None for any other body (pydantic reads those: its error is the rejection). On
    the bodies it takes it agrees with `ReleaseRequest` (tests/unit/test_plain_request.py);
    strings only, nested three deep at most, so pydantic's parser would read it as orjson
    did (it refuses deeper nesting than orjson)."""
    if type(body) is not dict or not body.keys() <= _BODY_KEYS:
        return None
    event_id = body.get("eventId")
    if event_id is not None and (not _plain_id(event_id, 128) or is_reserved_event_id(event_id)):
        return None
    cart_id = body.get("cartId")
    if not _plain_id(cart_id, 128) or body.get("occurredAt") is not None:
        return None
    attributes = body.get("attributes")
    if attributes is not None and (
        type(attributes) is not dict or any(type(v) is not str for v in attributes.values())
    ):
        return None
    raw_items = body.get("items")
    items = None
    if raw_items is not None:
        if type(raw_items) is not list:
            return None
        items = []
        for item in raw_items:
            if type(item) is not dict or item.keys() != _ITEM_KEYS:
                return None
            cart_item_id, reservation_id = item["cartItemId"], item["itemReservationId"]
            # `_plain_id` of both, written out: two calls an item fewer.
            if not (
                type(cart_item_id) is str
                and 0 < len(cart_item_id) <= 128
                and "\x00" not in cart_item_id
                and type(reservation_id) is str
                and 0 < len(reservation_id) <= 256
                and "\x00" not in reservation_id
            ):
                return None
            items.append(_new(Item, (cart_item_id, reservation_id)))  # Item, without a frame
    return _new(
        _Request,
        (
            event_id,
            cart_id,
            None if items is None else tuple(items),
            None if attributes is None else len(attributes),
        ),
    )


def _unreadable(record: RawRecord, code: str, message: str, value: Any = None) -> Rejection:
    """A 400 for a body that could not be read: no eventId or cartId, and dead-lettered."""
    return Rejection(400, code, message, value, record.position, None, dead_letter=True)


def too_large(record: RawRecord, size: int, limits: Limits) -> Rejection:
    """The 400 of a value over the limit (also what the HTTP api answers to a larger body)."""
    return _unreadable(
        record,
        "too_large",
        f"The value is {size} bytes; the limit is {limits.max_record_bytes}. "
        "Split the release into several events.",
        size,
    )


def _check_framing(record: RawRecord, limits: Limits) -> Rejection | Any:
    """The rejection of a record that cannot be read as strict JSON, else its body as
    orjson read it."""
    if record.unreadable:
        where = (
            "this record"
            if record.next_offset == record.offset + 1
            else f"a record at offsets {record.offset}-{record.next_offset - 1} of this partition"
        )
        return _unreadable(
            record,
            "unreadable_record",
            f"The Kafka client could not decode {where} (for example a header name that is "
            "not UTF-8), so its bytes are not available; re-send it with UTF-8 header names.",
        )
    value = record.value
    if not value:
        return _unreadable(
            record, "missing_body", "The record has no value; send the request as a JSON object."
        )
    if len(value) > limits.max_record_bytes:
        return too_large(record, len(value), limits)
    content_type = record.named_headers().get(CONTENT_TYPE_HEADER)
    if content_type is not None and not _is_json_media_type(content_type):
        return _unreadable(
            record,
            "unsupported_content_type",
            "content-type must be application/json (charset utf-8 if any), or be left out.",
            _echo(content_type.decode("utf-8", "replace")),
        )
    if value.lstrip()[:1] != b"{":
        return _not_an_object(record, value)
    return _check_strict_json(record, value)


def _check_strict_json(record: RawRecord, value: bytes) -> Rejection | Any:
    """NaN, Infinity, numbers beyond a double and repeated keys are refused (DESIGN.md §7).

    pydantic's parser takes the last of repeated keys (`"items":[…],"items":null` would be a
    whole-cart release), so the body is read once more by orjson, which refuses non-finite
    numbers. A repeated key is found cheaply: every member of an object has one colon outside
    strings, so unless an escape spells a colon (`\\u003a`), the body and orjson's rendering of
    what it read have as many colons exactly when no member was dropped. Only a body that
    fails this count (or spells a colon) is read a third time, member by member.
    """
    try:
        parsed = orjson.loads(value)
        rendered = orjson.dumps(parsed)
    except orjson.JSONDecodeError as error:
        return _undecodable(record, value) or _invalid_json(record, str(error))
    except orjson.JSONEncodeError:
        return _invalid_json(record, "it is nested too deeply")
    escaped_colon = b"\\u003a" in value or b"\\u003A" in value
    if escaped_colon or value.count(b":") != rendered.count(b":"):
        repeated = _repeated_key(value)
        if repeated is not None or not escaped_colon:  # without the escape, the count is proof
            which = "a key" if repeated is None else f"the key {repeated!r}"
            return _invalid_json(record, f"{which} is repeated in one object")
    return parsed


def _repeated_key(value: bytes) -> str | None:
    """The first key found twice in one object of a body orjson accepted, if any."""
    repeated: list[str] = []

    def check(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen and not repeated:
                repeated.append(key)
            seen.add(key)
        return {}  # only the keys matter here

    try:
        json.loads(value, object_pairs_hook=check)
    except (ValueError, RecursionError):
        return None
    return repeated[0] if repeated else None


def _not_an_object(record: RawRecord, value: bytes) -> Rejection:
    """Why a value that does not start like an object was refused, as precisely as possible."""
    undecodable = _undecodable(record, value)
    if undecodable is not None:
        return undecodable
    try:
        # pydantic's parser (jiter) caps nesting depth and number size, so no input can make
        # this recurse or loop for long; NaN/Infinity are not JSON.
        parsed = from_json(value, allow_inf_nan=False)
    except ValueError as error:
        return _invalid_json(record, str(error))
    return _unreadable(
        record,
        "not_an_object",
        f"The value is a JSON {_json_type(parsed)}; it must be a JSON object {{...}}.",
        _json_type(parsed),
    )


def _undecodable(record: RawRecord, value: bytes) -> Rejection | None:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError as error:
        return _unreadable(
            record,
            "invalid_utf8",
            f"The value is not UTF-8 (invalid byte at position {error.start}); "
            "encode the JSON as UTF-8.",
            error.start,
        )
    if value.startswith(_UTF8_BOM):
        return _invalid_json(record, "the value starts with a byte order mark; send it without")
    return None


def _invalid_json(record: RawRecord, detail: str) -> Rejection:
    return _unreadable(record, "invalid_json", f"The value is not valid JSON: {_echo(detail)}.")


def _is_json_media_type(raw: bytes) -> bool:
    if raw == b"application/json":  # nearly every record's: nothing to split
        return True
    media_type, *parameters = raw.decode("latin-1").split(";")
    if media_type.strip().lower() != "application/json":
        return False
    for parameter in parameters:
        name, _, value = parameter.strip().partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() != "utf-8":
            return False
    return True


# Control characters are refused in the limited headers as HTTP refuses them in field values
# (a tab is allowed): a CR/LF copied into a result could forge a line in a consumer's log.
_CONTROL_CHARACTER = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def acceptable_header(value: bytes) -> bool:
    """Whether a limited header's value is within its size and free of control characters."""
    return len(value) <= MAX_HEADER_BYTES and _CONTROL_CHARACTER.search(value) is None


def _check_headers(record: RawRecord) -> Rejection | None:
    named = record.named_headers()
    for name in LIMITED_HEADERS:  # the precise complaint first
        value = named.get(name)
        # `acceptable_header`, written out (a call fewer per header present)
        if value is None or (
            len(value) <= MAX_HEADER_BYTES and _CONTROL_CHARACTER.search(value) is None
        ):
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
    # A name's UTF-8 takes at most 4 bytes a character, and `record.size` counts the names'
    # characters and the values' bytes (and the key and value): under the limit at 4 bytes a
    # character, the headers are under it whatever they hold, so they need not be encoded.
    if 4 * record.size <= MAX_HEADERS_BYTES:
        return None
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


def _text_header(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None


# pydantic error types that mean "this JSON value has the wrong type"; a value of the right
# type that is still unacceptable (a malformed or zoneless timestamp) is `invalid_value`.
_TYPE_ERRORS = frozenset(
    {"string_type", "list_type", "dict_type", "model_type", "model_attributes_type"}
)
_LENGTH_ERRORS = frozenset({"string_too_short", "string_too_long"})


def _schema_rejection(record: RawRecord, error: ValidationError) -> Rejection:
    first = error.errors(include_url=False, include_input=True)[0]
    kind = first["type"]
    assert record.value is not None
    if kind == "json_invalid":
        detail = str(first.get("ctx", {}).get("error", "syntax error"))
        return _undecodable(record, record.value) or _invalid_json(record, detail)
    if not first["loc"]:
        return _not_an_object(record, record.value)
    event_id, cart_id = _salvage_identity(record)
    where = ".".join(str(part) for part in first["loc"])
    if kind == "missing":
        code, message = "missing_field", f"{where} is required."
        value: Any = where
    elif kind in _LENGTH_ERRORS:
        code = "invalid_length"
        message = f"{where} must be {_length_rule(first)} characters long."
        value = _echo(first.get("input"))
    elif kind in _TYPE_ERRORS or kind.endswith("_type"):
        code, message = "invalid_type", f"{where}: {first['msg']}."
        value = _echo(first.get("input"))
    else:
        code, message = "invalid_value", f"{where}: {first['msg']}."
        value = _echo(first.get("input"))
    return Rejection(400, code, message, value, event_id, cart_id)


def _length_rule(detail: ErrorDetails) -> str:
    ctx = detail.get("ctx", {})
    if "max_length" in ctx:
        return f"at most {ctx['max_length']}"
    return f"at least {ctx.get('min_length', 1)}"


def _check_items(request: _Request, limits: Limits) -> Rejection | None:
    if request.attributes is not None and request.attributes > limits.max_attributes:
        return Rejection(
            400,
            "too_many_attributes",
            f"attributes has {request.attributes} entries; the limit is {limits.max_attributes}.",
            request.attributes,
        )
    items = request.items
    if items is None:
        return None
    if not items:
        return Rejection(
            400,
            "empty_items",
            "items must list at least one item; leave it out to release the whole cart.",
            [],
        )
    if len(items) > limits.max_items:
        return Rejection(
            422,
            "too_many_items",
            f"items has {len(items)} entries; the limit is {limits.max_items}. "
            "Split the release into several events.",
            len(items),
        )
    seen: set[str] = set()
    for item in items:
        if item.item_reservation_id in seen:
            return Rejection(
                422,
                "duplicate_item",
                "Each itemReservationId may appear once per event; remove the repeat.",
                _echo(item.item_reservation_id),
            )
        seen.add(item.item_reservation_id)
    return None


def _salvage_identity(record: RawRecord) -> tuple[str, str | None]:
    """eventId and cartId of a body that parsed as JSON but failed the schema."""
    assert record.value is not None
    try:
        body = from_json(record.value)
    except ValueError:
        return record.position, None
    event_id = body.get("eventId") if isinstance(body, dict) else None
    cart_id = body.get("cartId") if isinstance(body, dict) else None
    if not (isinstance(event_id, str) and 0 < len(event_id) <= 128) or is_reserved_event_id(
        event_id
    ):
        event_id = record.position
    if not (isinstance(cart_id, str) and 0 < len(cart_id) <= 128):
        cart_id = None
    return event_id, cart_id


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _echo(value: Any) -> Any:
    """A value safe to put back in a rejection: a short string, a JSON-safe number, or for
    a container only its JSON type (its content could be large or carry anything)."""
    if isinstance(value, str):
        return value if len(value) <= MAX_ECHO_CHARS else value[:MAX_ECHO_CHARS] + "…"
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        # Beyond 2**53 a JSON reader may round it: echo the digits instead.
        return value if abs(value) <= 2**53 else _echo(_int_text(value))
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    return _json_type(value)


def _int_text(value: int) -> str:
    try:
        return str(value)
    except ValueError:  # beyond Python's int-to-str digit limit
        return "a number too large to echo"
