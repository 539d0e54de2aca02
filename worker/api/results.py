"""Each api process reads the results topic itself, from its end, with no consumer group.

A group would split the partitions between the api processes, and a request's results
could land in another process than the one waiting. So every process reads every
partition and keeps only what its own waiters need (`Waiters.offer`): the cost per
process grows with the results rate, not with the number of processes (docs/api.md
gives the measured rate one process filters, and what to do beyond it).

Positions are taken at the end before the process is ready, and a waiter is registered
before its record is produced, so no result a request waits for can pass unread.
"""

from __future__ import annotations

import asyncio

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from worker.api import metrics
from worker.api.waiters import Waiters

log = structlog.get_logger("worker.api")

FETCH_MAX_RECORDS = 5_000


class ResultsReader:
    def __init__(self, consumer: AIOKafkaConsumer, topic: str, waiters: Waiters) -> None:
        self._consumer = consumer
        self._topic = topic
        self._waiters = waiters
        self.positioned = False

    async def position_at_end(self, retry_s: float = 1.0) -> None:
        """Assign every partition of the topic and take the end as the start (waits for the
        topic to exist: the worker's deployment creates it)."""
        while True:
            partitions = self._consumer.partitions_for_topic(self._topic)
            if partitions:
                break
            await self._consumer.topics()  # refreshes the metadata
            if not self._consumer.partitions_for_topic(self._topic):
                log.warning("api_waiting_for_results_topic", topic=self._topic)
                await asyncio.sleep(retry_s)
        assigned = [TopicPartition(self._topic, p) for p in sorted(partitions)]
        self._consumer.assign(assigned)
        await self._consumer.seek_to_end(*assigned)
        for tp in assigned:  # resolves the end offsets now, before any request is taken
            await self._consumer.position(tp)
        self.positioned = True
        log.info("api_results_positioned", topic=self._topic, partitions=len(assigned))

    async def run(self) -> None:
        """Offer every result to the waiters, until cancelled."""
        waiters = self._waiters
        # The counters' children, looked up once (`labels()` takes a lock each call).
        read_matched = metrics.RESULTS_READ.labels(matched="yes")
        read_ignored = metrics.RESULTS_READ.labels(matched="no")
        while True:
            try:
                batch = await self._consumer.getmany(timeout_ms=500, max_records=FETCH_MAX_RECORDS)
            except KafkaError as error:  # the client reconnects by itself; waiters time out
                log.warning("api_results_fetch_failed", error=type(error).__name__)
                await asyncio.sleep(1.0)
                continue
            matched, ignored = waiters.matched, waiters.ignored
            for records in batch.values():
                for record in records:
                    waiters.offer(record.headers, record.value)
            read_matched.inc(waiters.matched - matched)
            read_ignored.inc(waiters.ignored - ignored)
