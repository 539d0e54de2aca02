"""Instructions per request of `release-worker api`'s own code, without Kafka.

    python -m bench.api_callgrind [--requests 1000] [--fixed] [--callgrind]

The api's app (`worker.api.http.create_app`) with the real `ReleaseService` (checks,
authentication with a cached partner, waiters, the 200 body), served by uvicorn
(httptools) on uvloop as `release-worker api` serves it, and called by one keep-alive
connection in the same process, sequentially: 3-item releases with an eventId and the
same `Idempotency-Key`. The producer is a fake that offers the three results to the
waiters at once, so neither the broker nor aiokafka is measured. `--fixed`: a fixed 422
answer instead of the service (the HTTP stack alone). The client's own work is counted
too, the same for every version.

It prints the process's CPU µs per request (a loaded-machine figure). With `--callgrind`
it runs itself again under valgrind with instrumentation off, switched on (`callgrind_control
-i on`) for the measured requests only, and prints instructions per request: repeatable
under load. Run the base and a change the same way, from their own checkouts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import orjson
import uvicorn
from starlette.requests import Request

from bench.callgrind import count, run_on, toggle
from worker.api.http import create_app
from worker.api.service import HttpAnswer, ReleaseService
from worker.api.waiters import Waiters
from worker.auth import Authenticator, Partner, key_digest
from worker.contract import EVENT_ID_HEADER, PARTNER_ID_HEADER
from worker.validate import Limits

KEY = "rk_bench_partner_key"
PARTNER = Partner("p1", key_digest(KEY), ("tag1",), "active")
ITEMS = [{"cartItemId": f"ci{i}", "itemReservationId": f"r{i}"} for i in range(3)]
WARMUP = 300


async def _lookup(digests: list[bytes]) -> list[Partner]:
    return [PARTNER] if PARTNER.api_key_sha256 in digests else []


class _Producer:
    """Acknowledges at once and offers the record's three results to the waiters."""

    def __init__(self, waiters: Waiters) -> None:
        self._waiters = waiters

    async def send_and_wait(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        assert value is not None
        event_id = orjson.loads(value)["eventId"].encode()
        loop = asyncio.get_running_loop()
        for item in ITEMS:
            result = orjson.dumps(
                {"type": "item_result", "success": True, "outcome": "released", **item}
            )
            headers_ = [(PARTNER_ID_HEADER, b"p1"), (EVENT_ID_HEADER, event_id)]
            loop.call_soon(self._waiters.offer, headers_, result)


class _Fixed:
    async def answer(self, request: Request) -> HttpAnswer:
        await request.body()
        return HttpAnswer(422, {"description": "d", "errors": [{"code": "c", "message": "m"}]})


async def measure(requests: int, fixed: bool, callgrind: bool = False) -> float:
    """CPU µs per request of this process over the measured requests."""
    waiters = Waiters(10_000)
    service = ReleaseService(
        producer=_Producer(waiters),
        authenticator=Authenticator(_lookup, 60),
        waiters=waiters,
        input_topic="in",
        limits=Limits(),
        timeout_s=10,
    )
    app = create_app(_Fixed() if fixed else service, lambda: True, lambda: True)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        http="httptools",
        lifespan="off",
        log_config=None,
        access_log=False,
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110  (uvicorn sets a flag, no event)
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    status = b"HTTP/1.1 422" if fixed else b"HTTP/1.1 200"

    async def one(n: int) -> None:
        event_id = f"ev-{n:08d}"
        body = orjson.dumps({"cartId": f"cart-{n}", "eventId": event_id, "items": ITEMS})
        head = (
            f"POST /v1/cart/release HTTP/1.1\r\nhost: x\r\nrokt-api-key: {KEY}\r\n"
            f"rokt-session-id: s1\r\nrokt-tag-id: tag1\r\nidempotency-key: {event_id}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        )
        writer.write(head.encode() + body)  # one piece: no Nagle / delayed-ACK stall
        answer = await reader.readuntil(b"\r\n\r\n")
        assert answer.startswith(status), answer
        length = int(answer.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)

    for n in range(WARMUP):
        await one(n)
    if callgrind:
        toggle(True)
    started = time.process_time()
    for n in range(WARMUP, WARMUP + requests):
        await one(n)
    cpu_s = time.process_time() - started
    if callgrind:
        toggle(False)
    writer.close()
    server.should_exit = True
    await serving
    return 1e6 * cpu_s / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--fixed", action="store_true", help="a fixed answer, no service")
    parser.add_argument("--callgrind", action="store_true", help="count instructions")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:  # the child under valgrind (bench.callgrind.count)
        cpu_us = run_on(measure(args.requests, args.fixed, callgrind=True), "uvloop")
        print(json.dumps({"items": args.requests, "worker_cpu_us_per_item": cpu_us}))
    elif args.callgrind:
        options = ["--requests", str(args.requests), *(["--fixed"] if args.fixed else [])]
        figures = count("bench.api_callgrind", options)
        print(f"{figures['instructions_per_item']:,.0f} instructions a request")
    else:
        cpu_us = run_on(measure(args.requests, args.fixed), "uvloop")
        print(f"{cpu_us:.0f} µs CPU a request")


if __name__ == "__main__":
    main()
