"""One HTTP request → one input record → its results → one HTTP answer (DESIGN.md §8).

The request is checked exactly as the worker checks a record (`validate.parse_record`,
then `auth.Authenticator` against PostgreSQL), so a request that the worker would reject
before touching reservations is answered here with the same status and code, and never
reaches Kafka. Only authenticated, valid requests become records; their results carry
`partner-id`, so they are matched by partner + eventId (`waiters.py`).

The API key is forwarded only in the record's `rokt-api-key` header: it is never logged,
never echoed, and kept nowhere else (`parse_record` keeps its sha256 only).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
import structlog
from aiokafka.errors import KafkaError
from pydantic import TypeAdapter, ValidationError
from starlette.requests import ClientDisconnect, Request

from worker.api import metrics
from worker.api.waiters import Refused, Released, TooManyWaiters, Waiters, WaitKey
from worker.auth import Authenticator
from worker.contract import (
    ACCEPT_LANGUAGE_HEADER,
    API_KEY_HEADER,
    CONTENT_TYPE_HEADER,
    DESCRIPTIONS,
    SESSION_HEADER,
    TAG_HEADER,
    EventId,
    Rejection,
)
from worker.records import RawRecord
from worker.retry import DATABASE_ERRORS
from worker.validate import Item, Limits, parse_record, too_large

log = structlog.get_logger("worker.api")

IDEMPOTENCY_HEADER = "idempotency-key"
# The request headers that become the record's headers (the page's, DESIGN.md §2).
FORWARDED_HEADERS = frozenset(
    {API_KEY_HEADER, SESSION_HEADER, TAG_HEADER, ACCEPT_LANGUAGE_HEADER, CONTENT_TYPE_HEADER}
)
# At most this many events are waited for at once in one process (DESIGN.md: bounded
# state); beyond it a request is answered 503 at once instead of queueing without end.
MAX_WAITERS = 10_000
# At most this many bytes of request bodies are held at once in one process, counted as
# they are read, until the broker has their records; a request that finds no room is
# answered 503. A body costs a few times its size while it is read and checked
# (docs/api.md), so this bounds that peak too. A body must arrive within
# WORKER_API_TIMEOUT_S: a client trickling one holds its bytes no longer.
MAX_BODY_BYTES = 24 * 1024 * 1024

HTTP_DESCRIPTIONS = {
    **DESCRIPTIONS,
    406: "Not acceptable: the response can only be application/json.",
    503: "Service unavailable: the api cannot take the request now; retry later.",
    504: "Gateway timeout: the release was not answered in time.",
}

_EVENT_ID = TypeAdapter(EventId)
# The counters of the statuses answered, looked up once (`labels()` takes a lock each call).
_REQUESTS = {
    status: metrics.REQUESTS.labels(status=str(status)) for status in (200, *HTTP_DESCRIPTIONS)
}

Body = dict[str, Any]


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    status: int
    body: Body


def error(status: int, code: str, message: str, value: Any = None) -> HttpAnswer:
    errors = [{"code": code, "message": message, "value": value}]
    return HttpAnswer(status, {"description": HTTP_DESCRIPTIONS[status], "errors": errors})


def rejected(rejection: Rejection) -> HttpAnswer:
    return error(rejection.status, rejection.code, rejection.message, rejection.value)


class RecordProducer(Protocol):
    """What the service uses of `aiokafka.AIOKafkaProducer`."""

    async def send_and_wait(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> Any: ...


class ReleaseService:
    """Answers release requests: validate, authenticate, produce, await the results."""

    def __init__(
        self,
        *,
        producer: RecordProducer,
        authenticator: Authenticator,
        waiters: Waiters,
        input_topic: str,
        limits: Limits,
        timeout_s: float,
        body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self._producer = producer
        self._authenticator = authenticator
        self._waiters = waiters
        self._topic = input_topic
        self._limits = limits
        self._timeout_s = timeout_s
        self._bodies = _ByteBudget(body_bytes)

    @property
    def body_bytes_held(self) -> int:
        """Bytes of request bodies held now (at most MAX_BODY_BYTES, but one request's)."""
        return self._bodies.used

    async def answer(self, request: Request) -> HttpAnswer:
        started = time.perf_counter()
        answer = await self._answer(request)
        counter = _REQUESTS.get(answer.status)
        if counter is None:
            counter = metrics.REQUESTS.labels(status=str(answer.status))
        counter.inc()
        metrics.LATENCY.observe(time.perf_counter() - started)
        return answer

    async def _answer(self, request: Request) -> HttpAnswer:
        body = self._bodies.hold()
        # One deadline for the whole request (reading the body, the partner's lookup, the
        # produce and the results), so that the server's graceful shutdown, which waits
        # WORKER_API_TIMEOUT_S + 1 s, lets every request in flight finish.
        deadline = asyncio.get_running_loop().time() + self._timeout_s
        try:
            checked = await self._check(request, body, deadline)
            if isinstance(checked, HttpAnswer):
                return checked
            # The body is no longer referenced from here on but by `checked.value`, which is
            # dropped once the broker has the record: a request then waits for its results
            # holding a few small objects, not a body of up to WORKER_MAX_RECORD_BYTES.
            return await self._produce_and_wait(checked, body, deadline)
        finally:
            body.give_back()

    async def _check(self, request: Request, held: _Held, deadline: float) -> HttpAnswer | _Checked:
        """The request as the record to produce, or the answer that refuses it."""
        # One pass over the raw headers (ASGI names are lower case): the first `accept` and
        # `idempotency-key`, as `request.headers.get` finds them, and those forwarded.
        accept = key = None
        forwarded = []
        for raw_name, value in request.scope["headers"]:
            name = raw_name.decode("latin-1")
            lower = name.lower()
            if lower in FORWARDED_HEADERS:
                forwarded.append((name, value))
            elif lower == "accept" and accept is None:
                accept = value.decode("latin-1")
            elif lower == IDEMPOTENCY_HEADER and key is None:
                key = value.decode("latin-1")
        if accept is not None and not accepts_json(accept):
            return error(
                406,
                "unsupported_accept",
                "Accept must allow application/json (or be left out).",
                accept[:200],
            )
        headers = tuple(forwarded)
        position = RawRecord(self._topic, 0, 0, None, None, headers)
        try:
            # Bounded in time: a client trickling its body holds no connection and no bytes
            # for longer than a request may wait for its results.
            async with asyncio.timeout_at(deadline):
                body = await read_body(request, self._limits.max_record_bytes, held)
        except ClientDisconnect:
            return error(400, "missing_body", "The client went away before the body arrived.")
        except TimeoutError:
            return error(
                400, "missing_body", f"The body did not arrive within {self._timeout_s:g} s."
            )
        if body is None:
            return error(503, "too_many_requests", "Too many request bytes in flight; retry later.")
        if isinstance(body, int):
            return rejected(too_large(position, body, self._limits))
        record = RawRecord(self._topic, 0, 0, None, body, headers)
        verdict = parse_record(record, self._limits)
        if isinstance(verdict, Rejection):
            return rejected(verdict)
        # Without an eventId, parse_record names the event by the record's position.
        body_event_id = None if verdict.event_id == record.position else verdict.event_id
        if key is not None:
            try:
                key = _EVENT_ID.validate_python(key)
            except ValidationError as invalid:
                message = f"Idempotency-Key: {invalid.errors()[0]['msg']}."
                return error(400, "invalid_value", message, "Idempotency-Key")
            if body_event_id is not None and body_event_id != key:
                return error(
                    400,
                    "invalid_value",
                    "The body's eventId and the Idempotency-Key header differ; send one, "
                    "or the same value in both.",
                    "Idempotency-Key",
                )
        try:
            # Bounded: a database that stops answering (no reset, a full pool) must not
            # hold requests, and their bodies, without end (TimeoutError is among these).
            async with asyncio.timeout_at(deadline):
                ((_, partner),) = await self._authenticator.authorize([verdict])
        except DATABASE_ERRORS:
            log.warning("api_database_unavailable")
            return error(503, "database_unavailable", "The partner could not be looked up.")
        if isinstance(partner, Rejection):
            return rejected(partner)
        event_id = key or body_event_id or f"api-{uuid.uuid4()}"
        return _Checked(
            value=body if body_event_id else inject_event_id(body, event_id),
            headers=list(headers),
            cart_id=verdict.cart_id,
            items=verdict.items,
            event_id=event_id,
            wait_key=(partner.partner_id.encode(), event_id.encode()),
        )

    async def _produce_and_wait(
        self, checked: _Checked, body: _Held, deadline: float
    ) -> HttpAnswer:
        expected = None if checked.items is None else len(checked.items)
        queued = False
        try:
            with self._waiters.waiting(checked.wait_key, expected) as future:
                async with asyncio.timeout_at(deadline):
                    value, checked.value = checked.value, b""
                    await self._producer.send_and_wait(
                        self._topic, value, key=checked.cart_id.encode(), headers=checked.headers
                    )
                    del value
                    body.give_back()
                    queued = True
                    # Shielded: other requests with the same key wait on the same future.
                    result = await asyncio.shield(future)
        except TooManyWaiters:
            return error(503, "too_many_requests", "Too many requests in flight; retry later.")
        except TimeoutError:
            # Only a record the broker acknowledged is sure to be applied; one cut off
            # while being produced may never have reached it.
            applied = (
                "The release is still applied"
                if queued
                else "The broker did not acknowledge the request in time, so it may not be applied"
            )
            return error(
                504,
                "results_timeout",
                f"The results did not arrive within {self._timeout_s:g} s. {applied}; "
                "retry with the same Idempotency-Key (the value) to get its results without "
                "releasing anything twice.",
                checked.event_id,
            )
        except KafkaError as failure:
            log.warning("api_produce_failed", error=type(failure).__name__)
            # A produce that failed may still have been written (a lost answer): only a
            # retry under the same eventId is safe, so the answer names it.
            return error(
                503,
                "broker_unavailable",
                "The request could not be queued (it may still be applied); retry with the "
                "same Idempotency-Key (the value): a retry releases nothing twice.",
                checked.event_id,
            )
        if isinstance(result, Refused):
            return HttpAnswer(result.status, result.body)
        return HttpAnswer(200, released_body(checked.cart_id, checked.items, result))


@dataclass(slots=True)
class _Checked:
    """A valid, authenticated request: the record to produce and what its answer needs."""

    value: bytes  # emptied once produced
    headers: list[tuple[str, bytes]]
    cart_id: str
    items: tuple[Item, ...] | None
    event_id: str
    wait_key: WaitKey


class _ByteBudget:
    """Bytes of request bodies held at once, at most `limit` (a request alone always fits)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def hold(self) -> _Held:
        return _Held(self)


@dataclass(slots=True)
class _Held:
    """The bytes one request holds, counted as they are read."""

    budget: _ByteBudget
    size: int = 0

    def grow(self, size: int) -> bool:
        """Count `size` more bytes, unless others' bytes leave no room for them."""
        budget = self.budget
        if budget.used > self.size and budget.used + size > budget.limit:
            return False
        self.size += size
        budget.used += size
        return True

    def give_back(self) -> None:
        self.budget.used -= self.size
        self.size = 0


def released_body(cart_id: str, asked: Sequence[Item] | None, result: Released) -> Body:
    """The page's 200 body: items in request order (whole cart: reservation id order)."""
    order = {item.item_reservation_id: n for n, item in enumerate(asked or ())}
    ids = sorted(result.items, key=lambda rid: (order.get(rid, len(order)), rid))
    items = [
        {
            "cartItemId": result.items[rid]["cartItemId"],
            "itemReservationId": rid,
            "success": result.items[rid]["success"],
            "outcome": result.items[rid]["outcome"],
        }
        for rid in ids
    ]
    return {"cartId": cart_id, "items": items}


def inject_event_id(body: bytes, event_id: str) -> bytes:
    """The body with `eventId` set (it was valid strict JSON without one)."""
    parsed = orjson.loads(body)
    parsed["eventId"] = event_id
    return orjson.dumps(parsed)


async def read_body(request: Request, limit: int, held: _Held | None = None) -> bytes | int | None:
    """The body, or its size (at least, for a chunked one) when it is over `limit`: a body
    announced as larger is refused before a byte of it is read. None: `held` found no room
    for the bytes read (the process holds MAX_BODY_BYTES of bodies)."""
    announced = request.headers.get("content-length", "")
    if announced.isdigit() and int(announced) > limit:
        return int(announced)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return size
        if held is not None and not held.grow(len(chunk)):
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def accepts_json(accept: str) -> bool:
    """Whether an Accept header allows application/json (q=0 refuses a range)."""
    for media_range in accept.split(","):
        media_type, *parameters = media_range.split(";")
        if media_type.strip().lower() not in ("application/json", "application/*", "*/*", ""):
            continue
        refused = any(
            p.strip().lower().replace(" ", "") in ("q=0", "q=0.0", "q=0.00", "q=0.000")
            for p in parameters
        )
        if not refused:
            return True
    return False
