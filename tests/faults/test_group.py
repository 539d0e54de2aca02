"""Three workers in one group over 12 partitions; one joins and one leaves mid-stream."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
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
        # worker-1 left for good and worker-3 joined: the last assignments of worker-2 and
        # worker-3 share all 12 partitions between them.
        last = [w.assignments()[-1] for w in (second, third)]
        assert all(last), f"worker-2 and worker-3 end with {last}"
        assert sorted(last[0] + last[1]) == sorted(
            f"{bed.settings.input_topic}/{p}" for p in range(12)
        ), last


async def test_a_batch_that_outlives_the_revoke_deadline_commits_safely_as_a_zombie(
    bed_factory: BedFactory,
) -> None:
    # The test holds every stock row of the bed, so the first worker's batches wait for the
    # lock (each wait ends after the lock timeout and the batch is split down to the
    # waiting record, one wait per halving, before its partition is deferred: a lane stays
    # in its batch transaction, holding its partitions' offset rows, for seconds; default
    # statement timeout); a second worker joins, the first one's revoke gives up after
    # 1 s, and the new owner starts from the database offsets while the old batches are
    # still open. When the lock goes, both commit what they still hold (the old worker's
    # deferred records of moved partitions are dropped): the offset rows serialise them,
    # in either order. What the zombie applied first the new owner skips; what the new
    # owner applied first the zombie skips (seen on a slow machine: the new owner took the
    # partition's offset row while the zombie was between two halvings of its batch).
    async with bed_factory(
        partitions=4,
        batch_max_records=100,
        rebalance_drain_timeout_s=1,
        session_timeout_ms=6000,
        log_level="debug",  # batch_applied lines show what the zombie committed
    ) as bed:
        await bed.seed(carts=800)
        stream = bed.stream()
        await bed.produce(stream.events)
        async with bed.pool.acquire() as conn:
            hold = conn.transaction()
            await hold.start()
            await conn.execute(
                "SELECT 1 FROM stock WHERE sku = ANY($1::text[]) ORDER BY sku FOR UPDATE",
                bed.skus,
            )
            first = await bed.start_worker()
            await bed.wait_log(first, "partitions_assigned")
            # One per lane: the lanes hold partitions 0, 2 and 1, 3, so whichever pair
            # moves, a batch of it is open.
            blocked = await bed.wait_worker_transaction(at_least=2)
            second = await bed.start_worker()
            await bed.wait_log(first, "revoke_drain_timeout")
            await bed.wait_log(second, "partitions_assigned")
            applied_while_held = await bed.applied()
            await hold.rollback()
        await bed.check(
            stream,
            f"stock rows locked by the test: {len(blocked)} batch transaction(s) of worker-1 "
            f"hung; worker-2 joined, worker-1's revoke timed out after 1 s and its partitions "
            f"moved while those batches were open ({applied_while_held} applied meanwhile; "
            f"worker-1 {first.assignments()}, worker-2 {second.assignments()}); lock "
            "released, the zombie batches committed",
        )
        moved = set(first.assignments()[0]) - set(first.assignments()[-1])
        assert moved, "some of worker-1's partitions moved to worker-2"
        # The zombie: after its revoke timed out, worker-1 still committed a batch of a
        # partition that had moved (its batch_applied lines, logged at debug level), having
        # applied its records or, when the new owner was first, skipped them.
        zombie = _applied_after_revoke_timeout(first.log_path, moved)
        print(f"[fault] worker-1 committed after its revoke timed out: {zombie}")
        assert zombie, "worker-1 committed no batch of the moved partitions after the move"


def _applied_after_revoke_timeout(log: Path, moved: set[str]) -> list[dict[str, object]]:
    """batch_applied lines logged after revoke_drain_timeout for records of the moved
    partitions, applied (outcomes) or skipped as already applied by the new owner."""
    found, timed_out = [], False
    for line in log.read_bytes().splitlines():
        entry = orjson.loads(line)
        timed_out = timed_out or entry["event"] == "revoke_drain_timeout"
        if (
            timed_out
            and entry["event"] == "batch_applied"
            and moved & set(entry["offsets"])
            and (entry["outcomes"] or entry["skipped"])
        ):
            kept = ("lane", "offsets", "records", "skipped", "outcomes")
            found.append({k: entry[k] for k in kept})
    return found
