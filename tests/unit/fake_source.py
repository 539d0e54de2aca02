"""An in-memory `KafkaSource` (our own Protocol) that behaves like aiokafka where it matters.

- Offsets need not be contiguous: a partition's log is whatever offsets the test gives it
  (compaction and transaction markers leave gaps).
- Records come in batches, as the broker stores them. A record marked unreadable makes
  every fetch that parses its batch raise `UnicodeDecodeError`, as aiokafka does for a
  header name that is not UTF-8: the batch is parsed from its first record (records before
  the position are parsed, then skipped), so seeking past the bad record inside its batch
  does not help. A failed fetch keeps what it already returned of other partitions and
  moves their positions (the records are lost to the caller), and moves the failing
  partition's position past the records it parsed before the bad one.
- `rebalancing` makes `getmany` wait for the next assignment without a timeout; `seek`
  refuses a partition not assigned, and `getmany` returns nothing of one. A new
  assignment starts with no partition paused.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from aiokafka.errors import IllegalStateError
from aiokafka.structs import TopicPartition

from worker.records import Headers


@dataclass(frozen=True)
class FakeRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None = b"k"
    value: bytes | None = b"{}"
    headers: Headers = ()
    timestamp: int = 0
    unreadable: bool = False


@dataclass
class FakeSource:
    topic: str
    # partition -> batches of records, in offset order
    log: dict[int, list[list[FakeRecord]]] = field(default_factory=dict)
    positions: dict[TopicPartition, int] = field(default_factory=dict)
    assigned: set[TopicPartition] = field(default_factory=set)
    paused_set: set[TopicPartition] = field(default_factory=set)
    commits: list[dict[TopicPartition, int]] = field(default_factory=list)
    rebalancing: bool = False
    fetching: asyncio.Event = field(default_factory=asyncio.Event)  # getmany was called
    fetch_count: int = 0
    _rebalanced: asyncio.Event = field(default_factory=asyncio.Event)

    def append(self, partition: int, *batches: list[FakeRecord]) -> None:
        self.log.setdefault(partition, []).extend(batches)

    def assign(self, partitions: set[int], start: int = 0) -> set[TopicPartition]:
        tps = {TopicPartition(self.topic, p) for p in partitions}
        self.assigned = tps
        self.positions = {tp: start for tp in tps}
        self.paused_set = set()  # aiokafka's new assignment starts unpaused
        return tps

    # ------------------------------------------------------------------ KafkaSource

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> Mapping[TopicPartition, Sequence[FakeRecord]]:
        self.fetching.set()
        self.fetch_count += 1
        if self.rebalancing:
            await self._rebalanced.wait()  # aiokafka waits for the assignment, no timeout
        await asyncio.sleep(0)
        budget = max_records or 1_000_000
        out: dict[TopicPartition, list[FakeRecord]] = {}
        wanted = (set(partitions) or self.assigned) & self.assigned
        for tp in sorted(wanted - self.paused_set):
            if budget == 0:
                break
            records, failed = self._read(tp, budget)
            if records:
                out[tp] = records
                self.positions[tp] = records[-1].offset + 1
                budget -= len(records)
            if failed:
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        if not out:
            await asyncio.sleep(timeout_ms / 1000)  # the broker's long poll
        return out

    def _read(self, tp: TopicPartition, budget: int) -> tuple[list[FakeRecord], bool]:
        position = self.positions[tp]
        out: list[FakeRecord] = []
        for batch in self.log.get(tp.partition, []):
            if batch[-1].offset < position:
                continue
            for record in batch:  # the whole batch is parsed, from its first record
                if record.unreadable:
                    return out, True
                if record.offset >= position:
                    out.append(record)
                    if len(out) == budget:
                        return out, False
        return out, False

    def seek(self, partition: TopicPartition, offset: int) -> None:
        if partition not in self.assigned:
            raise IllegalStateError(f"No current assignment for partition {partition}")
        self.positions[partition] = offset

    async def position(self, partition: TopicPartition) -> int:
        return self.positions[partition]

    def pause(self, *partitions: TopicPartition) -> None:
        self.paused_set |= set(partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self.paused_set -= set(partitions)

    def paused(self) -> set[TopicPartition]:
        return set(self.paused_set)

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def highwater(self, partition: TopicPartition) -> int | None:
        batches = self.log.get(partition.partition)
        return batches[-1][-1].offset + 1 if batches else 0

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        self.commits.append(dict(offsets))
