"""worker/supervisor.py: a task that dies is logged once, then restarted or stops the worker."""

from __future__ import annotations

import asyncio

import asyncpg
from structlog.testing import capture_logs

from worker.supervisor import Supervisor, TaskEnded


def supervisor() -> Supervisor:
    return Supervisor(backoff_initial_s=0.001, backoff_max_s=0.001)


async def test_a_task_that_raises_is_logged_once_per_death_and_restarted() -> None:
    runs = 0
    third_run = asyncio.Event()

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs < 3:
            raise RuntimeError(f"death {runs}")
        third_run.set()
        await asyncio.Event().wait()  # runs until cancelled

    tasks = supervisor()
    with capture_logs() as logs:
        tasks.start("flaky", flaky)
        await asyncio.wait_for(third_run.wait(), 5)
        await tasks.close()
    deaths = [e for e in logs if e["event"] == "task_failed"]
    assert [(e["task"], e["restart"], str(e["exc_info"])) for e in deaths] == [
        ("flaky", True, "death 1"),
        ("flaky", True, "death 2"),
    ]
    assert not tasks.failed.is_set()


async def test_a_task_that_returns_is_a_failure_too() -> None:
    runs = 0
    restarted = asyncio.Event()

    async def quitter() -> None:
        nonlocal runs
        runs += 1
        if runs == 2:
            restarted.set()

    tasks = supervisor()
    with capture_logs() as logs:
        tasks.start("quitter", quitter)
        await asyncio.wait_for(restarted.wait(), 5)
        await tasks.close()
    assert isinstance(logs[0]["exc_info"], TaskEnded)
    assert logs[0]["restart"] is True


async def test_a_task_not_to_restart_sets_failed_and_stays_down() -> None:
    runs = 0

    async def consumer() -> None:
        nonlocal runs
        runs += 1
        raise KeyError("a bug")

    tasks = supervisor()
    with capture_logs() as logs:
        task = tasks.start("consumer", consumer, restart=False)
        await asyncio.wait_for(tasks.failed.wait(), 5)
        await task  # ended, and did not raise
    assert runs == 1
    assert [(e["event"], e["task"], e["restart"]) for e in logs] == [
        ("task_failed", "consumer", False)
    ]


async def test_a_fatal_failure_stops_the_worker_even_for_a_restartable_task() -> None:
    async def sweeper() -> None:
        raise asyncpg.exceptions.UndefinedTableError('relation "reservations" does not exist')

    tasks = supervisor()
    with capture_logs():
        tasks.start("expiry_sweeper", sweeper)
        await asyncio.wait_for(tasks.failed.wait(), 5)
    await tasks.close()


async def test_cancelling_and_finishing_while_draining_are_not_failures() -> None:
    stop = asyncio.Event()

    async def consumer() -> None:
        await stop.wait()

    async def relay() -> None:
        await asyncio.Event().wait()

    tasks = supervisor()
    with capture_logs() as logs:
        consumer_task = tasks.start("consumer", consumer, restart=False)
        tasks.start("relay", relay)
        await asyncio.sleep(0)
        tasks.draining()
        stop.set()
        await consumer_task
        await tasks.close()
    assert logs == []
    assert not tasks.failed.is_set()
