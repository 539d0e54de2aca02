"""Three workers in one group over 12 partitions; one joins and one leaves mid-stream."""

from __future__ import annotations

import asyncio

import pytest

from tests.faults.conftest import BedFactory

pytestmark = pytest.mark.faults


async def test_members_joining_and_leaving_mid_stream_lose_and_repeat_nothing(
    bed_factory: BedFactory,
) -> None:
    async with bed_factory(partitions=12, batch_max_records=100, session_timeout_ms=6000) as bed:
        await bed.seed(carts=3_000)
        stream = bed.stream()
        producing = asyncio.create_task(bed.produce_paced(stream.events, seconds=24))
        first, second = await bed.start_worker(), await bed.start_worker()
        await bed.wait_log(first, "partitions_assigned")
        await bed.wait_log(second, "partitions_assigned")
        third = await bed.start_worker()
        await bed.wait_log(third, "partitions_assigned")
        joined_at = await bed.applied()
        code, seconds = await first.terminate(30)
        assert code == 0, first.tail()
        left_at = await bed.applied()
        assert not producing.done(), "the stream should still be flowing"
        await producing
        await bed.wait_drained()
        revoked = sum(w.log_lines("partitions_revoked") for w in bed.workers)
        await bed.check(
            stream,
            f"3 workers over 12 partitions: worker-3 joined at {joined_at} applied records, "
            f"worker-1 left (SIGTERM, exit {code} after {seconds:.1f}s) at {left_at}; "
            f"{revoked} revocations drained and committed",
        )
        assert revoked >= 2
