"""Static vs dynamic group membership on a broker: what a restart and a scale-down cost.

`python -m bench.membership` (embedded servers unless WORKER_KAFKA_BOOTSTRAP is given).
Two consumers built exactly as the worker builds its own (`worker.app.make_consumer`)
share a 12-partition topic. Then, once with dynamic and once with static membership
(`WORKER_GROUP_INSTANCE_ID`), one of them is (a) stopped and replaced by a new consumer
of the same name within the session timeout, as a restarted pod would be, and (b) stopped
for good, as a scale-down would. For each, it prints when the other member went through a
rebalance (its revoke callbacks, in seconds after the stop), whether the restarted member
got its partitions back, and how long some partitions had no owner (docs/operations.md:
Scaling).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from worker.app import make_consumer
from worker.config import Settings
from worker.testing.embedded import embedded_stack
from worker.testing.topics import ensure_topics

PARTITIONS = 12
RESTART_PAUSE_S = 2.0  # a restarted process is back this long after it stopped


@dataclass
class Member:
    name: str
    consumer: AIOKafkaConsumer
    revokes: list[float] = field(default_factory=list)  # monotonic times
    assigned: set[int] = field(default_factory=set)

    def listener(self, changed: asyncio.Event) -> ConsumerRebalanceListener:
        member = self

        class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
            async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
                member.revokes.append(time.monotonic())
                member.assigned = set()
                changed.set()

            async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
                member.assigned = {tp.partition for tp in assigned}
                changed.set()

        return Listener()


class Group:
    """Members of one group, polled so that their heartbeats and rebalances run."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.members: dict[str, Member] = {}
        self.changed = asyncio.Event()
        self._polls: dict[str, asyncio.Task[None]] = {}

    async def join(self, name: str, static: bool) -> Member:
        settings = self.settings.model_copy(
            update={"group_instance_id": f"{self.settings.group_id}-{name}" if static else None}
        )
        member = Member(name, make_consumer(settings))
        member.consumer.subscribe([settings.input_topic], listener=member.listener(self.changed))
        await member.consumer.start()
        self.members[name] = member
        self._polls[name] = asyncio.create_task(self._poll(member.consumer))
        return member

    async def _poll(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            await consumer.getmany(timeout_ms=200)

    async def stop(self, name: str) -> None:
        self._polls.pop(name).cancel()
        member = self.members.pop(name)
        await member.consumer.stop()

    def owned(self) -> set[int]:
        return {p for m in self.members.values() for p in m.assigned}

    async def settled(self, timeout_s: float) -> float:
        """Seconds until every partition has an owner among the members, and each member
        has some (raises TimeoutError after `timeout_s`)."""
        started = time.monotonic()
        async with asyncio.timeout(timeout_s):
            while not (
                len(self.owned()) == PARTITIONS and all(m.assigned for m in self.members.values())
            ):
                self.changed.clear()
                await self.changed.wait()
        return time.monotonic() - started

    async def close(self) -> None:
        for name in list(self.members):
            with contextlib.suppress(Exception):
                await self.stop(name)


@contextlib.asynccontextmanager
async def group(base: Settings) -> AsyncIterator[Group]:
    tag = uuid.uuid4().hex[:6]
    settings = base.model_copy(
        update={"input_topic": f"membership.{tag}.in", "group_id": f"membership-{tag}"}
    )
    await ensure_topics(settings, PARTITIONS)
    g = Group(settings)
    try:
        yield g
    finally:
        await g.close()


async def measure(base: Settings, static: bool, restart: bool) -> dict[str, object]:
    """Two members; `b` stops, and (with `restart`) a new `b` joins RESTART_PAUSE_S later."""
    session_s = base.session_timeout_ms / 1000
    async with group(base) as g:
        a = await g.join("a", static)
        await g.join("b", static)
        await g.settled(6 * session_s)
        before = set(g.members["b"].assigned)
        a.revokes = []
        stopped = time.monotonic()
        await g.stop("b")
        if restart:
            await asyncio.sleep(RESTART_PAUSE_S)
            b = await g.join("b", static)
        await g.settled(6 * session_s)
        settle_s = time.monotonic() - stopped
        # A late rebalance (the old member's session expiring) shows up before counting.
        await asyncio.sleep(session_s * 1.5)
        await g.settled(6 * session_s)
        return {
            "membership": "static" if static else "dynamic",
            "change": f"restart after {RESTART_PAUSE_S:.0f} s" if restart else "stop for good",
            "other_member_rebalanced_after_s": [round(t - stopped, 1) for t in a.revokes],
            "same_partitions_back": (b.assigned == before) if restart else None,
            "seconds_until_all_owned": round(settle_s, 1),
        }


@contextlib.contextmanager
def _servers() -> Iterator[Settings]:
    settings = Settings()
    if settings.kafka_bootstrap:
        yield settings
        return
    with embedded_stack() as stack:
        yield settings.model_copy(update={"kafka_bootstrap": stack.bootstrap})


async def main() -> None:
    with _servers() as settings:
        print(
            f"session timeout {settings.session_timeout_ms} ms, {PARTITIONS} partitions, "
            f"broker {'given' if os.environ.get('WORKER_KAFKA_BOOTSTRAP') else 'embedded Tansu'}"
        )
        for static in (False, True):
            for restart in (True, False):
                print(await measure(settings, static, restart))


if __name__ == "__main__":
    asyncio.run(main())
