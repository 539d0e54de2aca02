"""Outgoing messages: results, rejections and dead letters, rendered as DESIGN.md §2 says.

Payloads are rendered once, stored in the outbox (and the inbox), and published
from there: a re-sent result is byte-for-byte the first one (G2).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple, Protocol

import orjson
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from worker.config import KAFKA_DEFAULT_MAX_MESSAGE_BYTES
from worker.contract import (
    API_KEY_HEADER,
    COPIED_HEADERS,
    EVENT_ID_HEADER,
    PARTNER_ID_HEADER,
    RESULT_COUNT_HEADER,
    ErrorDetail,
    EventRejected,
    Outcome,
    Rejection,
    Trigger,
    format_timestamp,
)
from worker.records import Headers, OutboxMessage, RawRecord
from worker.validate import acceptable_header

DLQ_HEADER_PREFIX = "dlq-"
DLQ_PARTNER_ID_HEADER = "dlq-partner-id"


@dataclass(frozen=True, slots=True)
class Topics:
    results: str
    dlq: str
    # What the DLQ topic accepts (WORKER_MAX_MESSAGE_BYTES): dead letters are shrunk to fit.
    max_message_bytes: int = KAFKA_DEFAULT_MAX_MESSAGE_BYTES


def result_headers(
    event_id: str, partner_id: str | None, record: RawRecord | None, count: int | None = None
) -> Headers:
    """`event-id`, `partner-id` when the partner was identified (consumers dedupe on both with
    `itemReservationId`), `result-count` on item results (how many the event has), and the
    session and tag headers copied from the record, but only values within the header
    limits: a rejection for an oversized header does not carry it. Last, with tracing on,
    the `traceparent` of the record's span (worker/tracing.py)."""
    own: Headers = ((EVENT_ID_HEADER, event_id.encode()),)
    if partner_id is not None:
        own += ((PARTNER_ID_HEADER, partner_id.encode()),)
    if count is not None:
        own += ((RESULT_COUNT_HEADER, str(count).encode()),)
    if record is None:
        return own
    named = record.named_headers()
    for n in COPIED_HEADERS:  # a loop, not a generator: one is made per record
        v = named.get(n)
        if v and acceptable_header(v):
            own += ((n, v),)
    return own + record.trace_headers


def result_messages(
    topic: str,
    cart_id: str,
    payloads: Iterable[bytes],
    headers: Headers,
    record: RawRecord | None = None,
) -> list[OutboxMessage]:
    """An event's results as they are published, first time or replayed, of a release or an
    expiry: one message per payload, keyed by its cartId, all with the event's headers; the
    consumed `record`'s timestamp starts the record->result latency (none for an expiry)."""
    key = cart_id.encode()
    source_ts_ms = record.timestamp_ms if record is not None else 0
    # Made by `tuple.__new__` with every field: the named tuple's own __new__ is a Python
    # function, a frame per item result.
    new = tuple.__new__
    return [new(OutboxMessage, (topic, key, p, headers, None, source_ts_ms)) for p in payloads]


class ItemOutcome(Protocol):
    """What an item result says of its item (`release.ItemDecision` is one)."""

    @property
    def cart_item_id(self) -> str: ...
    @property
    def reservation_id(self) -> str: ...
    @property
    def outcome(self) -> Outcome: ...
    @property
    def quantity(self) -> int: ...


class _Item(NamedTuple):
    cart_item_id: str
    reservation_id: str
    outcome: Outcome
    quantity: int


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
    """The `item_result` body, byte for byte what `ItemResult(...).model_dump_json()` gives
    (tests/unit/test_fast_json.py checks the two agree on arbitrary text)."""
    item = _Item(cart_item_id, reservation_id, outcome, quantity)
    return item_results(event_id, trigger, cart_id, [item], processed_at)[0]


# Per outcome, the JSON between an item's itemReservationId and its quantity.
_OUTCOME_PARTS = {
    o: b',"success":%s,"outcome":%s,"quantity":' % (orjson.dumps(o.success), orjson.dumps(o))
    for o in Outcome
}


def item_results(
    event_id: str,
    trigger: Trigger,
    cart_id: str,
    items: Iterable[ItemOutcome],
    processed_at: datetime,
) -> list[bytes]:
    """The `item_result` bodies of one event's items, as `item_result_payload` renders each.

    This is the hot path (one body per item): the fields an event's items share are
    rendered once, the item's own by orjson (its string escapes are pydantic's), and the
    body is joined in the model's field order, instead of building a model or a dict.
    """
    head = b'{"type":"item_result","eventId":%s,"trigger":%s,"cartId":%s,"cartItemId":' % (
        orjson.dumps(event_id),
        orjson.dumps(trigger),
        orjson.dumps(cart_id),
    )
    tail = b',"processedAt":%s}' % orjson.dumps(_timestamp(processed_at))
    dumps, parts = orjson.dumps, _OUTCOME_PARTS
    return [
        b"".join(
            (
                head,
                dumps(i.cart_item_id),
                b',"itemReservationId":',
                dumps(i.reservation_id),
                parts[i.outcome],
                b"%d" % i.quantity,
                tail,
            )
        )
        for i in items
    ]


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
        messages.append(dead_letter(record, rejection, topics.dlq, topics.max_message_bytes))
    return messages


def dead_letter(
    record: RawRecord,
    rejection: Rejection,
    topic: str,
    max_bytes: int = KAFKA_DEFAULT_MAX_MESSAGE_BYTES,
) -> OutboxMessage:
    """The record as it came (its API key header and any `dlq-*` header removed), with the
    worker's `dlq-*` headers.

    A broker refuses a message over its limit, and a refused dead letter would be parked
    instead of published: one that would not fit is shrunk to `max_bytes`. Its value is
    cut (`dlq-truncated` says how long it was) and, should its own headers not fit even
    then, those go too (`dlq-headers-dropped` says how many). Key and `dlq-*` headers stay.
    """
    # The `dlq-*` names are the worker's: a sender's own are dropped, so none can pose as
    # ours (`release-worker dlq redrive` acts as the partner `dlq-partner-id` names).
    kept: Headers = tuple(
        (n, v)
        for n, v in record.headers
        if n.lower() != API_KEY_HEADER and not n.lower().startswith(DLQ_HEADER_PREFIX)
    )
    added: tuple[tuple[str, str], ...] = (
        ("dlq-status", str(rejection.status)),
        ("dlq-code", rejection.code),
        ("dlq-error", rejection.message),
        ("dlq-source-topic", record.topic),
        ("dlq-source-partition", str(record.partition)),
        ("dlq-source-offset", str(record.offset)),
        ("dlq-attempts", str(rejection.attempts)),
    )
    if rejection.partner_id is not None:
        # The record was authenticated as this partner (a 500/504 of its release).
        added += ((DLQ_PARTNER_ID_HEADER, rejection.partner_id),)
    dlq: Headers = tuple((n, v.encode()) for n, v in added)
    value = record.value
    if message_bytes(record.key, value, kept + dlq) > max_bytes:
        value, kept, dlq = _shrunk(record.key, value or b"", kept, dlq, max_bytes)
    return OutboxMessage(topic, record.key, value, kept + dlq)


def _shrunk(
    key: bytes | None, value: bytes, kept: Headers, dlq: Headers, max_bytes: int
) -> tuple[bytes, Headers, Headers]:
    dlq += (("dlq-truncated", str(len(value)).encode()),)
    if message_bytes(key, b"", kept + dlq) > max_bytes:
        dlq += (("dlq-headers-dropped", str(len(kept)).encode()),)
        kept = ()
    # Lengths are varints, so a shorter value can also shorten the framing: cut, measure,
    # and cut the excess again (twice at most).
    cut = len(value)
    while cut and (excess := message_bytes(key, value[:cut], kept + dlq) - max_bytes) > 0:
        cut = max(0, cut - excess)
    return value[:cut], kept, dlq


def message_bytes(key: bytes | None, value: bytes | None, headers: Headers) -> int:
    """A message's size as the producer measures it against `max_request_size` (one
    record in its own batch, the framing included), which is what a broker's
    `max.message.bytes` limits too."""
    size: int = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, list(headers))
    return size
