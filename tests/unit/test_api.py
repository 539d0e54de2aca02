"""The api's parts that need no server: the OpenAPI document (and its committed copy),
waiters, the 200 body, Accept negotiation, the probes."""

from __future__ import annotations

import asyncio
import json
import tracemalloc
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiokafka.errors import KafkaTimeoutError

from worker.api.http import create_app, openapi_document
from worker.api.service import (
    MAX_BODY_BYTES,
    HttpAnswer,
    ReleaseService,
    accepts_json,
    inject_event_id,
    released_body,
)
from worker.api.waiters import Refused, Released, TooManyWaiters, Waiters
from worker.auth import Authenticator, Partner, PartnerLookup, key_digest
from worker.validate import Item, Limits

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "docs" / "contract" / "openapi.json"


def test_the_committed_openapi_document_is_the_apps() -> None:
    committed = json.loads(COMMITTED.read_text()) if COMMITTED.exists() else None
    assert committed == openapi_document(), (
        "docs/contract/openapi.json differs from the api's OpenAPI document: regenerate it "
        "with `release-worker api --print-openapi > docs/contract/openapi.json`"
    )


class _Teapot:
    async def answer(self, request: object) -> HttpAnswer:
        return HttpAnswer(422, {"description": "d", "errors": []})


async def test_the_app_serves_its_document_and_the_probes() -> None:
    ready = [False]
    app = create_app(_Teapot(), lambda: True, lambda: ready[0])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        document = (await client.get("/openapi.json")).json()
        assert document == openapi_document()
        assert document["openapi"].startswith("3.1")
        assert document["components"]["schemas"]["ReleaseRequest"]["required"] == ["cartId"]
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 503
        ready[0] = True
        assert (await client.get("/readyz")).status_code == 200
        response = await client.post("/v1/cart/release", content=b"{}")
        assert response.status_code == 422
        assert response.headers["content-type"] == "application/json"
        assert "release_api_requests_total" in (await client.get("/metrics")).text


@pytest.mark.parametrize(
    ("accept", "ok"),
    [
        ("application/json", True),
        ("*/*", True),
        ("", True),
        ("text/html, application/*;q=0.5", True),
        ("Application/JSON; charset=utf-8", True),
        ("text/html", False),
        ("application/json;q=0", False),
        ("application/xml, text/plain", False),
    ],
)
def test_accept_must_allow_json(accept: str, ok: bool) -> None:
    assert accepts_json(accept) is ok


def test_the_event_id_is_added_to_the_body_and_nothing_else_changes() -> None:
    body = b'{"cartId": "c", "items": null, "x": {"y": [1, 2.5]}}'
    assert orjson.loads(inject_event_id(body, "e1")) == {
        "cartId": "c",
        "items": None,
        "x": {"y": [1, 2.5]},
        "eventId": "e1",
    }


def _item(rid: str, outcome: str = "released") -> dict[str, object]:
    return {"cartItemId": f"i-{rid}", "itemReservationId": rid, "success": True, "outcome": outcome}


def test_the_200_body_lists_items_in_request_order_then_the_rest_by_reservation_id() -> None:
    asked = [Item(f"i-{rid}", rid) for rid in ("b", "a")]
    result = Released({rid: _item(rid) for rid in ("a", "z", "b", "c")})
    body = released_body("cart", asked, result)
    assert [i["itemReservationId"] for i in body["items"]] == ["b", "a", "c", "z"]
    assert body["items"][0] == _item("b")
    assert body["cartId"] == "cart"
    whole = released_body("cart", None, result)
    assert [i["itemReservationId"] for i in whole["items"]] == ["a", "b", "c", "z"]


def _result(
    partner: bytes | None, event: bytes, payload: dict[str, object], count: int | None = None
) -> tuple[list[tuple[str, bytes]], bytes]:
    headers = [("event-id", event)]
    if partner is not None:
        headers.append(("partner-id", partner))
    if count is not None:
        headers.append(("result-count", str(count).encode()))
    return headers, orjson.dumps({"type": "item_result", **payload})


async def test_a_waiter_completes_when_all_its_items_arrived_and_ignores_others() -> None:
    waiters = Waiters(limit=10)
    with waiters.waiting((b"p", b"e"), expected=2) as future:
        waiters.offer(*_result(b"p", b"other", _item("x")))
        waiters.offer(*_result(b"q", b"e", _item("x")))  # another partner's event
        waiters.offer(*_result(None, b"e", _item("x")))  # no partner named
        waiters.offer(*_result(b"p", b"e", _item("a")))
        waiters.offer(*_result(b"p", b"e", _item("a")))  # a duplicate (at least once)
        assert not future.done()
        waiters.offer(*_result(b"p", b"e", _item("b")))
        assert future.result() == Released(
            {"a": _item("a") | {"type": "item_result"}, "b": _item("b") | {"type": "item_result"}}
        )
    assert len(waiters) == 0  # nothing kept once the request left
    assert (waiters.matched, waiters.ignored) == (3, 3)


async def test_a_whole_cart_waiter_completes_by_the_result_count_header() -> None:
    waiters = Waiters(limit=10)
    with waiters.waiting((b"p", b"e"), expected=None) as future:
        waiters.offer(*_result(b"p", b"e", _item("a"), count=2))
        assert not future.done()
        waiters.offer(*_result(b"p", b"e", _item("b"), count=2))
        assert isinstance(future.result(), Released)


async def test_a_rejection_completes_every_waiter_of_the_key() -> None:
    waiters = Waiters(limit=10)
    rejected = {
        "type": "event_rejected",
        "eventId": "e",
        "cartId": "c",
        "status": 422,
        "description": "d",
        "errors": [{"code": "cart_not_found", "message": "m", "value": None}],
        "processedAt": "2026-01-01T00:00:00.000Z",
    }
    with waiters.waiting((b"p", b"e"), 1) as first, waiters.waiting((b"p", b"e"), 1) as second:
        assert first is second
        waiters.offer([("event-id", b"e"), ("partner-id", b"p")], orjson.dumps(rejected))
        assert first.result() == Refused(422, {"description": "d", "errors": rejected["errors"]})
    assert len(waiters) == 0


async def test_waiters_are_bounded() -> None:
    waiters = Waiters(limit=2)
    with waiters.waiting((b"p", b"1"), 1), waiters.waiting((b"p", b"2"), 1):
        with pytest.raises(TooManyWaiters), waiters.waiting((b"p", b"3"), 1):
            pass
        with waiters.waiting((b"p", b"2"), 1):  # a retry of a waited key is no new entry
            pass
    with waiters.waiting((b"p", b"3"), 1) as future:
        assert not future.done()
    await asyncio.sleep(0)


async def test_a_malformed_value_under_a_waited_key_is_skipped_not_fatal() -> None:
    waiters = Waiters(limit=10)
    headers = [("event-id", b"e"), ("partner-id", b"p")]
    with waiters.waiting((b"p", b"e"), 1) as future:
        for value in (b"not json", b"[1]", b'{"type": "event_rejected"}', b'{"x": 1}'):
            waiters.offer(headers, value)
        assert not future.done()
        waiters.offer(*_result(b"p", b"e", _item("a")))
        assert isinstance(future.result(), Released)
    assert waiters.malformed == 4


# ------------------------------------------------------------------ the service, with fakes

_KEY = "k-1"
_PARTNER = Partner("p1", key_digest(_KEY), (), "active")
_HEADERS = {"rokt-api-key": _KEY, "rokt-session-id": "s", "rokt-tag-id": "t"}


class _Producer:
    """A fake of `service.RecordProducer`: records what is sent; `acknowledge` decides
    whether the broker answers (None: never)."""

    def __init__(
        self, acknowledge: bool | None = True, expect: int = 1, gate: asyncio.Event | None = None
    ) -> None:
        self.acknowledge = acknowledge
        self.sent: list[tuple[str, int, bytes | None]] = []  # topic, value's size, key
        self.all_sent = asyncio.Event()  # set once `expect` records are sent
        self.entered = asyncio.Event()  # a send began
        self._expect = expect
        self._gate = gate  # a send waits for it, when given

    async def send_and_wait(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> object:
        self.entered.set()
        if self._gate is not None:
            await self._gate.wait()
        if self.acknowledge is None:
            await asyncio.Event().wait()
        assert value is not None
        self.sent.append((topic, len(value), key))
        if len(self.sent) >= self._expect:
            self.all_sent.set()
        return None


async def _found(digests: list[bytes]) -> list[Partner]:
    return [_PARTNER] if _PARTNER.api_key_sha256 in digests else []


async def _never(digests: list[bytes]) -> list[Partner]:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


def _service(
    producer: _Producer,
    lookup: PartnerLookup = _found,
    timeout_s: float = 0.05,
    waiters: Waiters | None = None,
    body_bytes: int = MAX_BODY_BYTES,
) -> ReleaseService:
    return ReleaseService(
        producer=producer,
        authenticator=Authenticator(lookup, 0),
        waiters=Waiters(10) if waiters is None else waiters,
        input_topic="in",
        limits=Limits(),
        timeout_s=timeout_s,
        body_bytes=body_bytes,
    )


async def _post(service: ReleaseService, body: bytes, **headers: str) -> httpx.Response:
    app = create_app(service, lambda: True, lambda: True)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        # A bound on the test, not a figure: without it a hung request hangs the suite.
        async with asyncio.timeout(10):
            return await client.post(
                "/v1/cart/release", content=body, headers={**_HEADERS, **headers}
            )


_BODY = b'{"cartId": "c1", "items": [{"cartItemId": "i1", "itemReservationId": "r1"}]}'


async def test_a_partner_lookup_that_never_answers_is_a_503_not_a_request_held_forever() -> None:
    producer = _Producer()
    response = await _post(_service(producer, lookup=_never), _BODY)
    assert response.status_code == 503
    assert response.json()["errors"][0]["code"] == "database_unavailable"
    assert producer.sent == []


async def test_a_record_the_broker_never_acknowledged_is_not_said_to_be_applied() -> None:
    response = await _post(_service(_Producer(acknowledge=None)), _BODY, **{"Idempotency-Key": "k"})
    assert response.status_code == 504
    (detail,) = response.json()["errors"]
    assert detail["code"] == "results_timeout"
    assert detail["value"] == "k"
    # The record may never have reached the broker: only the retry is certain.
    assert "still applied" not in detail["message"]
    assert "retry with the same Idempotency-Key" in detail["message"]


async def test_a_record_acknowledged_but_not_answered_in_time_is_a_504_that_is_still_applied() -> (
    None
):
    producer = _Producer()
    response = await _post(_service(producer), _BODY, **{"Idempotency-Key": "k"})
    assert response.status_code == 504
    assert "still applied" in response.json()["errors"][0]["message"]
    assert [(topic, key) for topic, _, key in producer.sent] == [("in", b"c1")]


async def test_a_request_waiting_for_its_results_no_longer_holds_its_body() -> None:
    """Bodies of up to WORKER_MAX_RECORD_BYTES wait up to WORKER_API_TIMEOUT_S for their
    results: held that long, a few hundred of them exceeded the api's memory limit."""
    n = 16
    waiters = Waiters(100)
    producer = _Producer(expect=n)
    app = create_app(_service(producer, timeout_s=60, waiters=waiters), lambda: True, lambda: True)
    body = _BODY[:-1] + b', "pad": "' + b"x" * 1_000_000 + b'"}'
    transport = httpx.ASGITransport(app=app)
    tracemalloc.start()
    try:
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://api") as client,
            asyncio.timeout(30),  # a bound on the test, not a figure
        ):
            requests = [
                asyncio.create_task(
                    client.post(
                        "/v1/cart/release",
                        content=body,
                        headers={**_HEADERS, "Idempotency-Key": f"k{i}"},
                    )
                )
                for i in range(n)
            ]
            await producer.all_sent.wait()  # each registered its waiter before its send
            assert len(waiters) == n
            held, _ = tracemalloc.get_traced_memory()
            for i in range(n):
                waiters.offer(*_result(b"p1", f"k{i}".encode(), _item("r1")))
            responses = await asyncio.gather(*requests)
    finally:
        tracemalloc.stop()
    assert [r.status_code for r in responses] == [200] * n
    # 149 MB before the bodies were dropped (each request held copies of its body).
    assert held < n * len(body) // 4, f"{held} bytes held by {n} waiting requests"


async def test_request_bodies_in_flight_are_bounded_in_bytes() -> None:
    """However many requests arrive at once, the bodies read and not yet handed to the
    broker stay under a bound (503 beyond it), not only the number of events waited for."""
    gate = asyncio.Event()
    producer = _Producer(gate=gate)
    waiters = Waiters(10)
    big = _BODY[:-1] + b', "pad": "' + b"x" * 100_000 + b'"}'
    service = _service(producer, timeout_s=30, waiters=waiters, body_bytes=len(big) * 3 // 2)
    transport = httpx.ASGITransport(app=create_app(service, lambda: True, lambda: True))
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://api") as client,
        asyncio.timeout(10),  # a bound on the test, not a figure
    ):

        def post(key: str, **headers: str) -> Coroutine[Any, Any, httpx.Response]:
            sent = {**_HEADERS, "Idempotency-Key": key, **headers}
            return client.post("/v1/cart/release", content=big, headers=sent)

        first = asyncio.create_task(post("k1"))
        await producer.entered.wait()  # the first holds its body until the broker has it
        second = await post("k2")
        assert second.status_code == 503
        assert second.json()["errors"][0]["code"] == "too_many_requests"
        gate.set()
        await producer.all_sent.wait()
        waiters.offer(*_result(b"p1", b"k1", _item("r1")))
        assert (await first).status_code == 200
        # The first's bytes were given back: a third is read (and refused for its key).
        third = await post("k3", **{"rokt-api-key": "unknown"})
        assert third.status_code == 401


async def test_a_body_that_never_finishes_arriving_is_a_400_within_the_timeout() -> None:
    """A client that announces a body and trickles it must not hold its connection, and
    the bytes it sent, for ever."""
    producer = _Producer()
    never = asyncio.Event()

    async def trickle() -> AsyncIterator[bytes]:
        yield _BODY[:10]
        await never.wait()
        yield _BODY[10:]

    transport = httpx.ASGITransport(
        app=create_app(_service(producer, timeout_s=0.05), lambda: True, lambda: True)
    )
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://api") as client,
        asyncio.timeout(10),  # a bound on the test, not a figure
    ):
        response = await client.post("/v1/cart/release", content=trickle(), headers=_HEADERS)
    assert response.status_code == 400
    assert response.json()["errors"][0]["code"] == "missing_body"
    assert producer.sent == []


class _FailingProducer(_Producer):
    async def send_and_wait(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> object:
        # As aiokafka after a request timeout: the broker may have written it or not.
        raise KafkaTimeoutError


async def test_a_produce_that_fails_is_a_503_that_names_the_event_id_to_retry_with() -> None:
    response = await _post(_service(_FailingProducer()), _BODY)
    assert response.status_code == 503
    (detail,) = response.json()["errors"]
    assert detail["code"] == "broker_unavailable"
    # No Idempotency-Key was sent: the server's eventId is the only safe way to retry.
    assert str(detail["value"]).startswith("api-")
    assert "Idempotency-Key" in detail["message"]


async def test_a_request_cancelled_while_it_waits_leaves_no_waiter_and_no_bytes() -> None:
    """A server cancelling a request (shutdown past its grace, a dropped connection's
    task) leaves nothing behind: its waiter goes, and the bytes it held are given back."""
    gate = asyncio.Event()
    producer = _Producer(gate=gate)
    waiters = Waiters(10)
    service = _service(producer, timeout_s=30, waiters=waiters)
    transport = httpx.ASGITransport(app=create_app(service, lambda: True, lambda: True))
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        request = asyncio.create_task(
            client.post("/v1/cart/release", content=_BODY, headers=_HEADERS)
        )
        await producer.entered.wait()
        assert len(waiters) == 1
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
    assert len(waiters) == 0
    assert service.body_bytes_held == 0


class _Broken:
    async def answer(self, request: object) -> HttpAnswer:
        raise RuntimeError("a bug")


async def test_an_unexpected_error_is_a_500_in_the_pages_error_schema() -> None:
    app = create_app(_Broken(), lambda: True, lambda: True)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        response = await client.post("/v1/cart/release", content=_BODY, headers=_HEADERS)
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["errors"][0]["code"] == "internal_error"
    assert set(body) == {"description", "errors"}


async def test_the_release_answers_the_same_with_and_without_starlettes_stack(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`POST /v1/cart/release` skips Starlette's stack unless tracing is on (then FastAPI's
    telemetry needs it): both ways send the same status, headers and body, a bug's 500 too."""

    async def answers(app: Any) -> list[tuple[int, list[tuple[str, str]], bytes]]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            responses = [
                await client.post("/v1/cart/release", content=_BODY, headers=_HEADERS),
                await client.post("/v1/cart/release?x=1", content=_BODY, headers=_HEADERS),
                await client.get("/v1/cart/release"),
            ]
        return [(r.status_code, r.headers.multi_items(), r.content) for r in responses]

    fast = [
        await answers(create_app(service, lambda: True, lambda: True))
        for service in (_Teapot(), _Broken())
    ]
    monkeypatch.setattr("worker.tracing._active", object())
    full = [
        await answers(create_app(service, lambda: True, lambda: True))
        for service in (_Teapot(), _Broken())
    ]
    assert fast == full
    assert [status for status, _, _ in fast[0] + fast[1]] == [422, 422, 405, 500, 500, 405]
