"""`release-worker run` runs the worker on WORKER_EVENT_LOOP's event loop, uvloop unless
told otherwise."""

from __future__ import annotations

import asyncio

import pytest
import uvloop
from typer.testing import CliRunner

from worker.cli.main import app
from worker.config import Settings


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, uvloop.Loop), ("uvloop", uvloop.Loop), ("asyncio", asyncio.SelectorEventLoop)],
)
def test_run_starts_the_worker_on_the_configured_event_loop(
    monkeypatch: pytest.MonkeyPatch, value: str | None, expected: type
) -> None:
    loops: list[asyncio.AbstractEventLoop] = []

    async def run_worker(settings: Settings) -> int:
        loops.append(asyncio.get_running_loop())
        return 0

    monkeypatch.setattr("worker.app.run_worker", run_worker)
    # Not in the test process: the collector's freeze and the logging set-up of a real run.
    monkeypatch.setattr("worker.cli.main.tune_garbage_collector", lambda: None)
    monkeypatch.setattr("worker.logs.configure", lambda *args: None)
    monkeypatch.delenv("WORKER_EVENT_LOOP", raising=False)
    env = {} if value is None else {"WORKER_EVENT_LOOP": value}

    result = CliRunner().invoke(app, ["run"], env=env)

    assert result.exit_code == 0, result.output
    assert len(loops) == 1
    assert isinstance(loops[0], expected)
    assert isinstance(loops[0], uvloop.Loop) == (value != "asyncio")


def test_an_unknown_event_loop_stops_start_up_naming_the_variable() -> None:
    result = CliRunner().invoke(app, ["run"], env={"WORKER_EVENT_LOOP": "trio"})
    assert result.exit_code == 2
    assert "WORKER_EVENT_LOOP" in result.stderr
