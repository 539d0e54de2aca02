"""The HTTP part of `make demo`: the page's request through `release-worker api`.

Run while the demo's worker still runs: one release over HTTP (shown as the curl command
that sends it, with its JSON answer), the same request again with the same
Idempotency-Key (the same answer, nothing released twice), and one rejection.
"""

from __future__ import annotations

import asyncio
import http.client
import shlex
from dataclasses import dataclass
from typing import Any

import orjson
from rich.console import Console
from rich.syntax import Syntax

from worker.api.server import running_api
from worker.config import Settings


@dataclass(frozen=True, slots=True)
class HttpCase:
    """A reservation still held, to release over HTTP, and its partner's key."""

    cart_id: str
    cart_item_id: str
    reservation_id: str
    api_key: str


def _post(port: int, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", "/v1/cart/release", body, headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _curl(port: int, body: bytes, headers: dict[str, str]) -> str:
    # The key is shown as a variable: a demo prints no secret either.
    parts = [f"curl -s http://127.0.0.1:{port}/v1/cart/release"]
    for name, value in headers.items():
        if name == "rokt-api-key":
            parts.append(f'-H "{name}: $ACME_API_KEY"')
        else:
            parts.append(f"-H {shlex.quote(f'{name}: {value}')}")
    parts.append(f"-d {shlex.quote(body.decode())}")
    return " \\\n  ".join(parts)


async def show_http(console: Console, settings: Settings, case: HttpCase, tag: str) -> bool:
    """Release `case` over HTTP, retry it, show a rejection; True if all went as expected."""
    body = orjson.dumps(
        {
            "cartId": case.cart_id,
            "items": [{"cartItemId": case.cart_item_id, "itemReservationId": case.reservation_id}],
        }
    )
    headers = {
        "rokt-api-key": case.api_key,
        "rokt-session-id": f"demo-session-{tag}",
        "rokt-tag-id": "tag-1",
        "content-type": "application/json",
        "accept": "application/json",
        "Idempotency-Key": f"demo-http-{tag}",
    }
    console.rule("The same release over HTTP: release-worker api")
    async with running_api(settings.model_copy(update={"api_port": 0})) as api:
        port = api.port
        console.print(f"[green]✓[/] api listening on 127.0.0.1:{port} (while the demo runs):")
        console.print(Syntax(_curl(port, body, headers), "bash", word_wrap=True))
        status, first = await asyncio.to_thread(_post, port, body, headers)
        _show(console, "answer", status, first)
        status_again, again = await asyncio.to_thread(_post, port, body, headers)
        same = (status_again, again) == (status, first)
        _show(console, "retry, same Idempotency-Key", status_again, again)
        console.print(
            "[green]✓[/] same answer, released once" if same else "[red]✗ the retry differed[/]"
        )
        refused_headers = {**headers, "rokt-tag-id": "tag-9", "Idempotency-Key": f"x-{tag}"}
        refused_status, refused = await asyncio.to_thread(_post, port, body, refused_headers)
        _show(console, "rokt-tag-id: tag-9 (not the partner's)", refused_status, refused)
    released: list[Any] = orjson.loads(first).get("items", []) if status == 200 else []
    return status == 200 and same and refused_status == 403 and len(released) == 1


def _show(console: Console, what: str, status: int, body: bytes) -> None:
    console.print(f"[bold]{what}[/] → HTTP {status}")
    console.print_json(body.decode())
