"""The bench's HTTP load generator keeps an open-loop schedule, and its rate search
converges; no timing is asserted."""

from __future__ import annotations

import asyncio
import time

import pytest

from bench.http import (
    TIMED_OUT,
    Answer,
    OpenLoopClient,
    next_rate,
    offer,
    released_everything,
    shed,
    statuses,
)


async def test_requests_go_out_on_schedule_whatever_the_answers_do() -> None:
    """The server answers nothing until it has received every request: a client that
    waited for an answer before sending the next one would never get there."""
    count = 20
    received: list[bytes] = []
    all_in = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while head := await reader.readuntil(b"\r\n\r\n"):
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
            received.append(await reader.readexactly(length))
            if len(received) == count:
                all_in.set()
            await all_in.wait()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
            await writer.drain()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = OpenLoopClient("127.0.0.1", port, timeout_s=10)
    requests = [
        b"POST / HTTP/1.1\r\ncontent-length: %d\r\n\r\n%d" % (len(str(n)), n) for n in range(count)
    ]
    marks: list[int] = []
    try:
        async with asyncio.timeout(10):
            answers = await offer(client, requests, 400.0, 5, lambda: marks.append(len(received)))
    finally:
        client.close()
        server.close()
        await server.wait_closed()

    assert sorted(received) == sorted(str(n).encode() for n in range(count))
    assert [a.status for a in answers] == [200] * count
    assert len(marks) == 1
    # Each request's latency counts from its own scheduled time, not from when it went out.
    for n, answer in enumerate(answers):
        assert answer.scheduled - answers[0].scheduled == pytest.approx(n / 400.0)
        assert answer.done >= max(a.scheduled for a in answers)


async def test_a_keep_alive_connection_the_server_closed_is_replaced_not_counted_lost() -> None:
    connections = 0

    async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
        await writer.drain()
        writer.close()  # idle timeout, as uvicorn's keep-alive does, without saying so

    server = await asyncio.start_server(answer_once, "127.0.0.1", 0)
    client = OpenLoopClient("127.0.0.1", server.sockets[0].getsockname()[1], timeout_s=10)
    try:
        async with asyncio.timeout(10):
            first = await client.get("/")
            await asyncio.sleep(0.05)  # the close arrives
            second = await client.get("/")
    finally:
        client.close()
        server.close()
        await server.wait_closed()
    assert (first, second, connections) == (200, 200, 2)


async def test_a_request_is_given_up_its_timeout_after_it_was_due_not_after_it_went_out() -> None:
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    client = OpenLoopClient("127.0.0.1", server.sockets[0].getsockname()[1], timeout_s=5)
    try:
        async with asyncio.timeout(10):
            late = await client.send(b"GET / HTTP/1.1\r\n\r\n", time.monotonic() - 60)
    finally:
        client.close()
        server.close()
        await server.wait_closed()
    assert late.status == TIMED_OUT
    assert late.latency_ms >= 60_000
    assert statuses([late]) == {"timed_out": 1}


def test_the_rate_search_climbs_then_bisects_then_stops() -> None:
    assert next_rate([], [], 100) == 100
    assert next_rate([100], [], 100) == 150
    assert next_rate([100, 150], [400], 100) == pytest.approx((150 * 400) ** 0.5)
    assert next_rate([100, 200], [220], 100) is None  # within 15%
    assert next_rate([], [100], 100) == 50
    assert next_rate([200], [150], 100) == 300, "a failure below a pass is noise"
    assert next_rate([], [1.5], 100) is None


def test_only_a_200_releasing_every_item_counts_as_released() -> None:
    def answer(status: int, body: bytes) -> Answer:
        return Answer(0.0, 0.1, status, body)

    item = b'{"cartItemId":"i","itemReservationId":"r","success":true,"outcome":"released"}'
    assert released_everything(answer(200, b'{"cartId":"c","items":[%s]}' % item), 1)
    assert not released_everything(answer(200, b'{"cartId":"c","items":[%s]}' % item), 2)
    other = item.replace(b"released", b"not_found").replace(b"true", b"false")
    assert not released_everything(answer(200, b'{"cartId":"c","items":[%s]}' % other), 1)
    assert not released_everything(answer(504, b"{}"), 0)
    assert not released_everything(answer(200, b"not json"), 0)


def test_only_a_503_that_did_nothing_counts_as_shed_load() -> None:
    """too_many_requests, and database_unavailable (the key lookup did not finish within the
    api's deadline: what an overloaded api answers, docs/api.md), applied nothing; a
    broker_unavailable's record may still have been written."""

    def answer(status: int, code: bytes) -> Answer:
        return Answer(0.0, 0.1, status, b'{"description":"d","errors":[{"code":"%s"}]}' % code)

    assert shed(answer(503, b"too_many_requests"))
    assert shed(answer(503, b"database_unavailable"))
    assert not shed(answer(503, b"broker_unavailable"))
    assert not shed(answer(429, b"too_many_requests"))
    assert not shed(Answer(0.0, 0.1, 503, b"not json"))


async def test_a_request_given_up_before_a_connection_was_free_is_known_never_sent() -> None:
    """Past `max_connections`, requests wait for a connection; one given up while waiting
    never reached the server (the bench must not expect its release), while one given up
    after it was written may have been applied."""
    received: list[bytes] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.readuntil(b"\r\n\r\n"))
        await reader.read()  # never answers

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = OpenLoopClient("127.0.0.1", port, timeout_s=0.3, max_connections=1)
    try:
        async with asyncio.timeout(10):
            now = time.monotonic()
            first, second = await asyncio.gather(
                client.send(b"GET /1 HTTP/1.1\r\n\r\n", now),
                client.send(b"GET /2 HTTP/1.1\r\n\r\n", now),
            )
    finally:
        client.close()
        server.close()
        await server.wait_closed()
    assert (first.status, second.status) == (TIMED_OUT, TIMED_OUT)
    assert (first.sent, second.sent) == (True, False)
    assert received == [b"GET /1 HTTP/1.1\r\n\r\n"]
