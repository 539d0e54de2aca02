"""SIGTERM while the group rebalances (issue 9, finding 6).

aiokafka's `getmany` waits for the new assignment without a timeout, so a worker told to
stop during a rebalance would wait for the rebalance to end. The test holds a rebalance
open on purpose: a member of its own (a plain consumer in the worker's group) blocks in
its revoke callback, so the group waits for it to rejoin while a second worker joins, and
the first worker, already revoked and rejoining, gets SIGTERM in that window.
"""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from tests.faults.conftest import BedFactory
from tests.faults.harness import Bed

pytestmark = pytest.mark.faults

HOLD_S = 60  # how long the holding member may keep the rebalance open


class _Holder(ConsumerRebalanceListener):  # type: ignore[misc]
    """Blocks in the revoke callback of every rebalance after its first assignment."""

    def __init__(self) -> None:
        self.assigned = asyncio.Event()
        self.holding = asyncio.Event()
        self.release = asyncio.Event()
        self.inside = False  # blocked in the revoke callback now: the rebalance cannot end

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if self.assigned.is_set():
            self.holding.set()
            self.inside = True
            await self.release.wait()
            self.inside = False

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.assigned.set()


def _holding_member(bed: Bed, listener: _Holder) -> AIOKafkaConsumer:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bed.bootstrap,
        group_id=bed.settings.group_id,
        enable_auto_commit=False,
        session_timeout_ms=bed.settings.session_timeout_ms,
        rebalance_timeout_ms=HOLD_S * 1000,
    )
    consumer.subscribe([bed.settings.input_topic], listener=listener)
    return consumer


async def test_sigterm_while_the_group_rebalances_exits_0_in_time_and_publishes_its_results(
    bed_factory: BedFactory,
) -> None:
    async with bed_factory(
        partitions=4, shutdown_timeout_s=7, batch_max_records=50, session_timeout_ms=20_000
    ) as bed:
        await bed.seed(carts=300)
        stream = bed.stream()
        await bed.produce(stream.events)
        first = await bed.start_worker()
        await bed.wait_log(first, "partitions_assigned")
        await bed.wait_applied(1)

        listener = _Holder()
        holder = _holding_member(bed, listener)
        await holder.start()
        try:
            async with asyncio.timeout(60):
                await listener.assigned.wait()
            revoked = first.log_lines("partitions_revoked")
            assigned = first.log_lines("partitions_assigned")
            second = await bed.start_worker()
            # The second worker's join starts a rebalance: the first worker drains and
            # rejoins, the holder does not rejoin, so the rebalance stays open.
            async with asyncio.timeout(60):
                await listener.holding.wait()
            await bed.wait_log(first, "partitions_revoked", revoked + 1)
            # A fetch already in flight when the revoke began still returns within its
            # 200 ms; the next one waits for the new assignment. Signal after that.
            await asyncio.sleep(1)
            code, seconds = await first.terminate(bed.settings.shutdown_timeout_s + 10)
            left = await bed.outbox_left()
            # The signal came mid-rebalance and the worker exited before it ended: revoked,
            # the first worker got no new assignment, and the holder still blocks it.
            reassigned = first.log_lines("partitions_assigned") - assigned
            held_open = listener.inside
        finally:
            listener.release.set()
            await holder.stop()
        print(
            f"\n[fault] SIGTERM while the group waited {HOLD_S}s for a member to rejoin: "
            f"exit {code} after {seconds:.2f}s (shutdown timeout "
            f"{bed.settings.shutdown_timeout_s:.0f}s), outbox rows left {left}"
        )
        assert held_open, "the holder was not holding the rebalance open when the worker exited"
        assert reassigned == 0, "the first worker was assigned again before it exited"
        assert code == 0, first.tail()
        assert seconds < bed.settings.shutdown_timeout_s
        assert left == 0, "G5: what the worker committed is published before it exits"
        assert second.running
        await bed.check(stream, f"SIGTERM mid-rebalance: exit {code} after {seconds:.2f}s")
