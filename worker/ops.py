"""Operations endpoints: `/metrics` (Prometheus), `/healthz` (alive), `/readyz` (ready).

Served from a thread with the standard library's WSGI server, so `/healthz` can
tell a blocked event loop (the loop's heartbeat stops) from a live one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

from worker import metrics


@dataclass
class Health:
    """State the probes read; written by the event loop, read by the HTTP thread."""

    loop_block_limit_s: float = 10.0
    stall_timeout_s: float = 120.0
    heartbeat: float = field(default_factory=time.monotonic)
    database_ok: bool = False
    broker_ok: bool = False
    joined: bool = False
    lag: Callable[[], int] = lambda: 0
    last_progress: Callable[[], float] = time.monotonic

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
        ok = not problems
        metrics.READY.set(1 if ok else 0)
        return ok, "ready" if ok else "not ready: " + ", ".join(problems)

    def alive(self) -> tuple[bool, str]:
        blocked = time.monotonic() - self.heartbeat
        if blocked > self.loop_block_limit_s:
            return False, f"event loop blocked for {blocked:.1f}s"
        stalled = time.monotonic() - self.last_progress()
        if self.lag() > 0 and stalled > self.stall_timeout_s:
            return False, f"lag {self.lag()} with no progress for {stalled:.0f}s"
        return True, "alive"


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


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

    server = make_server(host, port, app, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="ops-http", daemon=True).start()
    return server
