"""`release-worker api` through real HTTP, the real worker and the embedded servers: every
status of the page, idempotent retries (also across a 504 and a worker restart)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx
import pytest

from tests.integration.conftest import World, reserve
from tests.support import running_worker
from worker.admin import ensure_topics
from worker.api.server import running_api
from worker.config import Settings

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


async def test_a_retry_with_the_same_idempotency_key_returns_the_same_answer_and_releases_once(
    world: World, db: asyncpg.Pool
) -> None:
    p = world.prefix
    await reserve(db, world, f"{p}-r1", f"{p}-c1", "i1", 5)
    body = release_body(f"{p}-c1", ("i1", f"{p}-r1"))
    headers = page_headers(world, **{"Idempotency-Key": f"{p}-key"})
    async with running_worker(world.settings), api_client(world.settings) as client:
        first = await client.post("/v1/cart/release", json=body, headers=headers)
        second = await client.post("/v1/cart/release", json=body, headers=headers)
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    assert first.json()["items"][0]["outcome"] == "released"
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
            # Each retry is answered 504 until the worker has joined its group (seconds).
            for _ in range(60):
                retried = await client.post("/v1/cart/release", json=body, headers=headers)
                if retried.status_code != 504:
                    break
    assert retried.status_code == 200, retried.text
    assert retried.json()["items"][0]["outcome"] == "released"
    reserved = await db.fetchval("SELECT reserved FROM stock WHERE sku = $1", world.sku)
    assert reserved == 0
