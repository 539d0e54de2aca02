"""Run the worker's long-lived tasks so that none dies silently (DESIGN.md §7).

A supervised task runs until it is cancelled. If it ends otherwise, by raising or by
returning, the supervisor logs that once (`task_failed`, with the traceback), counts it
(`release_worker_task_failures_total{task}`) and then either

- restarts it after a backoff (capped exponential; it starts over once the task has
  run for `reset_after_s`), the policy for the background passes (outbox relay and
  deleter, health watcher, sweeper, pruner), each of which only delays work when it
  is down; or
- sets `failed`, after which the worker shuts down and exits non-zero: the policy for
  the consumer, and for any task whose failure is fatal (`worker/retry.py`).

Cancellation is never a failure, and after `draining()` a task that returns has simply
finished (the consumer returns once it was asked to stop).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

from worker import metrics
from worker.retry import Verdict, classify

log = structlog.get_logger("worker.supervisor")


class TaskEnded(Exception):
    """A task meant to run until cancelled returned."""


class Supervisor:
    def __init__(
        self, backoff_initial_s: float, backoff_max_s: float, reset_after_s: float = 60.0
    ) -> None:
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._reset_after_s = reset_after_s
        self._tasks: list[asyncio.Task[None]] = []
        self._draining = False
        self.failed = asyncio.Event()

    def start(
        self, name: str, run: Callable[[], Awaitable[None]], *, restart: bool = True
    ) -> asyncio.Task[None]:
        """Run `run()` under supervision; the returned task never raises (but when cancelled)."""
        task = asyncio.create_task(self._keep(name, run, restart), name=name)
        self._tasks.append(task)
        return task

    def draining(self) -> None:
        """From now on a task that returns has finished its work; it is not restarted."""
        self._draining = True

    async def close(self) -> None:
        """Cancel every task and wait for them."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _keep(self, name: str, run: Callable[[], Awaitable[None]], restart: bool) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            started = loop.time()
            try:
                await run()
            except Exception as error:  # CancelledError is not an Exception: it goes through
                failure: Exception = error
            else:
                if self._draining:
                    return
                failure = TaskEnded(f"{name} returned; it should run until cancelled")
            metrics.TASK_FAILURES.labels(task=name).inc()
            if not restart or classify(failure) is Verdict.FATAL:
                log.error("task_failed", task=name, restart=False, exc_info=failure)
                self.failed.set()
                return
            failures = 1 if loop.time() - started >= self._reset_after_s else failures + 1
            delay = min(self._backoff_max_s, self._backoff_initial_s * 2 ** (failures - 1))
            log.error("task_failed", task=name, restart=True, restart_in_s=delay, exc_info=failure)
            await asyncio.sleep(delay)
