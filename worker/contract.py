"""The Kafka contract (DESIGN.md §2) as pydantic models: input, results, rejections.

Field names on the wire are camelCase; Python code uses snake_case.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, PlainSerializer
from pydantic.alias_generators import to_camel


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 UTC with milliseconds, e.g. `2026-11-27T15:00:00.123Z`."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


Timestamp = Annotated[datetime, PlainSerializer(format_timestamp, return_type=str)]


def _storable(value: str) -> str:
    # PostgreSQL text cannot hold NUL: refuse it here as a 400 rather than fail in the database.
    if "\x00" in value:
        raise ValueError("must not contain the NUL character (\\u0000)")
    return value


# Length first (so its error says "characters"), then the NUL check.
Id128 = Annotated[str, Field(min_length=1, max_length=128), AfterValidator(_storable)]
Id256 = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_storable)]

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


EventId = Annotated[Id128, AfterValidator(_not_reserved)]


class _WireModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        frozen=True,
    )


class _InputModel(_WireModel):
    # Unknown fields are ignored; types are not coerced (a number is not a string); names are
    # the camelCase ones only (a snake_case `cart_id` is an unknown field, not an alias).
    model_config = ConfigDict(extra="ignore", strict=True, validate_by_name=False)


class ReleaseItem(_InputModel):
    cart_item_id: Id128
    item_reservation_id: Id256


class ReleaseRequest(_InputModel):
    """The value of a `cart.abandoned` record (the API's request body)."""

    event_id: EventId | None = None
    cart_id: Id128
    items: list[ReleaseItem] | None = None
    attributes: dict[str, str] | None = None
    occurred_at: AwareDatetime | None = None


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


class ItemResult(_WireModel):
    type: Literal["item_result"] = "item_result"
    event_id: str
    trigger: Trigger
    cart_id: str
    cart_item_id: str
    item_reservation_id: str
    success: bool
    outcome: Outcome
    quantity: int
    processed_at: Timestamp


class ErrorDetail(_WireModel):
    code: str
    message: str
    value: Any = None


class EventRejected(_WireModel):
    type: Literal["event_rejected"] = "event_rejected"
    event_id: str
    cart_id: str | None
    status: int
    description: str
    errors: list[ErrorDetail]
    processed_at: Timestamp


# Header names (DESIGN.md §2). Kafka header names are matched case-insensitively,
# like the HTTP headers they mirror.
API_KEY_HEADER = "rokt-api-key"
SESSION_HEADER = "rokt-session-id"
TAG_HEADER = "rokt-tag-id"
CONTENT_TYPE_HEADER = "content-type"
ACCEPT_LANGUAGE_HEADER = "accept-language"
EVENT_ID_HEADER = "event-id"
PARTNER_ID_HEADER = "partner-id"
COPIED_HEADERS = (SESSION_HEADER, TAG_HEADER)

# Header limits (DESIGN.md §7): nothing a sender controls is multiplied into results beyond
# these. Each of LIMITED_HEADERS at most MAX_HEADER_BYTES, free of control characters; all
# headers of a record (names and values) at most MAX_HEADERS_BYTES together.
LIMITED_HEADERS = (SESSION_HEADER, TAG_HEADER, ACCEPT_LANGUAGE_HEADER)
MAX_HEADER_BYTES = 1_024
MAX_HEADERS_BYTES = 16_384
