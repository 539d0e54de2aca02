"""Operations endpoints: `/metrics` (Prometheus), `/healthz` (alive), `/readyz` (ready).

The endpoints are served from threads with the standard library's WSGI server, so
they answer even when the event loop does not, and can tell a blocked loop from a
live one. The loop side is `watch`: every half second it beats the heartbeat and
samples the consumer's progress into `Health`; the HTTP threads only read it.

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
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from aiokafka import TopicPartition
from prometheus_client import make_wsgi_app

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


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    """One thread per request: a slow scrape never holds up a probe."""

    daemon_threads = True


def serve(health: Health, host: str, port: int) -> WSGIServer:
    """Start the endpoints on a daemon thread; `server.shutdown()` stops them."""
    metrics_app = make_wsgi_app()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in ("/healthz", "/readyz"):
            ok, text = health.alive() if path == "/healthz" else health.ready()
            start_response(
                "200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")]
            )
            return [text.encode() + b"\n"]
        if path == "/metrics":
            body: Iterable[bytes] = metrics_app(environ, start_response)
            return body
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"try /metrics, /healthz or /readyz\n"]

    try:
        server = make_server(
            host, port, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler
        )
    except OSError as error:
        raise StartupError(
            f"Cannot serve /metrics on {host}:{port} ({error.strerror}): "
            "set WORKER_METRICS_PORT (or WORKER_METRICS_HOST) to a free one, or 0 for none."
        ) from error
    threading.Thread(target=server.serve_forever, name="ops-http", daemon=True).start()
    return server


@contextlib.asynccontextmanager
async def serving(health: Health, host: str, port: int) -> AsyncIterator[None]:
    """The endpoints (unless port is 0) and the `watch` ticker, for the block's duration."""
    server = serve(health, host, port) if port else None
    ticker = asyncio.create_task(watch(health))
    try:
        yield
    finally:
        ticker.cancel()
        await asyncio.gather(ticker, return_exceptions=True)
        if server is not None:
            await asyncio.to_thread(server.shutdown)
            server.server_close()
