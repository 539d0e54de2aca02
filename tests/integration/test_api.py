"""`release-worker api` through real HTTP, the real worker and the embedded servers: every
status of the page, idempotent retries (also across a 504 and a worker restart)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from structlog.testing import capture_logs

from tests.integration.conftest import World, reserve
from tests.support import read_topic, running_worker
from worker.api.results import ResultsReader
from worker.api.server import running_api
from worker.config import Settings
from worker.operator_store import add_partner
from worker.testing.topics import ensure_topics

pytestmark = pytest.mark.integration


@asynccontextmanager
async def api_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    await ensure_topics(settings, 3)
    async with (
        running_api(settings.model_copy(update={"api_port": 0})) as api,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{api.port}", timeout=30) as client,
    ):
        yield client


def page_headers(world: World, **extra: str) -> dict[str, str]:
    return {
        "rokt-api-key": world.api_key,
        "rokt-session-id": "session-1",
        "rokt-tag-id": "tag-1",
        "content-type": "application/json",
        "accept": "application/json",
        **extra,
    }


def release_body(cart_id: str, *items: tuple[str, str]) -> dict[str, Any]:
    return {
        "cartId": cart_id,
        "items": [{"cartItemId": c, "itemReservationId": r} for c, r in items],
    }


async def retry_until_answered(
    client: httpx.AsyncClient, body: dict[str, Any], headers: dict[str, str]
) -> httpx.Response:
    """Retry while the answer is 504 (a worker joining its group takes seconds)."""
    for _ in range(60):
        response = await client.post("/v1/cart/release", json=body, headers=headers)
        if response.status_code != 504:
            break
    return response


async def status_of(db: asyncpg.Pool, reservation_id: str) -> str:
    status: str = await db.fetchval(
        "SELECT status FROM reservations WHERE reservation_id = $1", reservation_id
    )
    return status


async def test_a_release_answers_every_item_in_request_order(
    world: World, db: asyncpg.Pool
) -> None:
    p = world.prefix
    await reserve(db, world, f"{p}-r2", f"{p}-c1", "i2", 2)
    await reserve(db, world, f"{p}-r1", f"{p}-c1", "i1", 3)
    await reserve(db, world, f"{p}-r3", f"{p}-c1", "i3", 1, status="confirmed")
    async with running_worker(world.settings), api_client(world.settings) as client:
        body = release_body(f"{p}-c1", ("i2", f"{p}-r2"), ("i9", f"{p}-nope"), ("i3", f"{p}-r3"))
        response = await client.post("/v1/cart/release", json=body, headers=page_headers(world))
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
        assert response.json() == {
            "cartId": f"{p}-c1",
            "items": [
                {
                    "cartItemId": "i2",
                    "itemReservationId": f"{p}-r2",
                    "success": True,
                    "outcome": "released",
                },
                {
                    "cartItemId": "i9",
                    "itemReservationId": f"{p}-nope",
                    "success": False,
                    "outcome": "not_found",
                },
                {
                    "cartItemId": "i3",
                    "itemReservationId": f"{p}-r3",
                    "success": False,
                    "outcome": "confirmed",
                },
            ],
        }
        assert await status_of(db, f"{p}-r2") == "released"
        assert await status_of(db, f"{p}-r1") == "reserved"

        whole = await client.post(
            "/v1/cart/release", json={"cartId": f"{p}-c1"}, headers=page_headers(world)
        )
        assert whole.status_code == 200, whole.text
        assert [(i["itemReservationId"], i["outcome"]) for i in whole.json()["items"]] == [
            (f"{p}-r1", "released"),
            (f"{p}-r2", "already_released"),
            (f"{p}-r3", "confirmed"),
        ]
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200
        metrics = (await client.get("/metrics")).text
        assert 'release_api_requests_total{status="200"}' in metrics
        assert "release_api_request_seconds_bucket" in metrics


async def test_a_retry_with_the_same_key_gets_the_same_answer_also_from_a_restarted_worker(
    world: World, db: asyncpg.Pool
) -> None:
    p = world.prefix
    await reserve(db, world, f"{p}-r1", f"{p}-c1", "i1", 5)
    body = release_body(f"{p}-c1", ("i1", f"{p}-r1"))
    headers = page_headers(world, **{"Idempotency-Key": f"{p}-key"})
    settings = world.settings.model_copy(update={"api_timeout_s": 2.0})
    async with api_client(settings) as client:
        async with running_worker(world.settings):
            first = await retry_until_answered(client, body, headers)
            again = await client.post("/v1/cart/release", json=body, headers=headers)
        # A restarted worker answers the retry from its inbox, once it has its partitions
        # (until then the retries time out: 504).
        async with running_worker(world.settings):
            second = await retry_until_answered(client, body, headers)
    assert first.status_code == again.status_code == second.status_code == 200
    assert first.json() == again.json() == second.json()
    assert first.json()["items"][0]["outcome"] == "released"
    # Each request became one record: key = cartId, the page's headers, eventId = the key.
    assert world.settings.kafka_bootstrap
    records = await read_topic(
        world.settings.kafka_bootstrap, world.settings.input_topic, lambda seen: len(seen) >= 3
    )
    for record in records:
        assert record.key == f"{p}-c1".encode()
        assert record.body == {**body, "eventId": f"{p}-key"}
        assert record.headers == {
            "rokt-api-key": world.api_key.encode(),
            "rokt-session-id": b"session-1",
            "rokt-tag-id": b"tag-1",
            "content-type": b"application/json",
        }
    reserved = await db.fetchval("SELECT reserved FROM stock WHERE sku = $1", world.sku)
    assert reserved == 0


async def test_no_results_in_time_is_a_504_and_a_retry_gets_them_once_the_worker_runs(
    world: World, db: asyncpg.Pool
) -> None:
    p = world.prefix
    await reserve(db, world, f"{p}-r1", f"{p}-c1", "i1", 5)
    settings = world.settings.model_copy(update={"api_timeout_s": 1.0})
    body = release_body(f"{p}-c1", ("i1", f"{p}-r1"))
    headers = page_headers(world, **{"Idempotency-Key": f"{p}-key"})
    async with api_client(settings) as client:
        timed_out = await client.post("/v1/cart/release", json=body, headers=headers)
        assert timed_out.status_code == 504, timed_out.text
        (error,) = timed_out.json()["errors"]
        assert (error["code"], error["value"]) == ("results_timeout", f"{p}-key")
        assert await status_of(db, f"{p}-r1") == "reserved"  # no worker ran yet
        async with running_worker(settings):
            retried = await retry_until_answered(client, body, headers)
    assert retried.status_code == 200, retried.text
    assert retried.json()["items"][0]["outcome"] == "released"
    reserved = await db.fetchval("SELECT reserved FROM stock WHERE sku = $1", world.sku)
    assert reserved == 0


async def input_records(settings: Settings) -> int:
    """How many records the input topic holds (all partitions)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(settings.input_topic) or set()
        ends = await consumer.end_offsets(
            [TopicPartition(settings.input_topic, p) for p in partitions]
        )
        return sum(ends.values())
    finally:
        await consumer.stop()


async def test_each_rejection_has_the_workers_status_and_code_and_only_valid_requests_reach_kafka(
    world: World, db: asyncpg.Pool
) -> None:
    p = world.prefix
    settings = world.settings.model_copy(
        update={"max_record_bytes": 16_384, "max_items": 3, "poison_max_attempts": 1}
    )
    suspended_key = await add_partner(db, f"s-{p}", "Suspended", status="suspended")
    # A status the worker does not know: applying the release fails on every attempt.
    await reserve(db, world, f"{p}-poison", f"{p}-poison-cart", "i1", 1, status="mystery")
    ok = page_headers(world)
    one = release_body(f"{p}-c1", ("i1", f"{p}-r1"))
    cases: list[tuple[int, str, dict[str, Any]]] = [
        (400, "invalid_json", {"content": b"{not json", "headers": ok}),
        (400, "not_an_object", {"content": b"[1]", "headers": ok}),
        (400, "missing_body", {"content": b"", "headers": ok}),
        (400, "too_large", {"content": b"{" + b" " * 16_384 + b"}", "headers": ok}),
        (
            400,
            "unsupported_content_type",
            {"json": one, "headers": {**ok, "content-type": "text/plain"}},
        ),
        (400, "missing_header", {"json": one, "headers": _without(ok, "rokt-session-id")}),
        (400, "missing_field", {"json": {"items": one["items"]}, "headers": ok}),
        (400, "empty_items", {"json": {"cartId": "c", "items": []}, "headers": ok}),
        (400, "header_too_large", {"json": one, "headers": {**ok, "rokt-tag-id": "t" * 2000}}),
        (400, "invalid_value", {"json": one, "headers": {**ok, "Idempotency-Key": "expiry:x"}}),
        (
            400,
            "invalid_value",
            {"json": {**one, "eventId": "a"}, "headers": {**ok, "Idempotency-Key": "b"}},
        ),
        (406, "unsupported_accept", {"json": one, "headers": {**ok, "accept": "text/html"}}),
        (401, "missing_api_key", {"json": one, "headers": _without(ok, "rokt-api-key")}),
        (401, "unknown_api_key", {"json": one, "headers": {**ok, "rokt-api-key": "rk_nobody"}}),
        (403, "tag_not_allowed", {"json": one, "headers": {**ok, "rokt-tag-id": "tag-2"}}),
        (403, "partner_suspended", {"json": one, "headers": {**ok, "rokt-api-key": suspended_key}}),
        (
            422,
            "too_many_items",
            {"json": release_body("c", *[(f"i{n}", f"r{n}") for n in range(4)]), "headers": ok},
        ),
        (
            422,
            "duplicate_item",
            {"json": release_body("c", ("i1", "r1"), ("i2", "r1")), "headers": ok},
        ),
        # Decided by the worker (through Kafka): a whole cart without reservations, poison.
        (422, "cart_not_found", {"json": {"cartId": f"{p}-empty"}, "headers": ok}),
        (
            500,
            "internal_error",
            {"json": release_body(f"{p}-poison-cart", ("i1", f"{p}-poison")), "headers": ok},
        ),
    ]
    with capture_logs() as logs:
        async with running_worker(settings), api_client(settings) as client:
            for status, code, request in cases:
                response = await client.post("/v1/cart/release", **request)
                assert (response.status_code, response.json()["errors"][0]["code"]) == (
                    status,
                    code,
                ), response.text
                assert response.json()["description"]
                assert world.api_key not in response.text
                assert suspended_key not in response.text
    assert await input_records(settings) == 2  # only the two the worker decided
    assert any(entry["event"] == "api_started" for entry in logs)  # the capture works
    assert world.api_key not in repr(logs)
    assert suspended_key not in repr(logs)


def _without(headers: dict[str, str], name: str) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k != name}


async def test_a_results_reader_that_dies_is_logged_and_stops_the_api(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without its reader every request ends as a 504: that must not happen silently."""

    async def broken(self: ResultsReader) -> None:
        raise RuntimeError("a bug in the reader")

    monkeypatch.setattr(ResultsReader, "run", broken)
    await ensure_topics(world.settings, 3)
    with capture_logs() as logged:
        async with (
            running_api(world.settings.model_copy(update={"api_port": 0})) as api,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{api.port}") as client,
        ):
            async with asyncio.timeout(30):  # a bound on the test, not a figure
                await api.failed.wait()  # `release-worker api` then exits 1
            assert (await client.get("/healthz")).status_code == 503
    failed = [(e["task"], e["restart"]) for e in logged if e["event"] == "task_failed"]
    assert failed == [("api_results_reader", False)]
