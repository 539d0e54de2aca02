"""Watching a system under test from outside: its result records and its memory."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import orjson

from bench.cpu import cpu_seconds
from worker.contract import EVENT_ID_HEADER
from worker.testing.topic_reader import reading


@dataclass
class Collected:
    """Results read back, reduced to what the figures and the checks need."""

    expected_items: int
    results: int = 0  # result records read, duplicates included
    distinct: set[tuple[str, str]] = field(default_factory=set)
    outcomes: Counter[str] = field(default_factory=Counter)
    rejections: int = 0
    per_event: Counter[str] = field(default_factory=Counter)
    # Per completed record: (result timestamp ms, read time ms, input timestamp ms).
    completions: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return len(self.distinct) >= self.expected_items


class ResultReader:
    """Reads a results topic from the beginning (no group) until every item has a result.

    `sent_at` maps an eventId to its input record's timestamp; `items_of` says how many
    results make a record complete. Bodies are parsed (orjson) to count outcomes and
    distinct (eventId, itemReservationId): duplicates are legal (at least once).
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        expected_items: int,
        sent_at: Mapping[str, int],
        items_per_record: int,
        partitions: int,
    ) -> None:
        self._bootstrap = bootstrap
        self._topic = topic
        self._sent_at = sent_at
        self._items = items_per_record
        self._partitions = partitions
        self.collected = Collected(expected_items)
        self._progress = asyncio.Event()

    async def reached(self, items: int) -> None:
        """Wait until `items` distinct results have been read."""
        while len(self.collected.distinct) < items:
            self._progress.clear()
            await self._progress.wait()

    async def run(self, stall_s: float, on_progress: Callable[[int], None] | None = None) -> None:
        """Read until complete, or until nothing new arrived for `stall_s`."""
        async with reading(
            self._bootstrap,
            self._topic,
            self._partitions,
            fetch_max_wait_ms=100,
            max_partition_fetch_bytes=4 * 1024 * 1024,
            fetch_max_bytes=32 * 1024 * 1024,
        ) as reader:
            last_new = time.monotonic()
            c = self.collected
            while not c.complete and time.monotonic() - last_new < stall_s:
                records = await reader.batch(timeout_ms=100, max_records=10_000)
                now_ms = int(time.time() * 1000)
                for m in records:
                    self._take(m.value, m.headers, m.timestamp, now_ms)
                if records:
                    self._progress.set()
                    last_new = time.monotonic()
                    if on_progress is not None:
                        on_progress(len(c.distinct))

    def _take(
        self, value: bytes, headers: Sequence[tuple[str, bytes]], ts_ms: int, now_ms: int
    ) -> None:
        c = self.collected
        c.results += 1
        body = orjson.loads(value)
        if body.get("type") != "item_result":
            c.rejections += 1
            return
        event_id = next((v.decode() for k, v in headers if k == EVENT_ID_HEADER), "")
        key = (event_id, body["itemReservationId"])
        if key in c.distinct:
            return
        c.distinct.add(key)
        c.outcomes[body["outcome"]] += 1
        c.per_event[event_id] += 1
        if c.per_event[event_id] == self._items and event_id in self._sent_at:
            c.completions.append((ts_ms, now_ms, self._sent_at[event_id]))


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM), in MiB; 0 if it is gone."""
    return _status_mb(pid, "VmHWM:")


def _status_mb(pid: int, field: str) -> float:
    """A kB `field` of /proc/<pid>/status, in MiB; 0 if the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def rss_mb(pid: int) -> float:
    """The process's resident set (VmRSS), in MiB; 0 if it is gone."""
    return _status_mb(pid, "VmRSS:")


class Processes:
    """Systems under test as child processes (`python -m ...`), their memory sampled."""

    def __init__(
        self,
        module_args: list[str],
        env: Mapping[str, str],
        log: Path,
        count: int = 1,
        profile: Path | None = None,
    ):
        self._args = [sys.executable, "-m", *module_args]
        self._env = {**os.environ, **env}
        self._log = log
        self._count = count
        self._profile = profile
        self.procs: list[subprocess.Popen[bytes]] = []
        self.profilers: list[subprocess.Popen[bytes]] = []
        self.memory: list[tuple[float, float]] = []  # (unix time s, total RSS MiB)
        self.peaks: list[float] = []
        self.cpu_s: list[float] = []
        self._sampler: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._log.parent.mkdir(parents=True, exist_ok=True)
        with self._log.open("ab") as log:
            for _ in range(self._count):
                self.procs.append(
                    subprocess.Popen(self._args, env=self._env, stdout=log, stderr=log)
                )
            if self._profile is not None:
                self.profilers = [self._attach_profiler(p.pid, log) for p in self.procs]
        self._sampler = asyncio.create_task(self._sample())

    def _attach_profiler(self, pid: int, log: IO[bytes]) -> subprocess.Popen[bytes]:
        """py-spy (the `bench` extra) sampling the process until it exits: collapsed stacks
        (`<name>.txt`, for `bench.profile`) and a flame graph (`<name>.svg`)."""
        assert self._profile is not None
        spy = Path(sys.executable).parent / "py-spy"
        out = self._profile.with_name(f"{self._profile.stem}-{pid}.txt")
        command = [
            str(spy),
            "record",
            "--pid",
            str(pid),
            "--rate",
            "200",
            "--idle",
            "--format",
            "raw",
        ]
        return subprocess.Popen([*command, "-o", str(out)], stdout=log, stderr=log)

    async def _sample(self) -> None:
        while True:
            self.memory.append((time.time(), sum(rss_mb(p.pid) for p in self.procs)))
            await asyncio.sleep(0.25)

    def failed(self) -> str | None:
        for p in self.procs:
            if p.poll() is not None:
                return f"{' '.join(self._args[1:])} exited with {p.returncode} (log: {self._log})"
        return None

    async def stop(self, timeout_s: float = 40.0) -> list[int | None]:
        """SIGTERM every process (G5: they drain and exit 0); return their exit codes."""
        self.peaks = [peak_rss_mb(p.pid) for p in self.procs]
        self.cpu_s = [cpu_seconds(p.pid) for p in self.procs]
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes: list[int | None] = []
        for p in self.procs:
            try:
                codes.append(await asyncio.to_thread(p.wait, timeout_s))
            except subprocess.TimeoutExpired:
                p.kill()
                codes.append(None)
        for profiler in self.profilers:
            await asyncio.to_thread(profiler.wait, timeout_s)
        return codes


@contextlib.asynccontextmanager
async def stopped_by_signals(
    signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
) -> AsyncIterator[None]:
    """For the block, SIGTERM and SIGINT cancel the task that entered it instead of ending
    the process at once (SIGTERM's default), so its `finally` blocks run: the bench's
    `Processes.stop` stops the workers and baselines it started (they drain, G5) and the
    embedded servers are stopped. A second signal while they stop is ignored."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    cancelled: list[int] = []

    def cancel(sig: signal.Signals) -> None:
        if not cancelled:
            cancelled.append(sig)
            task.cancel(f"stopped by {sig.name}")

    for sig in signals:
        loop.add_signal_handler(sig, cancel, sig)
    try:
        yield
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
