"""Baseline systems run as child processes like the worker: `python -m bench.systems NAME`.

- `kafka_pipe`: consume the input topic and produce one result-sized record per item,
  no database: what the broker and the Python clients allow on this machine. It sends
  as the worker does: one record batch per partition, each key's partition computed once.
- `naive`: the worker's own processor (parse, auth, release transaction), but one
  transaction per record and one awaited send per result, the way hand-written workers start.

Both read WORKER_* settings and stop on SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from worker import store
from worker.app import create_pool, make_consumer, make_producer
from worker.auth import Authenticator
from worker.config import Settings
from worker.consumer import raw_record
from worker.contract import EVENT_ID_HEADER, format_timestamp
from worker.partitioning import partition_for
from worker.processor import BatchProcessor
from worker.publisher import RecordBatch


async def kafka_pipe(settings: Settings, stop: asyncio.Event) -> None:
    consumer, producer = make_consumer(settings), make_producer(settings)
    async with _running(settings, consumer, producer):
        try:
            await _pipe(settings, stop, consumer, producer)
        finally:
            await producer.flush()


async def _pipe(
    settings: Settings, stop: asyncio.Event, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer
) -> None:
    # The worker's own sending technique (worker/publisher.py): each key's partition
    # computed once, with the producer's partitioner; one record batch per partition
    # (`create_batch`/`send_batch`, a full one goes and the next is started), not a `send`
    # per message.
    partitions = sorted(await producer.partitions_for(settings.results_topic))
    while not stop.is_set():
        fetched = await consumer.getmany(timeout_ms=200, max_records=2000)
        batches: dict[int, RecordBatch] = {}
        futures = []
        for messages in fetched.values():
            for m in messages:
                body = orjson.loads(m.value)
                headers = [(EVENT_ID_HEADER, body["eventId"].encode())]
                processed_at = format_timestamp(datetime.now(UTC))
                partition = partition_for(m.key, partitions)
                for item in body["items"]:
                    # A result of the contract's shape and size, rendered the fast way.
                    payload = orjson.dumps(
                        {
                            "type": "item_result",
                            "eventId": body["eventId"],
                            "trigger": "release_request",
                            "cartId": body["cartId"],
                            "cartItemId": item["cartItemId"],
                            "itemReservationId": item["itemReservationId"],
                            "success": True,
                            "outcome": "released",
                            "quantity": 0,
                            "processedAt": processed_at,
                        }
                    )
                    batch = batches.get(partition)
                    if batch is None:
                        batch = batches[partition] = producer.create_batch()
                    if batch.append(timestamp=None, key=m.key, value=payload, headers=headers):
                        continue
                    batch.close()  # full: it goes, the next one starts with this result
                    futures.append(
                        await producer.send_batch(
                            batch, settings.results_topic, partition=partition
                        )
                    )
                    batch = batches[partition] = producer.create_batch()
                    batch.append(timestamp=None, key=m.key, value=payload, headers=headers)
        for partition, batch in batches.items():
            batch.close()
            futures.append(
                await producer.send_batch(batch, settings.results_topic, partition=partition)
            )
        if fetched:
            await consumer.commit()
        # Bounded in flight, like the worker: do not run ahead of the acks forever.
        await asyncio.gather(*futures)


async def naive(settings: Settings, stop: asyncio.Event) -> None:
    pool = await create_pool(settings)
    auth = Authenticator(lambda d: store.find_partners(pool, d), settings.auth_cache_ttl_s)
    processor = BatchProcessor(store.PgTransactions(pool, settings.group_id), settings, auth)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=settings.group_id,
        enable_auto_commit=True,
        auto_offset_reset="earliest",
    )
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    try:
        async with _running(settings, consumer, producer):
            while not stop.is_set():
                fetched = await consumer.getmany(timeout_ms=200, max_records=100)
                for messages in fetched.values():
                    for m in messages:
                        # The worker's processor, one record at a time; one that waited for a
                        # row lock is given back (`BatchReport.deferred`) and tried again.
                        records, results = [raw_record(m)], []
                        while records:
                            report = await processor.process(records)
                            results += report.messages
                            # Fresh results are stored in the inbox only: sent from memory too.
                            results += [x for p in report.publications for x in p.messages]
                            records = report.deferred
                        for message in results:
                            await producer.send_and_wait(
                                message.topic,
                                message.payload,
                                key=message.key,
                                headers=list(message.headers),
                            )
                        await store.delete_outbox(
                            pool, [x.outbox_id for x in results if x.outbox_id]
                        )
    finally:
        await pool.close()


@asynccontextmanager
async def _running(
    settings: Settings, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer
) -> AsyncIterator[None]:
    """Both clients started, on the input topic, for the block; stopped after it."""
    consumer.subscribe([settings.input_topic])
    await producer.start()
    await consumer.start()
    try:
        yield
    finally:
        await consumer.stop()
        await producer.stop()


SYSTEMS = {"kafka_pipe": kafka_pipe, "naive": naive}


async def _main(name: str) -> None:
    settings = Settings()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await SYSTEMS[name](settings, stop)


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1]))
