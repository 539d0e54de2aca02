"""The HTTP path of the bench: `release-worker api` in front of `release-worker run`.

Requests are offered open loop: each has a scheduled send time (`start + i / rate`) and is
sent then whatever the earlier ones are doing, on as many keep-alive connections as the
backlog needs; its latency runs from the scheduled time to the end of its answer, so a
server that falls behind is charged for the queue it causes (no coordinated omission).
The client speaks just enough HTTP/1.1 for the api's answers (a status line, headers, a
`content-length` body) over asyncio streams, so that the load generator costs far less CPU
than the system it measures on a machine they share.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import orjson

from worker.testing.scenario import Event

RELEASE_PATH = "/v1/cart/release"
IDEMPOTENCY_HEADER = "idempotency-key"
# Statuses of a request without an HTTP answer: the connection was lost, or the client gave
# up waiting (`OpenLoopClient.timeout_s` after the request was due).
LOST = 0
TIMED_OUT = 1


@dataclass(frozen=True, slots=True)
class Answer:
    scheduled: float  # time.monotonic() at which the request was due
    done: float  # time.monotonic() at which its answer was read
    status: int
    body: bytes
    # Whether the request was written to a connection: one given up before (waiting for a
    # free connection past `max_connections`) never reached the server.
    sent: bool = True

    @property
    def latency_ms(self) -> float:
        return 1000 * (self.done - self.scheduled)


def request_bytes(host: str, port: int, event: Event, event_id: str) -> bytes:
    """The input record as the api's request: its headers, its body, its eventId as the
    Idempotency-Key (a retry of it is then harmless)."""
    body = event.value or b""
    headers = [
        *event.headers,
        (IDEMPOTENCY_HEADER, event_id.encode()),
        ("content-length", str(len(body)).encode()),
    ]
    head = f"POST {RELEASE_PATH} HTTP/1.1\r\nhost: {host}:{port}\r\n".encode()
    head += b"".join(name.encode() + b": " + value + b"\r\n" for name, value in headers)
    return head + b"\r\n" + body


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.used = 0  # requests answered on it
        self.idle_since = time.monotonic()

    def write(self, request: bytes) -> None:
        self.writer.write(request)

    async def answer(self) -> tuple[int, bytes, bool]:
        """Read the answer to the request written: (status, body, whether the server keeps
        the connection open)."""
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length, keep = 0, True
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                keep = False
        body = await self.reader.readexactly(length)
        self.used += 1
        return status, body, keep

    def close(self) -> None:
        self.writer.close()


# A server closes a keep-alive connection idle for long (uvicorn: 5 s by default); one idle
# for this long is not reused, and a reused one found closed is replaced once.
IDLE_REUSE_S = 2.0
_LOST = (OSError, asyncio.IncompleteReadError)


class OpenLoopClient:
    """Keep-alive connections to one server, opened as the offered load needs them (at
    most `max_connections`; past that, requests wait for a free one, and the wait counts
    in their latency)."""

    def __init__(self, host: str, port: int, timeout_s: float, max_connections: int = 1024) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self._idle: deque[_Connection] = deque()
        self._slots = asyncio.Semaphore(max_connections)

    async def send(self, request: bytes, scheduled: float) -> Answer:
        """Send `request` on a connection, read its answer. A client gives up `timeout_s`
        after the request was due, the wait for a connection included: TIMED_OUT."""
        connection: _Connection | None = None
        sent = False
        try:
            async with (
                asyncio.timeout(max(0.0, scheduled + self.timeout_s - time.monotonic())),
                self._slots,
            ):
                connection = await self._take()
                connection.write(request)
                sent = True
                try:
                    status, body, keep = await connection.answer()
                except _LOST:
                    if not connection.used:
                        raise
                    # Closed by the server while idle: the request never arrived (the
                    # Idempotency-Key would make even a repeat harmless).
                    connection.close()
                    connection = await self._open()
                    connection.write(request)
                    status, body, keep = await connection.answer()
                done = time.monotonic()
                if keep:
                    connection.idle_since = done
                    self._idle.append(connection)
                else:
                    connection.close()
                return Answer(scheduled, done, status, body)
        except (*_LOST, TimeoutError, ValueError) as error:
            if connection is not None:
                connection.close()
            status = TIMED_OUT if isinstance(error, TimeoutError) else LOST
            return Answer(scheduled, time.monotonic(), status, repr(error).encode(), sent)

    async def _take(self) -> _Connection:
        """The most recently used idle connection (those idle too long are closed: they
        sit at the front, in the order they became idle), or a new one."""
        now = time.monotonic()
        while self._idle and now - self._idle[0].idle_since > IDLE_REUSE_S:
            self._idle.popleft().close()
        return self._idle.pop() if self._idle else await self._open()

    async def get(self, path: str) -> int:
        request = f"GET {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n\r\n".encode()
        return (await self.send(request, time.monotonic())).status

    async def _open(self) -> _Connection:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        return _Connection(reader, writer)

    def close(self) -> None:
        """Close the idle connections."""
        while self._idle:
            self._idle.pop().close()

    async def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while await self.get("/readyz") != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the api on port {self.port} was not ready in {timeout_s} s")
            await asyncio.sleep(0.2)
        self.close()


async def offer(
    client: OpenLoopClient,
    requests: Sequence[bytes],
    rate: float,
    measured_from: int = 0,
    on_measured: Callable[[], None] | None = None,
) -> list[Answer]:
    """Send `requests` open loop at `rate` per second; return every answer, in order.
    `on_measured` is called when request `measured_from` is sent (after a warm-up).

    Due requests are started in 5 ms ticks, each with its own scheduled time, so a late
    tick does not lower the offered rate or hide the lateness."""
    tasks: list[asyncio.Task[Answer]] = []
    started = time.monotonic()
    while len(tasks) < len(requests):
        due = min(len(requests), int((time.monotonic() - started) * rate) + 1)
        while len(tasks) < due:
            if len(tasks) == measured_from and on_measured is not None:
                on_measured()
            at = started + len(tasks) / rate
            tasks.append(asyncio.create_task(client.send(requests[len(tasks)], at)))
        await asyncio.sleep(0.005)
    return list(await asyncio.gather(*tasks))


def released_everything(answer: Answer, items: int) -> bool:
    """A 200 whose every item was released (each request names fresh reservations)."""
    if answer.status != 200:
        return False
    with contextlib.suppress(ValueError, KeyError, TypeError):
        body = orjson.loads(answer.body)
        return len(body["items"]) == items and all(
            item["success"] is True and item["outcome"] == "released" for item in body["items"]
        )
    return False


# The 503s after which nothing was applied (docs/api.md): the api's load shedding, and a
# key lookup that did not finish within WORKER_API_TIMEOUT_S (an overloaded api's answer
# when its requests queue behind one another). `broker_unavailable` is not among them:
# its record may still have been written.
_NOTHING_DONE = frozenset({"too_many_requests", "database_unavailable"})


def shed(answer: Answer) -> bool:
    """A 503 that applied nothing (`too_many_requests`, `database_unavailable`): the client
    is told to retry later."""
    if answer.status != 503:
        return False
    with contextlib.suppress(ValueError, KeyError, TypeError):
        errors = orjson.loads(answer.body)["errors"]
        return any(e["code"] in _NOTHING_DONE for e in errors)
    return False


def statuses(answers: Sequence[Answer]) -> dict[str, int]:
    """How many answers of each status ("lost", "timed_out" for those without one)."""
    names = {LOST: "lost", TIMED_OUT: "timed_out"}
    counted = sorted(Counter(a.status for a in answers).items())
    return {names.get(status, str(status)): n for status, n in counted}


def next_rate(
    passed: Sequence[float], failed: Sequence[float], start: float, resolution: float = 1.15
) -> float | None:
    """The next rate to try when looking for the highest one that passes: up by half
    until one fails, down by half until one passes, then halfway (geometrically) between
    the best pass and the lowest failure above it until they are within `resolution`;
    None when done. (A failure below a pass, noise, does not stop the climb.)"""
    if not passed:
        low = min(failed, default=start * 2) / 2
        return low if low >= 1 else None
    best = max(passed)
    above = [rate for rate in failed if rate > best]
    if not above:
        return best * 1.5
    worst = min(above)
    return None if worst / best <= resolution else (best * worst) ** 0.5
