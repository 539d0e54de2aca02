"""CPU of the worker's Kafka producer side per result: `Publisher.publish_fresh` + `flush`.

    python -m bench.publish_cpu [--calls 10] [--loop uvloop|asyncio] [--callgrind]

Starts an embedded Tansu broker, a producer as the worker makes it (`app.make_producer`)
and a `Publisher`, and hands it what one lane batch commits: 6 input partitions of 84
records, 3 item results each (real payloads and headers, `results.result_messages`), over
a 12-partition results topic. Three calls are a warm-up; then `calls` calls are measured,
each waited for (`flush`), so the producer's sender, the broker's answers and the
settling of the watermarks are in. Prints this process's CPU µs per result over the
measured part (from /proc: a loaded-machine figure). Under valgrind, with `--callgrind`,
it switches instrumentation on (`callgrind_control -i on`) for the measured part only:

    valgrind --tool=callgrind --instr-atstart=no python -m bench.publish_cpu --calls 4 --callgrind

and the total it prints, divided by the results, is instructions per result: repeatable
under load.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from bench.callgrind import run_on, toggle
from worker.app import make_producer
from worker.config import Settings
from worker.contract import Outcome, Trigger
from worker.publisher import Publisher
from worker.records import Publication, RawRecord
from worker.results import item_result_payload, result_headers, result_messages
from worker.testing.embedded import EmbeddedBroker
from worker.testing.topics import ensure_topics

PARTITIONS, RECORDS, ITEMS = 6, 84, 3  # one lane batch: ~500 records of 3 items
WARM_UP = 3
HEADERS = (
    ("rokt-api-key", b"k" * 32),
    ("rokt-session-id", b"s" * 36),
    ("rokt-tag-id", b"tag-1"),
)


def lane_batch(call: int, topic: str) -> list[Publication]:
    """What one lane's transaction commits: a publication per input partition."""
    now = datetime.now(UTC)
    start = call * RECORDS
    publications = []
    for p in range(PARTITIONS):
        messages = []
        for r in range(RECORDS):
            cart = f"cart-{call}-{p}-{r}"
            record = RawRecord(
                "in", p, start + r, cart.encode(), b"{}", HEADERS, int(time.time() * 1000)
            )
            event = str(uuid.uuid4())
            payloads = [
                item_result_payload(
                    event_id=event,
                    trigger=Trigger.RELEASE_REQUEST,
                    cart_id=cart,
                    cart_item_id=f"item-{i}",
                    reservation_id=f"res-{call}-{p}-{r}-{i}",
                    outcome=Outcome.RELEASED,
                    quantity=2,
                    processed_at=now,
                )
                for i in range(ITEMS)
            ]
            headers = result_headers(event, "partner-1", record, ITEMS)
            messages += result_messages(topic, cart, payloads, headers, record)
        publications.append(Publication("in", p, start, start + RECORDS, messages))
    return publications


async def measure(calls: int, callgrind: bool) -> None:
    broker = EmbeddedBroker(Path(tempfile.mkdtemp(prefix="publish-cpu-")))
    broker.start()
    try:
        topic = f"publish-cpu-{uuid.uuid4().hex[:8]}"
        settings = Settings(kafka_bootstrap=broker.bootstrap, results_topic=topic)
        await ensure_topics(settings)
        producer = make_producer(settings)
        await producer.start()
        # No database: nothing is refused, so nothing is parked.
        no_pool: asyncpg.Pool = None  # type: ignore[assignment]
        publisher = Publisher(producer, no_pool, 1, 1, results_topic=topic)
        for p in range(PARTITIONS):
            publisher.watermarks.assign(("in", p), 0)
            publisher.watermarks.caught_up(("in", p), 0, 0)
        batches = [lane_batch(call, topic) for call in range(WARM_UP + calls)]
        gc.collect()
        gc.freeze()
        for publications in batches[:WARM_UP]:
            await publisher.publish_fresh(publications)
            await publisher.flush(30)
        if callgrind:
            toggle(True)
        cpu = time.process_time()
        for publications in batches[WARM_UP:]:
            await publisher.publish_fresh(publications)
            await publisher.flush(30)
        cpu = time.process_time() - cpu
        if callgrind:
            toggle(False)
        results = calls * PARTITIONS * RECORDS * ITEMS
        if publisher.published != (WARM_UP + calls) * PARTITIONS * RECORDS * ITEMS:
            raise SystemExit(f"only {publisher.published} results were acknowledged")
        print(f"results measured: {results}; CPU µs per result: {cpu / results * 1e6:.2f}")
        await producer.stop()
    finally:
        broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--callgrind", action="store_true")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args()
    run_on(measure(args.calls, args.callgrind), args.loop)


if __name__ == "__main__":
    main()
