"""The Kafka contract (DESIGN.md §2): wire models, headers, rejections and their statuses.

Field names on the wire are camelCase; Python code uses snake_case. The JSON Schemas and
the AsyncAPI document in docs/contract/ are generated from these models
(`release-worker contract write`), and a test fails when they disagree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
)
from pydantic.alias_generators import to_camel


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 UTC with milliseconds, e.g. `2026-11-27T15:00:00.123Z`."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


Timestamp = Annotated[
    datetime,
    PlainSerializer(format_timestamp, return_type=str),
    WithJsonSchema(
        {"type": "string", "format": "date-time", "description": "RFC 3339 UTC, milliseconds."}
    ),
]


def _storable(value: str) -> str:
    # PostgreSQL text cannot hold NUL: refuse it here as a 400 rather than fail in the database.
    if "\x00" in value:
        raise ValueError("must not contain the NUL character (\\u0000)")
    return value


# Length first (so its error says "characters"), then the NUL check. The schema states the
# NUL rule as a pattern, but only the validator enforces it: its error is the worker's 400.
_NO_NUL = {"pattern": "^[^\\u0000]*$"}
Id128 = Annotated[
    str, Field(min_length=1, max_length=128, json_schema_extra=_NO_NUL), AfterValidator(_storable)
]
Id256 = Annotated[
    str, Field(min_length=1, max_length=256, json_schema_extra=_NO_NUL), AfterValidator(_storable)
]

# eventIds the worker gives itself (DESIGN.md §7): the sweeper's `expiry:<reservationId>`,
# and `<topic>/<partition>/<offset>` for a record without one. A sender may claim neither.
EXPIRY_EVENT_PREFIX = "expiry:"
_RECORD_POSITION = re.compile(r"[A-Za-z0-9._-]+/[0-9]+/[0-9]+")


def is_reserved_event_id(value: str) -> bool:
    return value.startswith(EXPIRY_EVENT_PREFIX) or _RECORD_POSITION.fullmatch(value) is not None


def _not_reserved(value: str) -> str:
    if is_reserved_event_id(value):
        raise ValueError(
            f"is reserved: it must not start with {EXPIRY_EVENT_PREFIX!r} or look like a record "
            "position <topic>/<partition>/<offset>"
        )
    return value


EventId = Annotated[
    Id128,
    AfterValidator(_not_reserved),
    Field(
        json_schema_extra={
            "not": {
                "anyOf": [
                    {"pattern": f"^{re.escape(EXPIRY_EVENT_PREFIX)}"},
                    {"pattern": f"^{_RECORD_POSITION.pattern}$"},
                ]
            }
        }
    ),
]


class _WireModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        frozen=True,
        # Every field of a result is always rendered, defaults included: the schema says so.
        json_schema_serialization_defaults_required=True,
    )


class _InputModel(_WireModel):
    # Unknown fields are ignored; types are not coerced (a number is not a string); names are
    # the camelCase ones only (a snake_case `cart_id` is an unknown field, not an alias).
    model_config = ConfigDict(extra="ignore", strict=True, validate_by_name=False)


class ReleaseItem(_InputModel):
    """One item to release: the cart line and the reservation it holds."""

    cart_item_id: Id128
    item_reservation_id: Id256 = Field(
        description="The reservation to release; at most once in one request (else 422)."
    )


class ReleaseRequest(_InputModel):
    """The value of a `cart.abandoned` record (the API's request body): a UTF-8 JSON object
    of at most WORKER_MAX_RECORD_BYTES (1 MiB). Unknown fields are ignored; NaN, Infinity
    and a key repeated in one object are refused (400 invalid_json)."""

    event_id: EventId | None = Field(
        None,
        description="Idempotency key, scoped to the partner: the same eventId again gets the "
        "same results and releases nothing more. Absent: the record's position "
        "`<topic>/<partition>/<offset>` is used. Must not start with `expiry:` or look "
        "like a record position.",
    )
    cart_id: Id128 = Field(description="The cart; also the record's key.")
    items: list[ReleaseItem] | None = Field(
        None,
        description="The items to release: 1 to WORKER_MAX_ITEMS (100) entries (an empty list "
        "is a 400, more than the limit a 422). Absent or null: release the whole cart, every "
        "reservation of the cart that belongs to the partner.",
        json_schema_extra={"minItems": 1},
    )
    attributes: dict[str, str] | None = Field(
        None, description="Free string map, at most WORKER_MAX_ATTRIBUTES (50) entries."
    )
    occurred_at: AwareDatetime | None = Field(
        None, description="When the shopper abandoned the cart (RFC 3339, with an offset)."
    )


class Outcome(StrEnum):
    RELEASED = "released"
    ALREADY_RELEASED = "already_released"
    EXPIRED = "expired"
    CONFIRMED = "confirmed"
    NOT_FOUND = "not_found"

    @property
    def success(self) -> bool:
        return self in _SUCCESSFUL


_SUCCESSFUL = frozenset({Outcome.RELEASED, Outcome.ALREADY_RELEASED, Outcome.EXPIRED})


class Trigger(StrEnum):
    RELEASE_REQUEST = "release_request"
    EXPIRY = "expiry"


# Results are rendered on the worker's own paths (a 500 among them): their schemas state
# rules (minimum, enum, minItems) that tests check rendered results against, rather than
# validating each result at run time where a failure would have nowhere to go.
REJECTION_STATUSES = (400, 401, 403, 422, 500, 504)


class ItemResult(_WireModel):
    """The result of one item (a `cart.release-results` record, key = cartId). Consumers
    dedupe on the `partner-id` header + eventId + itemReservationId."""

    type: Literal["item_result"] = "item_result"
    event_id: str = Field(
        description="The request's eventId (or its record position); `expiry:<reservationId>` "
        "for a release by the timeout sweeper."
    )
    trigger: Trigger
    cart_id: str
    cart_item_id: str
    item_reservation_id: str
    success: bool = Field(description="true for released, already_released and expired.")
    outcome: Outcome = Field(
        description="released: was reserved, now released. already_released: nothing to do. "
        "expired: already released by the timeout. confirmed: purchased, release refused. "
        "not_found: no such reservation of this partner, cart and cart item."
    )
    quantity: int = Field(
        json_schema_extra={"minimum": 0},
        description="What this result returned to stock (0 if nothing).",
    )
    processed_at: Timestamp


class ErrorDetail(_WireModel):
    code: str = Field(description="Machine-readable reason; every code is in docs/errors.md.")
    message: str = Field(description="What was wrong and how to fix it.")
    value: Any = Field(None, description="The offending value (shortened), if any.")


class EventRejected(_WireModel):
    """The one result of a record that was refused as a whole (the API page's error body)."""

    type: Literal["event_rejected"] = "event_rejected"
    event_id: str = Field(
        description="The request's eventId, or its record position when it had none or its "
        "body could not be read."
    )
    cart_id: str | None = Field(description="null when the body could not be read.")
    status: int = Field(json_schema_extra={"enum": list(REJECTION_STATUSES)})
    description: str
    errors: list[ErrorDetail] = Field(json_schema_extra={"minItems": 1})
    processed_at: Timestamp


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
    # Known once the record was authenticated (403, 422 cart_not_found, 500/504 of a command):
    # its result then names the partner. None before that (400, 401, validation's 422).
    partner_id: str | None = None

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


# Header names (DESIGN.md §2). Kafka header names are matched case-insensitively,
# like the HTTP headers they mirror.
API_KEY_HEADER = "rokt-api-key"
SESSION_HEADER = "rokt-session-id"
TAG_HEADER = "rokt-tag-id"
CONTENT_TYPE_HEADER = "content-type"
ACCEPT_LANGUAGE_HEADER = "accept-language"
EVENT_ID_HEADER = "event-id"
PARTNER_ID_HEADER = "partner-id"
# On each `item_result` of a release request: how many item results the event has, so a
# reader (the HTTP api) knows when a whole-cart release is complete.
RESULT_COUNT_HEADER = "result-count"
COPIED_HEADERS = (SESSION_HEADER, TAG_HEADER)

# Header limits (DESIGN.md §7): nothing a sender controls is multiplied into results beyond
# these. Each of LIMITED_HEADERS at most MAX_HEADER_BYTES, free of control characters; all
# headers of a record (names and values) at most MAX_HEADERS_BYTES together.
LIMITED_HEADERS = (SESSION_HEADER, TAG_HEADER, ACCEPT_LANGUAGE_HEADER)
MAX_HEADER_BYTES = 1_024
MAX_HEADERS_BYTES = 16_384


# The headers as models, for the schemas in docs/contract/ (values are the UTF-8 text of the
# header bytes). The worker reads and writes headers as raw bytes on its hot path: tests
# check what it writes against these models' schemas.

_CONTROL_FREE = "^[^\\u0000-\\u0008\\u000a-\\u001f\\u007f]*$"
_DIGITS = "^[0-9]+$"


def _limited(description: str, **extra: Any) -> Any:
    return Field(
        max_length=MAX_HEADER_BYTES,
        pattern=_CONTROL_FREE,
        description=f"{description} At most {MAX_HEADER_BYTES:,} bytes, no control characters "
        "(tab allowed).",
        **extra,
    )


def _absent_not_null(schema: dict[str, Any]) -> None:
    # A Kafka header is there or not: an optional one is a string when present, never null.
    for prop in schema.get("properties", {}).values():
        branches = prop.pop("anyOf", None)
        if branches is not None:
            prop.update(next(b for b in branches if b != {"type": "null"}))
        if prop.get("default", ...) is None:
            del prop["default"]


class _HeadersModel(BaseModel):
    model_config = ConfigDict(
        validate_by_name=True,
        serialize_by_alias=True,
        frozen=True,
        json_schema_extra=_absent_not_null,
    )


class InputHeaders(_HeadersModel):
    """Headers of a `cart.abandoned` record, mirroring the API's HTTP headers. Names are
    matched case-insensitively; all headers together (names and values) at most 16 KiB.
    Other headers (tracing, for example) are allowed and kept in dead letters."""

    model_config = ConfigDict(extra="allow")

    # Not in repr: a repr can end up in a log or a trace, and the key never may.
    api_key: str = Field(
        alias=API_KEY_HEADER,
        repr=False,
        description="The partner's API key (401 when missing, empty or unknown). Never copied "
        "into results, dead letters, logs or metrics.",
    )
    session_id: str = _limited("Required, not blank (else 400).", alias=SESSION_HEADER)
    tag_id: str = _limited(
        "Required, not blank (else 400); must be one of the partner's tag ids (else 403).",
        alias=TAG_HEADER,
    )
    accept_language: str | None = _limited("Optional.", default=None, alias=ACCEPT_LANGUAGE_HEADER)
    content_type: str | None = Field(
        None,
        alias=CONTENT_TYPE_HEADER,
        description="Optional; if present `application/json`, with `charset=utf-8` if any "
        "(else 400 unsupported_content_type).",
        examples=["application/json"],
    )


class ResultHeaders(_HeadersModel):
    """Headers of a `cart.release-results` record (`item_result` and `event_rejected`)."""

    model_config = ConfigDict(extra="forbid")

    event_id: str = Field(alias=EVENT_ID_HEADER, description="The result's eventId.")
    partner_id: str | None = Field(
        None,
        alias=PARTNER_ID_HEADER,
        description="The partner, once identified; absent from rejections decided before "
        "(400 before authentication, 401). Dedupe on it + eventId + itemReservationId.",
    )
    result_count: str | None = Field(
        None,
        alias=RESULT_COUNT_HEADER,
        pattern=_DIGITS,
        description="On each `item_result` of a release request (not of the expiry sweeper): "
        "how many item results the event has, so a reader knows when it has them all (a "
        "whole-cart release names no items).",
    )
    session_id: str | None = _limited(
        "Copied from the input record when it was within the limits.",
        default=None,
        alias=SESSION_HEADER,
    )
    tag_id: str | None = _limited(
        "Copied from the input record when it was within the limits.",
        default=None,
        alias=TAG_HEADER,
    )
    traceparent: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
        description="W3C trace context of the span that produced the result, only when the "
        "worker traces (OTEL_* variables; docs/operations.md: Tracing). A duplicate carries "
        "the first one's.",
    )
    tracestate: str | None = Field(
        None, description="W3C trace state that came with the input's `traceparent`, if any."
    )


def _without_api_key(schema: dict[str, Any]) -> None:
    _absent_not_null(schema)
    schema["propertyNames"] = {"not": {"pattern": "^[Rr][Oo][Kk][Tt]-[Aa][Pp][Ii]-[Kk][Ee][Yy]$"}}


class DeadLetterHeaders(_HeadersModel):
    """Headers of a `cart.abandoned.dlq` record: the original record's headers except
    `rokt-api-key` and any `dlq-*` (under their own names, values as sent), plus these
    `dlq-*` headers."""

    model_config = ConfigDict(extra="allow", json_schema_extra=_without_api_key)

    status: Literal["400", "500", "504"] = Field(
        alias="dlq-status",
        description="400: the body could not be read; 500: an unexpected error persisted; "
        "504: a database statement timeout persisted.",
    )
    code: str = Field(alias="dlq-code", description="The rejection's code (docs/errors.md).")
    error: str = Field(alias="dlq-error", description="The rejection's message.")
    source_topic: str = Field(alias="dlq-source-topic")
    source_partition: str = Field(alias="dlq-source-partition", pattern=_DIGITS)
    source_offset: str = Field(alias="dlq-source-offset", pattern=_DIGITS)
    attempts: str = Field(
        alias="dlq-attempts", pattern=_DIGITS, description="Attempts made before giving up."
    )
    partner_id: str | None = Field(
        None,
        alias="dlq-partner-id",
        description="Present when the record was authenticated (a 500 or 504 of a partner's "
        "release): the partner_id. `release-worker dlq redrive` applies the record as this "
        "partner, without its API key. A sender's own `dlq-*` headers are dropped.",
    )
    truncated: str | None = Field(
        None,
        alias="dlq-truncated",
        pattern=_DIGITS,
        description="Present when the value was cut to fit WORKER_MAX_MESSAGE_BYTES: the "
        "original value's size in bytes.",
    )
    headers_dropped: str | None = Field(
        None,
        alias="dlq-headers-dropped",
        pattern=_DIGITS,
        description="Present when the original headers were dropped to fit: how many.",
    )
