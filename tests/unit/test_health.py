"""/healthz means progress: the stall clock and the probes' verdicts, on samples."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

from tests.support import http_get
from worker.health import Health, Sample, StallClock, serving
from worker.testing.embedded import free_port


def sample(
    lag: int = 0,
    last_progress: float = 0.0,
    joined: bool = True,
    fetch_age_s: float = 0.0,
    dependencies_ok: bool = True,
) -> Sample:
    return Sample(lag, last_progress, joined, fetch_age_s, dependencies_ok)


def test_lag_that_appears_after_a_quiet_hour_is_not_a_stall() -> None:
    clock = StallClock()
    assert clock.update(3600.0, sample(lag=0, last_progress=0.0))[0] == 0
    # Records arrive; the last batch was an hour ago, but waiting only just began.
    assert clock.update(3601.0, sample(lag=5, last_progress=0.0))[0] == 0
    stalled, reason = clock.update(3661.0, sample(lag=5, last_progress=0.0))
    assert stalled == 60
    assert "lag 5" in reason


def test_a_committed_batch_restarts_the_stall_clock() -> None:
    clock = StallClock()
    clock.update(0.0, sample(lag=5))
    assert clock.update(100.0, sample(lag=5, last_progress=90.0))[0] == 10


def test_an_outage_is_waiting_not_stalling() -> None:
    clock = StallClock()
    clock.update(0.0, sample(lag=5))
    assert clock.update(500.0, sample(lag=9, dependencies_ok=False)) == (0.0, "")
    # Back from the outage: the clock starts again from there.
    assert clock.update(510.0, sample(lag=9))[0] == 0
    assert clock.update(530.0, sample(lag=9))[0] == 20


def test_out_of_the_group_and_not_fetching_count_as_stalls() -> None:
    clock = StallClock()
    clock.update(0.0, sample(joined=False))
    stalled, reason = clock.update(200.0, sample(joined=False))
    assert stalled == 200
    assert "group" in reason
    stalled, reason = StallClock().update(0.0, sample(fetch_age_s=300.0))
    assert (stalled, "fetch" in reason) == (300.0, True)
    # Half a second between fetch responses is the normal long-poll rhythm.
    assert StallClock().update(0.0, sample(fetch_age_s=0.5))[0] == 0


def test_healthz_fails_on_a_blocked_loop_or_a_long_stall() -> None:
    health = Health(stall_timeout_s=120, loop_block_limit_s=10)
    assert health.alive() == (True, "alive")
    health.heartbeat = time.monotonic() - 11
    ok, text = health.alive()
    assert not ok
    assert "event loop blocked" in text
    health.heartbeat = time.monotonic()
    health.stalled_s, health.stall_reason = 121, "lag 3 with no batch committed"
    ok, text = health.alive()
    assert not ok
    assert "lag 3" in text


def test_readyz_names_what_is_missing() -> None:
    health = Health(database_ok=True, broker_ok=False, joined=False)
    assert health.ready() == (False, "not ready: broker, group")
    health.broker_ok = health.joined = True
    assert health.ready() == (True, "ready")


IDLE_CLIENTS = 300


def _server_threads() -> set[threading.Thread]:
    # asyncio's default executor (asyncio.to_thread below) is the test's, not the server's.
    return {t for t in threading.enumerate() if not t.name.startswith("asyncio_")}


def _closed_by_server(sock: socket.socket, within_s: float) -> bool:
    sock.settimeout(within_s)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


async def test_idle_connections_hold_no_thread_are_timed_out_and_never_silence_healthz() -> None:
    """Real sockets on loopback against the real server (no database or broker needed)."""
    port = free_port()
    before = _server_threads()
    async with serving(Health(), "127.0.0.1", port):
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(IDLE_CLIENTS)]
        try:
            # Accepted in order: once this is answered, so were the idle ones.
            assert await asyncio.to_thread(http_get, port, "/healthz") == (200, "alive\n")
            added = _server_threads() - before
            # The bound health.py documents: one thread, however many connections.
            assert len(added) <= 1, f"{len(added)} threads for {IDLE_CLIENTS} idle clients"
            assert (await asyncio.to_thread(http_get, port, "/metrics"))[0] == 200
            # Every idle client is let go: past the cap at once, the rest after the timeout
            # (30 s is a generous bound for a 5 s timeout, not a speed target).
            closed = await asyncio.to_thread(lambda: sum(_closed_by_server(s, 30.0) for s in idle))
            assert closed == IDLE_CLIENTS
        finally:
            for s in idle:
                s.close()
