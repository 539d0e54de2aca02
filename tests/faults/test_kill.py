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
        # Kill points spread over the stream, each a little after a database commit
        # (0-150 ms: often inside the next transaction, or before its results are sent).
        # At least 4 kills; more (up to 8) only until both cases below have been seen,
        # so that bad luck in the timing cannot fail the test.
        total = len(stream.events)
        step = total * 8 // 10 // 8
        targets = [total // 10 + n * step + bed.rng.randrange(step) for n in range(8)]
        kills: list[tuple[int, int, int]] = []

        def both_cases_seen() -> bool:
            return any(behind > 0 for _, behind, _ in kills) and any(
                left > 0 for _, _, left in kills
            )

        for target in targets:
            if len(kills) >= 4 and both_cases_seen():
                break
            worker = await bed.start_worker()
            # Each worker applies something before it dies, at the latest from its target on.
            await bed.wait_applied(max(target, kills[-1][0] + 1 if kills else 1), timeout_s=60)
            await asyncio.sleep(bed.rng.uniform(0, 0.15))
            await worker.kill()
            applied = await bed.applied()
            left = await bed.outbox_left() + await bed.unpublished_left()
            kills.append((applied, applied - await bed.kafka_committed(), left))
        await rest
        # The case the kills are for: the database ahead of Kafka's offsets when the worker
        # died, so its successor must resume from the database (Kafka would repeat).
        assert any(behind > 0 for _, behind, _ in kills), f"no kill left Kafka behind: {kills}"
        # And a kill between a commit and the broker's acknowledgement of its fresh results
        # (inbox rows above the published watermark): the successor republishes them.
        assert any(left > 0 for _, _, left in kills), f"no kill left results unpublished: {kills}"
        final = await bed.start_worker()
        await bed.check(
            stream,
            "kill -9 at "
            + "; ".join(
                f"{a} records applied (Kafka offsets {d} behind, {o} outbox rows or inbox rows "
                "above the watermark)"
                for a, d, o in kills
            ),
        )
        code, seconds = await final.terminate(30)
        print(f"[fault] final worker SIGTERM: exit {code} after {seconds:.1f}s")
        assert code == 0
