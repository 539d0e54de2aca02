"""Reading topics for the operator commands: no group joined, nothing committed.

High-water marks come from fetch responses, not from `ListOffsets(latest)`, which some
brokers (the embedded Tansu) answer wrongly; the worker's own lag metric does the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaTimeoutError

from worker.cli.common import CONNECT_TIMEOUT_S
from worker.records import Headers

# Where a read starts: the beginning, the end, or the first record at or after a time.
Start = str | datetime
BEGINNING = "beginning"
END = "end"


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: Headers = field(repr=False)

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name:
                return None if value is None else value.decode(errors="replace")
        return None


@asynccontextmanager
async def consumer(bootstrap: str, group_id: str | None = None) -> AsyncIterator[AIOKafkaConsumer]:
    """A started consumer that joins no group and commits nothing (`group_id` only lets it
    read that group's committed offsets)."""
    client = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=group_id,
        enable_auto_commit=False,
        client_id="release-worker-cli",
        request_timeout_ms=int(CONNECT_TIMEOUT_S * 1000),
    )
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            await client.start()
    except TimeoutError:
        await client.stop()
        raise KafkaTimeoutError(f"no broker answered through {bootstrap} in time") from None
    try:
        yield client
    finally:
        await client.stop()


async def partitions(client: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """The topic's partitions; KafkaTimeoutError when it does not exist (in time)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CONNECT_TIMEOUT_S
    while loop.time() < deadline:
        found = client.partitions_for_topic(topic)
        if found:
            return [TopicPartition(topic, p) for p in sorted(found)]
        await client.topics()
        await asyncio.sleep(0.1)
    raise KafkaTimeoutError(f"topic {topic!r} does not exist (or may not be described)")


async def highwaters(
    client: AIOKafkaConsumer, tps: list[TopicPartition], near: Mapping[int, int] | None = None
) -> dict[int, int]:
    """Each partition's high-water mark (the offset the next record will get), by partition.

    A fetch response carries it: each partition is fetched once, from `near` (an offset
    known to exist, close to the end: less to transfer) or else from its start. The
    client is left assigned to `tps`.
    """
    client.assign(tps)
    near = near or {}
    from_start = [tp for tp in tps if tp.partition not in near]
    if from_start:  # (none given would mean every assigned partition)
        await client.seek_to_beginning(*from_start)
    for tp in tps:
        if tp.partition in near:
            client.seek(tp, near[tp.partition])
    marks: dict[int, int] = {}
    async with asyncio.timeout(CONNECT_TIMEOUT_S):
        while len(marks) < len(tps):
            await client.getmany(*tps, timeout_ms=200, max_records=1)
            for tp in tps:
                high = client.highwater(tp)
                if high is not None:
                    marks[tp.partition] = high
    return marks


async def read(
    client: AIOKafkaConsumer,
    topic: str,
    start: Start,
    follow: bool,
    keep: Callable[[Message], bool] = lambda _: True,
) -> AsyncIterator[Message]:
    """The topic's messages from `start`, in offset order per partition, those `keep`
    accepts. Without `follow` it ends at the high-water marks read when it began."""
    tps = await partitions(client, topic)
    ends = await highwaters(client, tps)
    await _seek(client, tps, start, ends)
    # A broker may seek by time too early (the embedded one answers a time past the last
    # record with offset 0): records before the time are skipped here as well.
    since_ms = int(start.timestamp() * 1000) if isinstance(start, datetime) else None
    while True:
        if not follow and all([await _done(client, tp, ends) for tp in tps]):
            return
        batch = await client.getmany(timeout_ms=500)
        for tp in sorted(batch, key=lambda t: t.partition):
            for m in batch[tp]:
                if not follow and m.offset >= ends[tp.partition]:
                    continue
                if since_ms is not None and m.timestamp < since_ms:
                    continue
                message = Message(
                    m.topic,
                    m.partition,
                    m.offset,
                    m.timestamp,
                    m.key,
                    m.value,
                    tuple(m.headers or ()),
                )
                if keep(message):
                    yield message


async def _seek(
    client: AIOKafkaConsumer, tps: list[TopicPartition], start: Start, ends: Mapping[int, int]
) -> None:
    if start == BEGINNING:
        await client.seek_to_beginning(*tps)
    elif start == END:
        for tp in tps:
            client.seek(tp, ends[tp.partition])
    elif isinstance(start, datetime):
        found = await client.offsets_for_times({tp: int(start.timestamp() * 1000) for tp in tps})
        for tp in tps:
            at = found.get(tp)
            client.seek(tp, ends[tp.partition] if at is None else at.offset)
    else:
        raise ValueError(f"start must be {BEGINNING!r}, {END!r} or a time, not {start!r}")


async def _done(client: AIOKafkaConsumer, tp: TopicPartition, ends: Mapping[int, int]) -> bool:
    return bool(await client.position(tp) >= ends[tp.partition])
