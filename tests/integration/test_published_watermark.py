"""Fresh results live only in their inbox rows until the broker acknowledges them: a crash
between the commit and the publication leaves them above the partition's published
watermark, and the partition's next owner republishes them, byte for byte (G2, I3)."""

from __future__ import annotations

from collections import Counter

import asyncpg
import pytest
from aiokafka.errors import MessageSizeTooLargeError

from tests.conftest import Servers
from tests.integration.conftest import World, reserve
from tests.integration.test_inbox_pruner import prune_past_an_hour
from tests.integration.test_outbox import RefusingProducer
from tests.support import produce, read_results, running_worker
from worker import store
from worker.auth import Authenticator
from worker.processor import BatchProcessor
from worker.publisher import Publisher
from worker.records import RawRecord
from worker.testing.scenario import abandon_event
from worker.testing.topics import ensure_topics

pytestmark = pytest.mark.integration


async def test_results_committed_but_never_published_are_republished_by_the_next_owner(
    db: asyncpg.Pool, world: World, servers: Servers
) -> None:
    p = world.prefix
    await reserve(db, world, f"{p}-r1", f"{p}-c", "a", 2)
    await reserve(db, world, f"{p}-r2", f"{p}-c", "b", 1)
    event = abandon_event(f"{p}-c", None, world.api_key, event_id=f"{p}-e")
    settings = world.settings
    await ensure_topics(settings, 3)
    [(partition, offset)] = await produce(settings, [event])

    # A worker applies the record and dies before a single result reaches the broker.
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    try:
        processor = BatchProcessor(
            store.PgTransactions(pool, settings.group_id),
            settings,
            Authenticator(lambda d: store.find_partners(pool, d), 60),
        )
        record = RawRecord(
            settings.input_topic, partition, offset, event.key, event.value, event.headers
        )
        report = await processor.process([record])
    finally:
        await pool.close()
    assert report.messages == []  # nothing in the outbox
    [publication] = report.publications
    assert len(publication.messages) == 2
    assert (publication.start, publication.end) == (0, offset + 1)
    assert await store.unpublished_backlog(db) >= 1

    # The next owner republishes them before it applies anything new.
    async with running_worker(settings):
        results = await read_results(settings, 2)
    row = await db.fetchrow(
        "SELECT cart_id, results, result_headers FROM inbox WHERE partner_id = $1",
        world.partner_id,
    )
    assert row is not None
    headers = dict(store.decode_headers(row["result_headers"]))
    assert sorted(r.value or b"" for r in results) == sorted(row["results"])
    for r in results:  # byte for byte, key and headers included (G2)
        assert r.key == row["cart_id"].encode()
        assert r.headers == headers
    offsets = await db.fetchrow(
        "SELECT published_offset, next_offset FROM consumer_offsets "
        "WHERE group_id = $1 AND topic = $2 AND partition = $3",
        settings.group_id,
        settings.input_topic,
        partition,
    )
    assert offsets is not None
    assert offsets["published_offset"] == offsets["next_offset"] == offset + 1


async def test_the_pruner_keeps_results_at_or_above_the_published_watermark(
    db: asyncpg.Pool, world: World, servers: Servers
) -> None:
    p = world.prefix
    topic = f"{p}-in"
    await db.execute(
        "INSERT INTO consumer_offsets (group_id, topic, partition, next_offset, published_offset)"
        " VALUES ($1, $2, 0, 10, 5)",
        world.settings.group_id,
        topic,
    )
    for event_id, source_offset in [(f"{p}-acked", 3), (f"{p}-not-yet", 7)]:
        await db.execute(
            "INSERT INTO inbox (partner_id, event_id, cart_id, source_topic, source_partition, "
            "source_offset, results, processed_at) "
            "VALUES ($1, $2, 'c', $3, 0, $4, '{x}', now() - interval '2 hours')",
            world.partner_id,
            event_id,
            topic,
            source_offset,
        )
    await prune_past_an_hour(servers)
    rows = await db.fetch(
        "SELECT event_id, results IS NULL AS pruned FROM inbox WHERE source_topic = $1", topic
    )
    assert {r["event_id"]: r["pruned"] for r in rows} == {
        f"{p}-acked": True,
        f"{p}-not-yet": False,
    }


async def test_a_result_the_catch_up_finds_refused_for_good_is_parked_and_passed(
    db: asyncpg.Pool, world: World, servers: Servers
) -> None:
    # A catch-up republishing from the inbox meets a result the broker refuses for good:
    # it is parked in the outbox (byte for byte) and the watermark goes past it (§7).
    p = world.prefix
    topic, results_topic = f"{p}-in", f"{p}-results"
    await db.execute(
        "INSERT INTO consumer_offsets (group_id, topic, partition, next_offset, published_offset)"
        " VALUES ($1, $2, 0, 3, 0)",
        world.settings.group_id,
        topic,
    )
    headers = (("h", b"v"),)
    for event_id, offset, payload in [("a", 0, b"good-0"), ("b", 1, b"huge"), ("c", 2, b"good-2")]:
        await db.execute(
            "INSERT INTO inbox (partner_id, event_id, cart_id, source_topic, source_partition, "
            "source_offset, results, result_headers, processed_at) "
            "VALUES ($1, $2, 'cart', $3, 0, $4, $5::bytea[], $6, now())",
            world.partner_id,
            f"{p}-{event_id}",
            topic,
            offset,
            [payload],
            store.encode_headers(headers),
        )
    producer = RefusingProducer({results_topic}, {b"huge": MessageSizeTooLargeError()}, False)
    pool = await asyncpg.create_pool(servers.worker_database_url, min_size=1, max_size=2)
    try:
        publisher = Publisher(
            producer, pool, 1, 0, group_id=world.settings.group_id, results_topic=results_topic
        )
        await publisher.recover([(topic, 0)], 10)
        await publisher.recover([(topic, 0)], 10)  # a later owner: nothing left to republish
    finally:
        await pool.close()
    try:
        parked = await db.fetch(
            "SELECT key, payload, headers, park_reason FROM outbox WHERE topic = $1",
            results_topic,
        )
        assert [(bytes(r["key"]), bytes(r["payload"]), r["park_reason"]) for r in parked] == [
            (b"cart", b"huge", "too_large")
        ]
        assert store.decode_headers(parked[0]["headers"]) == headers
        # The batch holding `huge` was refused whole: its neighbours went again, alone.
        assert producer.written == Counter({b"good-0": 1, b"good-2": 1})
        assert set(producer.refusals) == {b"huge"}
        published = await db.fetchval(
            "SELECT published_offset FROM consumer_offsets WHERE group_id = $1 AND topic = $2",
            world.settings.group_id,
            topic,
        )
        assert published == 3
    finally:
        await db.execute("DELETE FROM outbox WHERE topic = $1", results_topic)
