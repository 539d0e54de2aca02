"""Parse and validate one consumed record, without any I/O.

A record is checked in this order; the first failure is the rejection:
1. framing: value present, within the size limit, `content-type`, UTF-8 JSON object (400;
   these are dead-lettered too, since the body could not be read);
2. body schema and types (400);
3. required headers `rokt-session-id`, `rokt-tag-id` (400);
4. item rules: empty list, attributes (400), too many items, duplicates (422).
Credentials (401/403) are checked afterwards by `auth.py`, which needs the database.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from worker.contract import (
    API_KEY_HEADER,
    CONTENT_TYPE_HEADER,
    SESSION_HEADER,
    TAG_HEADER,
    ReleaseItem,
    ReleaseRequest,
)
from worker.records import RawRecord

MAX_ECHO_CHARS = 200


@dataclass(frozen=True, slots=True)
class Limits:
    max_record_bytes: int = 1_048_576
    max_items: int = 100
    max_attributes: int = 50


@dataclass(frozen=True, slots=True)
class Rejection:
    """An `event_rejected` to publish; `dead_letter` also sends the record to the DLQ."""

    status: int
    code: str
    message: str
    value: Any = None
    event_id: str = ""
    cart_id: str | None = None
    dead_letter: bool = False
    attempts: int = 1

    @property
    def description(self) -> str:
        return DESCRIPTIONS[self.status]


DESCRIPTIONS = {
    400: "Bad request: the record could not be read or does not follow the schema.",
    401: "Unauthorized: rokt-api-key is missing, empty or unknown.",
    403: "Forbidden: the partner may not release with this key or tag.",
    422: "Unprocessable entity: the request is well-formed but cannot be applied.",
    500: "Internal error: the record failed repeatedly and was dead-lettered.",
    504: "Gateway timeout: the database timed out repeatedly and the record was dead-lettered.",
}


@dataclass(frozen=True, slots=True)
class ReleaseCommand:
    """A valid release request, with the headers the worker needs."""

    record: RawRecord
    event_id: str
    cart_id: str
    items: tuple[ReleaseItem, ...] | None  # None: release the whole cart
    session_id: str
    tag_id: str
    api_key: str = field(repr=False)

    @property
    def whole_cart(self) -> bool:
        return self.items is None


def parse_record(record: RawRecord, limits: Limits) -> ReleaseCommand | Rejection:
    """Turn a record into a command or exactly one rejection. Never raises."""
    framing = _check_framing(record, limits)
    if framing is not None:
        return framing
    assert record.value is not None
    try:
        request = ReleaseRequest.model_validate_json(record.value)
    except ValidationError as error:
        return _schema_rejection(record, error)

    event_id = request.event_id or record.position
    session_id = _text_header(record, SESSION_HEADER)
    tag_id = _text_header(record, TAG_HEADER)
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
        return _with_identity(item_rule, event_id, request.cart_id)
    return ReleaseCommand(
        record=record,
        event_id=event_id,
        cart_id=request.cart_id,
        items=None if request.items is None else tuple(request.items),
        session_id=session_id or "",
        tag_id=tag_id or "",
        api_key=_text_header(record, API_KEY_HEADER) or "",
    )


def _check_framing(record: RawRecord, limits: Limits) -> Rejection | None:
    def unreadable(code: str, message: str, value: Any = None) -> Rejection:
        return Rejection(400, code, message, value, record.position, None, dead_letter=True)

    value = record.value
    if value is None or not value:
        return unreadable("missing_body", "The record has no value; send a JSON object.")
    if len(value) > limits.max_record_bytes:
        return unreadable(
            "too_large",
            f"The value is {len(value)} bytes; the limit is {limits.max_record_bytes}.",
            len(value),
        )
    content_type = record.header(CONTENT_TYPE_HEADER)
    if content_type is not None and not _is_json_media_type(content_type):
        return unreadable(
            "unsupported_content_type",
            "content-type must be application/json (or be left out).",
            _echo(content_type.decode("utf-8", "replace")),
        )
    if value.lstrip()[:1] != b"{":
        try:
            value.decode("utf-8")
        except UnicodeDecodeError as error:
            return unreadable("invalid_utf8", f"The value is not UTF-8 (byte {error.start}).")
        import json  # only on this rare path, to tell a non-object from broken JSON

        try:
            json.loads(value)
        except ValueError:
            return unreadable("invalid_json", "The value is not valid JSON.")
        return unreadable("not_an_object", "The value must be a JSON object.")
    return None


def _is_json_media_type(raw: bytes) -> bool:
    media_type, _, parameters = raw.decode("latin-1").partition(";")
    if media_type.strip().lower() != "application/json":
        return False
    charset = parameters.strip().lower()
    return charset in ("", "charset=utf-8", 'charset="utf-8"')


def _text_header(record: RawRecord, name: str) -> str | None:
    raw = record.header(name)
    if raw is None:
        return None
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None


_TYPE_ERRORS = {
    "string_type",
    "list_type",
    "dict_type",
    "model_type",
    "bool_type",
    "int_type",
    "datetime_type",
    "timezone_aware",
    "datetime_from_date_parsing",
    "datetime_parsing",
}


def _schema_rejection(record: RawRecord, error: ValidationError) -> Rejection:
    first = error.errors(include_url=False, include_input=True)[0]
    kind = first["type"]
    where = ".".join(str(part) for part in first["loc"]) or "(value)"
    if kind == "json_invalid":
        if "utf-8" in str(first.get("ctx", {})).lower() or _is_not_utf8(record.value):
            return Rejection(
                400, "invalid_utf8", "The value is not UTF-8.", None, record.position, None, True
            )
        detail = str(first.get("ctx", {}).get("error", "syntax error"))
        return Rejection(
            400,
            "invalid_json",
            f"The value is not valid JSON: {_echo(detail)}.",
            None,
            record.position,
            None,
            dead_letter=True,
        )
    if kind == "model_type" and not first["loc"]:
        return Rejection(
            400,
            "not_an_object",
            "The value must be a JSON object.",
            None,
            record.position,
            None,
            dead_letter=True,
        )
    event_id, cart_id = _salvage_identity(record)
    if kind == "missing":
        code, message = "missing_field", f"{where} is required."
        value: Any = where
    elif kind in ("string_too_short", "string_too_long"):
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


def _length_rule(detail: Any) -> str:
    ctx = detail.get("ctx", {})
    if "max_length" in ctx:
        return f"at most {ctx['max_length']}"
    return f"at least {ctx.get('min_length', 1)}"


def _check_items(request: ReleaseRequest, limits: Limits) -> Rejection | None:
    if request.attributes is not None and len(request.attributes) > limits.max_attributes:
        return Rejection(
            400,
            "too_many_attributes",
            f"attributes has {len(request.attributes)} entries; the limit is "
            f"{limits.max_attributes}.",
            len(request.attributes),
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
                "Each itemReservationId may appear once per event.",
                item.item_reservation_id,
            )
        seen.add(item.item_reservation_id)
    return None


def _with_identity(rejection: Rejection, event_id: str, cart_id: str) -> Rejection:
    return Rejection(
        rejection.status,
        rejection.code,
        rejection.message,
        rejection.value,
        event_id,
        cart_id,
        rejection.dead_letter,
    )


def _salvage_identity(record: RawRecord) -> tuple[str, str | None]:
    """eventId and cartId of a body that parsed as JSON but failed the schema."""
    import json

    assert record.value is not None
    try:
        body = json.loads(record.value)
    except (ValueError, RecursionError):
        return record.position, None
    event_id = body.get("eventId") if isinstance(body, dict) else None
    cart_id = body.get("cartId") if isinstance(body, dict) else None
    if not (isinstance(event_id, str) and 0 < len(event_id) <= 128):
        event_id = record.position
    if not (isinstance(cart_id, str) and 0 < len(cart_id) <= 128):
        cart_id = None
    return event_id, cart_id


def _is_not_utf8(value: bytes | None) -> bool:
    try:
        (value or b"").decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def _echo(value: Any) -> Any:
    """A value safe to put back in a rejection: short, and only JSON scalars."""
    if isinstance(value, str):
        return value if len(value) <= MAX_ECHO_CHARS else value[:MAX_ECHO_CHARS] + "…"
    if isinstance(value, bool | int | float) or value is None:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**53:
            return str(value)[:MAX_ECHO_CHARS]
        return value
    return _echo(repr(value))
