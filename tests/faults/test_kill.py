"""kill -9 of the worker at random moments of a 10,000-record stream; restart; drain."""

from __future__ import annotations

import asyncio

import pytest

from tests.faults.conftest import BedFactory

pytestmark = pytest.mark.faults


async def test_kill_9_at_random_moments_loses_and_repeats_nothing(
    bed_factory: BedFactory,
) -> None:
    # Kafka commits lag the database by up to half a second, so most kills land between
    # a database commit and its offset commit: the restarted worker must resume from the
    # database's offsets, and the outbox rows a kill left behind must still be published.
    async with bed_factory(commit_interval_ms=500) as bed:
        await bed.seed(carts=4_950)
        stream = bed.stream()
        assert len(stream.events) >= 10_000
        half = len(stream.events) // 2
        await bed.produce(stream.events[:half])
        rest = asyncio.create_task(bed.produce(stream.events[half:]))
        kills = []
        applied = 0
        for _ in range(4):
            worker = await bed.start_worker()
            applied = await bed.wait_applied(applied + 1, timeout_s=60)
            await asyncio.sleep(bed.rng.uniform(0.05, 1.2))
            await worker.kill()
            applied = await bed.applied()
            kills.append((applied, applied - await bed.kafka_committed(), await bed.outbox_left()))
        await rest
        final = await bed.start_worker()
        await bed.check(
            stream,
            "kill -9 at "
            + "; ".join(
                f"{a} records applied (Kafka offsets {d} behind, {o} results unpublished)"
                for a, d, o in kills
            ),
        )
        code, seconds = await final.terminate(30)
        print(f"[fault] final worker SIGTERM: exit {code} after {seconds:.1f}s")
        assert code == 0
