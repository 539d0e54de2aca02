"""What FastAPI costs per request in `release-worker api`, beside bare Starlette.

`python -m bench.api_framework [REQUESTS]`: the api's own app (`worker.api.http`) and the
same answer from a bare Starlette route, each served by uvicorn on 127.0.0.1 and called by
one keep-alive connection, sequentially. The answer is fixed (a 422 body), so the time
is the framework's and the server's, not Kafka's: the difference per request is what
FastAPI adds (header parameters, routing, its Response) for the OpenAPI it generates.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from worker.api.http import create_app
from worker.api.service import HttpAnswer

ANSWER = HttpAnswer(422, {"description": "d", "errors": [{"code": "c", "message": "m"}]})
HEADERS = {"rokt-api-key": "k", "rokt-session-id": "s", "rokt-tag-id": "t"}


class _Fixed:
    async def answer(self, request: Request) -> HttpAnswer:
        await request.body()
        return ANSWER


async def bare(request: Request) -> Response:
    answer = await _Fixed().answer(request)
    return Response(orjson.dumps(answer.body), answer.status, media_type="application/json")


@contextlib.asynccontextmanager
async def serving(app: object) -> AsyncIterator[int]:
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, access_log=False)  # type: ignore[arg-type]
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110  (uvicorn sets a flag, no event)
        await asyncio.sleep(0.01)
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        await task


async def per_request_us(app: object, count: int) -> float:
    """Sequential requests on one keep-alive connection, each written in one piece (a
    client that writes headers and body apart meets Nagle's algorithm and delayed ACKs:
    40 ms a request, whatever the server)."""
    async with serving(app) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        headers = "".join(f"{k}: {v}\r\n" for k, v in HEADERS.items())
        request = (
            f"POST /v1/cart/release HTTP/1.1\r\nhost: x\r\n{headers}"
            "content-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
        ).encode()

        async def one() -> None:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)

        for _ in range(200):  # warm up
            await one()
        started = time.perf_counter()
        for _ in range(count):
            await one()
        elapsed = time.perf_counter() - started
        writer.close()
        return 1e6 * elapsed / count


async def main(count: int) -> None:
    fastapi_app = create_app(_Fixed(), lambda: True, lambda: True)
    starlette_app = Starlette(routes=[Route("/v1/cart/release", bare, methods=["POST"])])
    for name, app in (("starlette", starlette_app), ("fastapi", fastapi_app)) * 2:
        print(f"{name:>9}: {await per_request_us(app, count):7.0f} µs a request")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 3000))
