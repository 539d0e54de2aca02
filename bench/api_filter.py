"""How many results per second one `release-worker api` process can filter.

`python -m bench.api_filter [RESULTS]` (an embedded broker unless WORKER_KAFKA_BOOTSTRAP
is given). Every api process reads the whole results topic and keeps only the results its
own requests wait for (worker/api/results.py), so this rate bounds the results rate of
the whole system that an api process keeps up with. Two numbers:

1. `Waiters.offer` alone, on result records as the worker writes them (headers and
   payload), with 1,000 events waited for and none of these results theirs: the cost of
   the filter itself;
2. the real `ResultsReader` reading RESULTS such records from a 12-partition topic on the
   broker (aiokafka's fetch and decode included), same waiters: the rate that counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from worker.api.results import ResultsReader
from worker.api.waiters import Waiters
from worker.contract import Outcome, Trigger
from worker.records import RawRecord
from worker.results import item_result_payload, result_headers
from worker.testing.embedded import EmbeddedBroker

PARTITIONS = 12
WAITED = 1_000


def sample_results(count: int) -> list[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
    """(key, payload, headers) of `count` item results, as the worker renders them."""
    now = datetime.now(UTC)
    record = RawRecord(
        "in", 0, 0, None, None, (("rokt-session-id", b"s" * 36), ("rokt-tag-id", b"tag-1"))
    )
    results = []
    for n in range(count):
        cart = f"cart-{n % 5000}"
        payload = item_result_payload(
            event_id=f"api-{uuid.UUID(int=n)}",
            trigger=Trigger.RELEASE_REQUEST,
            cart_id=cart,
            cart_item_id=f"item-{n}",
            reservation_id=f"rokt_item_reservation_id.{uuid.UUID(int=n)}",
            outcome=Outcome.RELEASED,
            quantity=1,
            processed_at=now,
        )
        headers = result_headers(f"api-{uuid.UUID(int=n)}", f"partner-{n % 3}", record, 1)
        results.append((cart.encode(), payload, [(k, v or b"") for k, v in headers]))
    return results


def waiting(waiters: Waiters, stack: contextlib.ExitStack) -> None:
    for n in range(WAITED):
        stack.enter_context(waiters.waiting((b"partner-0", f"waited-{n}".encode()), 1))


async def filter_alone(results: list[tuple[bytes, bytes, list[tuple[str, bytes]]]]) -> float:
    waiters = Waiters(limit=WAITED)
    with contextlib.ExitStack() as stack:
        waiting(waiters, stack)
        started = time.perf_counter()
        for _, payload, headers in results:
            waiters.offer(headers, payload)
        elapsed = time.perf_counter() - started
    assert waiters.ignored == len(results)
    return len(results) / elapsed


async def filter_from_broker(
    bootstrap: str, results: list[tuple[bytes, bytes, list[tuple[str, bytes]]]]
) -> float:
    topic = f"bench-results-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20)
    await producer.start()
    try:
        sent = [await producer.send(topic, p, key=k, headers=h) for k, p, h in results]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    waiters = Waiters(limit=WAITED)
    try:
        # The api's own reader, positioned at the beginning instead of the end.
        reader = ResultsReader(consumer, topic, waiters)
        await reader.position_at_end()
        await consumer.seek_to_beginning()
        with contextlib.ExitStack() as stack:
            waiting(waiters, stack)
            started = time.perf_counter()
            task = asyncio.create_task(reader.run())
            while waiters.ignored < len(results):  # noqa: ASYNC110  (a counter, no event)
                await asyncio.sleep(0.01)
            elapsed = time.perf_counter() - started
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return len(results) / elapsed
    finally:
        await consumer.stop()


async def main(count: int) -> None:
    results = sample_results(count)
    size = sum(len(p) + sum(len(k) + len(v) for k, v in h) for _, p, h in results) / count
    print(f"{count:,} item results, {size:.0f} bytes each (payload and headers)")
    print(f"filter alone (Waiters.offer):  {await filter_alone(results):>10,.0f} results/s")
    given = os.environ.get("WORKER_KAFKA_BOOTSTRAP")
    if given:
        rate = await filter_from_broker(given, results)
    else:
        with tempfile.TemporaryDirectory(prefix="api-filter-") as base:
            broker = EmbeddedBroker(Path(base) / "broker")
            broker.start()
            try:
                rate = await filter_from_broker(broker.bootstrap, results)
            finally:
                broker.stop()
    print(f"read from the broker and filter: {rate:>8,.0f} results/s (one process, one core)")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 200_000))
