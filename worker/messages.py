"""Render results, rejections and dead letters as the messages DESIGN.md §2 specifies.

Payloads are rendered once, stored in the outbox (and the inbox), and published
from there: a re-sent result is byte-for-byte the first one (G2).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime

import orjson

from worker.contract import (
    API_KEY_HEADER,
    COPIED_HEADERS,
    EVENT_ID_HEADER,
    PARTNER_ID_HEADER,
    ErrorDetail,
    EventRejected,
    Outcome,
    Trigger,
    format_timestamp,
)
from worker.records import Headers, OutboxMessage, RawRecord
from worker.validate import Rejection, acceptable_header


@dataclass(frozen=True, slots=True)
class Topics:
    results: str
    dlq: str


def result_headers(event_id: str, partner_id: str | None, record: RawRecord | None) -> Headers:
    """`event-id`, `partner-id` when the partner was identified (consumers dedupe on both with
    `itemReservationId`), and the session and tag headers copied from the record, but only
    values within the header limits: a rejection for an oversized header does not carry it."""
    own: Headers = ((EVENT_ID_HEADER, event_id.encode()),)
    if partner_id is not None:
        own += ((PARTNER_ID_HEADER, partner_id.encode()),)
    if record is None:
        return own
    return own + tuple(
        (n, v) for n in COPIED_HEADERS if (v := record.header(n)) and acceptable_header(v)
    )


def item_result_payload(
    *,
    event_id: str,
    trigger: Trigger,
    cart_id: str,
    cart_item_id: str,
    reservation_id: str,
    outcome: Outcome,
    quantity: int,
    processed_at: datetime,
) -> bytes:
    """The `item_result` body, byte for byte what `ItemResult(...).model_dump_json()` gives.

    This is the hot path (one call per item), so it renders with orjson from a dict in
    the model's field order instead of building a model; tests/unit/test_fast_json.py
    checks the two agree on arbitrary text.
    """
    return orjson.dumps(
        {
            "type": "item_result",
            "eventId": event_id,
            "trigger": trigger.value,
            "cartId": cart_id,
            "cartItemId": cart_item_id,
            "itemReservationId": reservation_id,
            "success": outcome.success,
            "outcome": outcome.value,
            "quantity": quantity,
            "processedAt": _timestamp(processed_at),
        }
    )


@functools.lru_cache(maxsize=64)
def _timestamp(moment: datetime) -> str:
    # A batch shares one processing time: format it once, not once per item.
    return format_timestamp(moment)


def rejection_payload(rejection: Rejection, processed_at: datetime) -> bytes:
    return (
        EventRejected(
            event_id=rejection.event_id,
            cart_id=rejection.cart_id,
            status=rejection.status,
            description=rejection.description,
            errors=[
                ErrorDetail(code=rejection.code, message=rejection.message, value=rejection.value)
            ],
            processed_at=processed_at,
        )
        .model_dump_json()
        .encode()
    )


def rejection_messages(
    record: RawRecord, rejection: Rejection, topics: Topics, processed_at: datetime
) -> list[OutboxMessage]:
    """The `event_rejected` result, and the dead letter where the rejection calls for one.

    Keyed by cartId once the partner is known; before that (400, 401) by the record's own
    key, so an unauthenticated body cannot steer a rejection onto a cart it names."""
    identified = rejection.partner_id is not None and rejection.cart_id
    key = rejection.cart_id.encode() if identified and rejection.cart_id else record.key
    messages = [
        OutboxMessage(
            topics.results,
            key,
            rejection_payload(rejection, processed_at),
            result_headers(rejection.event_id, rejection.partner_id, record),
            source_ts_ms=record.timestamp_ms,  # a rejection is a result: it has a latency too
        )
    ]
    if rejection.dead_letter:
        messages.append(dead_letter(record, rejection, topics.dlq))
    return messages


def dead_letter(record: RawRecord, rejection: Rejection, topic: str) -> OutboxMessage:
    kept = tuple((n, v) for n, v in record.headers if n.lower() != API_KEY_HEADER)
    added = (
        ("dlq-status", str(rejection.status)),
        ("dlq-code", rejection.code),
        ("dlq-error", rejection.message),
        ("dlq-source-topic", record.topic),
        ("dlq-source-partition", str(record.partition)),
        ("dlq-source-offset", str(record.offset)),
        ("dlq-attempts", str(rejection.attempts)),
    )
    return OutboxMessage(
        topic,
        record.key,
        record.value,
        kept + tuple((n, v.encode()) for n, v in added),
    )
