"""One bad message never blocks the others (DESIGN.md §7; issue 9, finding 2), with the
real servers and default settings.

The embedded broker (Tansu) enforces no message size limit, so the worker enforces the
default Kafka one itself (`WORKER_MAX_MESSAGE_BYTES`, 1,048,588 bytes): over it, the
producer refuses a message with the very error a Kafka broker answers
(`MessageSizeTooLargeError`).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.faults.conftest import BedFactory
from tests.faults.harness import Bed
from tests.support import read_topic
from worker import store
from worker.cli.doctor import check_database
from worker.config import KAFKA_DEFAULT_MAX_MESSAGE_BYTES
from worker.contract import API_KEY_HEADER
from worker.records import OutboxMessage
from worker.results import message_bytes
from worker.testing.scenario import Event

pytestmark = pytest.mark.faults

# The record: a value just under the input limit (1 MiB) that is not JSON. Its
# dead letter, the value plus the `dlq-*` headers, is over the broker's default limit.
BIG_VALUE = b"{" + b"x" * 1_048_399


async def wait_settled(bed: Bed, rows_left: int, timeout_s: float = 90) -> None:
    """Every produced record applied, and only `rows_left` of our outbox rows left."""
    total = sum(bed.produced.values())
    deadline = time.monotonic() + timeout_s
    while (await bed.applied(), await bed.outbox_left()) != (total, rows_left):
        if time.monotonic() > deadline:
            raise AssertionError(
                f"not settled in {timeout_s}s: applied {await bed.applied()}/{total}, "
                f"outbox rows {await bed.outbox_left()} (want {rows_left})\n{bed.tails()}"
            )
        await asyncio.sleep(0.2)


async def test_a_dead_letter_too_large_for_the_dlq_with_good_rows_queued_behind_it(
    bed_factory: BedFactory,
) -> None:
    async with bed_factory() as bed:
        settings = bed.settings
        try:
            await bed.seed(carts=300)
            stream = bed.stream()
            # Left by a predecessor (say, one that forwarded dead letters whole): one too
            # large for the DLQ topic, ahead of good rows of both topics.
            too_large = OutboxMessage(settings.dlq_topic, b"too-large", b"y" * 2_097_152)
            behind = [
                OutboxMessage(settings.dlq_topic, f"behind-{n}".encode(), f"behind-{n}".encode())
                for n in range(100)
            ]
            async with bed.pool.acquire() as conn:
                await store.enqueue(conn, [too_large, *behind])
            big = Event(
                b"big-cart",
                BIG_VALUE,
                (("content-type", b"application/json"), (API_KEY_HEADER, bed.api_key.encode())),
            )
            half = len(stream.events) // 2
            await bed.produce([*stream.events[:half], big, *stream.events[half:]])

            worker = await bed.start_worker()
            await wait_settled(bed, rows_left=1)

            parked = await bed.pool.fetch(
                "SELECT key, park_reason FROM outbox WHERE topic = $1", settings.dlq_topic
            )
            assert [(bytes(r[0]), r[1]) for r in parked] == [(b"too-large", "too_large")]
            assert worker.log_lines("outbox_row_parked") == 1
            letters = await read_topic(
                bed.bootstrap, settings.dlq_topic, lambda seen: len(seen) >= len(behind) + 1
            )
            by_key = {p.key: p for p in letters}
            assert len(letters) == len(by_key) == len(behind) + 1, "parked: never sent"
            assert {m.key for m in behind} <= set(by_key)
            shrunk = by_key[b"big-cart"]
            assert shrunk.value is not None
            assert BIG_VALUE.startswith(shrunk.value)
            assert shrunk.headers["dlq-truncated"] == str(len(BIG_VALUE)).encode()
            assert shrunk.headers["dlq-code"] == b"invalid_json"
            size = message_bytes(shrunk.key, shrunk.value, tuple(shrunk.headers.items()))
            assert size <= KAFKA_DEFAULT_MAX_MESSAGE_BYTES
            # Every result of the good records was published around them.
            want = {(e, r) for e, items in stream.expected.items() for r in items}
            results = await bed.read_results(want)
            rejected = [p.body for p in results if p.body["type"] == "event_rejected"]
            assert [(b["status"], b["errors"][0]["code"]) for b in rejected] == [
                (400, "invalid_json")
            ]
            outbox = (await check_database(settings))[-1]
            assert outbox.attention
            assert "too_large ×" in outbox.detail
            print(
                f"\n[fault] a {len(BIG_VALUE):,}-byte invalid record and a 2 MiB leftover dead "
                f"letter ahead of {len(behind)} rows: {len(results)} results and "
                f"{len(letters)} dead letters published, the leftover parked, the new dead "
                f"letter shrunk to {size:,} bytes"
            )
        finally:
            # Parked rows stay for an operator; this test's own go, so `doctor` stays clean.
            await bed.pool.execute(
                "DELETE FROM outbox WHERE topic = ANY($1::text[])",
                [settings.results_topic, settings.dlq_topic],
            )
