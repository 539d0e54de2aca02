"""The Kafka open loop stamps each record with the time it was due, so a stalled
producer shows in the latency instead of hiding it (coordinated omission)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import pytest

from bench.workload import Scenario, Workload, produce
from worker.testing.scenario import Event


class StallingSender:
    """Takes records as a producer would, but the `stall_at`-th send blocks `stall_s`."""

    def __init__(self, stall_at: int, stall_s: float) -> None:
        self.stall_at, self.stall_s = stall_at, stall_s
        self.sent: list[tuple[int, float]] = []  # (timestamp_ms given, wall ms when sent)

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: Sequence[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[Any]:
        if len(self.sent) == self.stall_at:
            await asyncio.sleep(self.stall_s)
        assert timestamp_ms is not None
        self.sent.append((timestamp_ms, time.time() * 1000))
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


def _workload(count: int) -> Workload:
    events = [Event(b"k%d" % n, b"{}", ()) for n in range(count)]
    return Workload(Scenario("steady", count), "p", "x-", events, [f"e{n}" for n in range(count)])


async def test_open_loop_stamps_each_record_when_it_was_due_not_when_it_went_out() -> None:
    rate, count, stall_at = 200.0, 40, 5
    sender = StallingSender(stall_at, stall_s=0.1)
    sent_at: dict[str, int] = {}
    await produce(sender, "t", _workload(count), range(count), sent_at, rate)

    stamps = [stamp for stamp, _ in sender.sent]
    # The schedule, 5 ms apart, whatever the stall did to the sends.
    for n, stamp in enumerate(stamps):
        assert stamp - stamps[0] == pytest.approx(n * 1000 / rate, abs=1)
    assert [sent_at[f"e{n}"] for n in range(count)] == stamps
    # The records due during the stall went out late: their stamps are earlier than
    # their sends by about the stall, which a stamp taken at send time would have hidden.
    late = [wall - stamp for stamp, wall in sender.sent[stall_at : stall_at + 10]]
    assert min(late) >= 40


async def test_as_fast_as_possible_stamps_each_record_when_it_went_out() -> None:
    sender = StallingSender(stall_at=3, stall_s=0.05)
    sent_at: dict[str, int] = {}
    await produce(sender, "t", _workload(10), range(10), sent_at)

    # Stamped as each record is handed over: the stalled send delays the next stamp.
    assert sender.sent[4][0] - sender.sent[3][0] >= 45
    assert all(0 <= wall - stamp < 5 for stamp, wall in sender.sent[4:])
