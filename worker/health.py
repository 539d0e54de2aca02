"""Health and metrics: `/metrics` (Prometheus), `/healthz` (alive), `/readyz` (ready).

The endpoints are served by `OpsServer` from a thread of their own, running its own
event loop, so they answer even when the worker's event loop does not, and can tell a
blocked loop from a live one. The worker's side is `watch`: every half second it beats
the heartbeat and samples the consumer's progress into `Health`; the HTTP thread only
reads it. Clients cannot exhaust the server: see `OpsServer` for its bounds.

Alive means making progress, not merely running (a consumer can sit alive and
stuck, aiokafka #1154). `/healthz` fails when the event loop stopped ticking, or
when for `stall_timeout_s` one of these held while the database and broker were
reachable: records waited (lag > 0) and no batch committed; the consumer was out
of its group (revoked, never re-assigned); an assigned, unpaused partition got no
fetch response (its high-water mark, and so the lag, would be stale). Outages
show in `/readyz` instead: restarting the process would not bring a database back.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from aiokafka import TopicPartition
from prometheus_client import REGISTRY
from prometheus_client.exposition import choose_encoder

from worker import metrics
from worker.errors import StartupError

TICK_S = 0.5
# A healthy consumer long-polls each partition about every half second; silence longer
# than this is worth counting (below it the stall gauge stays at 0).
FETCH_SILENCE_S = 5.0


class ProgressSource(Protocol):
    """What the worker's consumer tells about its progress (`consumer.ReleaseConsumer`)."""

    joined: bool
    last_progress: float  # time.monotonic() of the last batch committed to the database

    def lag(self) -> int: ...


class FetchView(Protocol):
    """The public parts of `AIOKafkaConsumer` that show whether it still fetches."""

    def assignment(self) -> set[TopicPartition]: ...

    def paused(self) -> set[TopicPartition]: ...

    def last_poll_timestamp(self, partition: TopicPartition) -> int | None: ...


@dataclass(frozen=True, slots=True)
class Sample:
    lag: int
    last_progress: float
    joined: bool
    fetch_age_s: float  # oldest fetch response among assigned, unpaused partitions
    dependencies_ok: bool


class StallClock:
    """Turns samples into "stuck for N seconds, because …" (0 when not stuck)."""

    def __init__(self) -> None:
        self._lag_since: float | None = None
        self._unjoined_since: float | None = None

    def update(self, now: float, sample: Sample) -> tuple[float, str]:
        if not sample.dependencies_ok:
            # Waiting out an outage is not being stuck; the clocks restart when it ends.
            self._lag_since = self._unjoined_since = None
            return 0.0, ""
        lag_stall = 0.0
        if sample.lag > 0:
            self._lag_since = now if self._lag_since is None else self._lag_since
            lag_stall = now - max(self._lag_since, sample.last_progress)
        else:
            self._lag_since = None
        fetch_silence = sample.fetch_age_s if sample.fetch_age_s > FETCH_SILENCE_S else 0.0
        unjoined = 0.0
        if sample.joined:
            self._unjoined_since = None
        else:
            self._unjoined_since = now if self._unjoined_since is None else self._unjoined_since
            unjoined = now - self._unjoined_since
        return max(
            (lag_stall, f"lag {sample.lag} with no batch committed"),
            (unjoined, "not in the consumer group (no partition assignment)"),
            (fetch_silence, "no fetch response from the broker"),
        )


@dataclass
class Health:
    """State the probes read; written by the event loop (`watch`), read by HTTP threads."""

    stall_timeout_s: float = 120.0
    loop_block_limit_s: float = 10.0
    heartbeat: float = field(default_factory=time.monotonic)
    database_ok: bool = False
    broker_ok: bool = False
    joined: bool = False
    stalled_s: float = 0.0
    stall_reason: str = ""
    # Set once the consumer runs; until then the worker is starting, alive and not ready.
    progress: ProgressSource | None = None
    fetch: FetchView | None = None

    def ready(self) -> tuple[bool, str]:
        problems = [
            name
            for name, ok in (
                ("database", self.database_ok),
                ("broker", self.broker_ok),
                ("group", self.joined),
            )
            if not ok
        ]
        return not problems, "ready" if not problems else "not ready: " + ", ".join(problems)

    def alive(self) -> tuple[bool, str]:
        blocked = time.monotonic() - self.heartbeat
        if blocked > self.loop_block_limit_s:
            return False, f"event loop blocked for {blocked:.1f}s"
        if self.stalled_s > self.stall_timeout_s:
            return False, f"stalled for {self.stalled_s:.0f}s: {self.stall_reason}"
        return True, "alive"

    def sample(self, now_ms: float) -> Sample | None:
        if self.progress is None or self.fetch is None:
            return None
        assigned = self.fetch.assignment()
        polled = [self.fetch.last_poll_timestamp(tp) for tp in assigned - self.fetch.paused()]
        oldest = min((t for t in polled if t is not None), default=None)
        return Sample(
            lag=self.progress.lag(),
            last_progress=self.progress.last_progress,
            joined=self.progress.joined,
            fetch_age_s=0.0 if oldest is None else max(0.0, (now_ms - oldest) / 1000),
            dependencies_ok=self.database_ok and self.broker_ok,
        )


async def watch(health: Health, tick_s: float = TICK_S) -> None:
    """Beat the heartbeat and refresh progress, readiness and partition gauges, forever."""
    clock = StallClock()
    labelled: set[str] = set()
    while True:
        now = time.monotonic()
        health.heartbeat = now
        sample = health.sample(time.time() * 1000)
        if sample is not None:
            health.joined = sample.joined
            health.stalled_s, health.stall_reason = clock.update(now, sample)
            assert health.fetch is not None
            labelled = _forget_partitions(labelled, health.fetch.assignment())
        metrics.STALLED.set(health.stalled_s)
        metrics.READY.set(1 if health.ready()[0] else 0)
        due = time.monotonic() + tick_s
        await asyncio.sleep(tick_s)
        metrics.LOOP_DELAY.set(max(0.0, time.monotonic() - due))


def _forget_partitions(labelled: set[str], assigned: Iterable[TopicPartition]) -> set[str]:
    """Drop the per-partition series of partitions this worker no longer owns."""
    current = {str(tp.partition) for tp in assigned}
    for gone in labelled - current:
        for gauge in (metrics.LAG, metrics.COMMITTED):
            with contextlib.suppress(KeyError):
                gauge.remove(gone)
    metrics.ASSIGNED.set(len(current))
    return current


# The HTTP server's bounds (DESIGN §7: no number of idle clients silences /healthz).
MAX_CONNECTIONS = 64
REQUEST_TIMEOUT_S = 5.0  # to send the request and take the whole answer
MAX_REQUEST_HEAD = 16 * 1024
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 503: "Service Unavailable"}


class OpsServer:
    """`/metrics`, `/healthz` and `/readyz` over HTTP/1.1, one request per connection.

    Bounds, whatever clients do: one thread (its event loop holds every connection, so
    an idle client costs a socket, not a thread); at most `MAX_CONNECTIONS` connections,
    and when one more arrives, the oldest that has not sent its request yet is dropped,
    so a probe that sends its request at once is served however many clients sit idle;
    `REQUEST_TIMEOUT_S` per connection to send the request and read the answer, then it
    is closed. A request head over `MAX_REQUEST_HEAD` bytes is dropped unanswered.

    The standard library's WSGI server (one thread per connection, no timeout) grew a
    thread per idle client. Neither waitress (it stops accepting at its connection limit,
    so idle clients make probes wait for their timeout) nor uvicorn (no timeout before a
    connection's first request; 503 to everyone past its concurrency limit) keeps that
    promise, hence these few lines over asyncio streams.
    """

    def __init__(self, health: Health, host: str, port: int) -> None:
        self._health = health
        # Connection -> still waiting for its request; in arrival order, oldest first.
        self._connections: dict[asyncio.StreamWriter, bool] = {}
        self._handlers: set[asyncio.Task[None]] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ops-http", daemon=True)
        self._thread.start()
        listening = asyncio.start_server(self._serve, host, port, limit=MAX_REQUEST_HEAD)
        try:
            self._server = asyncio.run_coroutine_threadsafe(listening, self._loop).result()
        except OSError as error:
            self._end_thread()
            raise StartupError(
                f"Cannot serve /metrics on {host}:{port} ({error.strerror}): "
                "set WORKER_METRICS_PORT (or WORKER_METRICS_HOST) to a free one, or 0 for none."
            ) from error

    def close(self) -> None:
        """Stop listening, drop every connection and end the thread."""
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result()
        self._end_thread()

    def _end_thread(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    async def _stop(self) -> None:
        self._server.close()
        for writer in list(self._connections):
            writer.transport.abort()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    def _make_room(self) -> None:
        if len(self._connections) < MAX_CONNECTIONS:
            return
        idle = next((w for w, waiting in self._connections.items() if waiting), None)
        if idle is not None:
            idle.transport.abort()  # its handler sees the end of the stream and returns
            del self._connections[idle]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._make_room()
        if len(self._connections) >= MAX_CONNECTIONS:  # every slot is answering: no room
            writer.transport.abort()
            return
        self._connections[writer] = True
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
                self._connections[writer] = False
                writer.write(self._answer(head))
                await writer.drain()
                writer.close()
                await writer.wait_closed()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass  # idle, too slow, too large or gone: dropped below
        finally:
            self._connections.pop(writer, None)
            self._handlers.discard(handler)
            # A no-op once closed; otherwise (even mid-close, answer unread) it drops the
            # socket now instead of waiting for a client that may never read.
            writer.transport.abort()

    def _answer(self, head: bytes) -> bytes:
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return _response(400, "text/plain", b"bad request\n")
        path = parts[1].split("?", 1)[0]
        if path in ("/healthz", "/readyz"):
            ok, text = self._health.alive() if path == "/healthz" else self._health.ready()
            return _response(200 if ok else 503, "text/plain", text.encode() + b"\n")
        if path == "/metrics":
            headers = dict(line.partition(":")[::2] for line in header_lines if line)
            accept = next((v for k, v in headers.items() if k.strip().lower() == "accept"), "")
            encode, content_type = choose_encoder(accept.strip())
            return _response(200, content_type, encode(REGISTRY))
        return _response(404, "text/plain", b"try /metrics, /healthz or /readyz\n")


def _response(status: int, content_type: str, body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


@contextlib.asynccontextmanager
async def serving(health: Health, host: str, port: int) -> AsyncIterator[None]:
    """The endpoints (unless port is 0) and the `watch` ticker, for the block's duration."""
    server = OpsServer(health, host, port) if port else None
    ticker = asyncio.create_task(watch(health))
    try:
        yield
    finally:
        ticker.cancel()
        await asyncio.gather(ticker, return_exceptions=True)
        if server is not None:
            await asyncio.to_thread(server.close)
