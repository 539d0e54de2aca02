"""Helpers for integration and fault tests: per-test topics, producing, reading results."""

from __future__ import annotations

import asyncio
import http.client
import os
import re
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from worker.app import run_worker
from worker.config import Settings
from worker.testing.scenario import Event
from worker.testing.topic_reader import reading
from worker.testing.topics import ensure_topics


def isolated_settings(database_url: str, bootstrap: str, **overrides: Any) -> Settings:
    """Settings with topics and a group of their own, so tests never see each other's data."""
    tag = uuid.uuid4().hex[:8]
    values: dict[str, Any] = {
        "database_url": database_url,
        "kafka_bootstrap": bootstrap,
        "input_topic": f"in-{tag}",
        "results_topic": f"results-{tag}",
        "dlq_topic": f"dlq-{tag}",
        "group_id": f"group-{tag}",
        "metrics_port": 0,
        "expiry_enabled": False,
        "commit_interval_ms": 50,
        # The embedded broker holds a new group's first join for half the session timeout.
        "session_timeout_ms": 6000,
        "log_format": "console",
    }
    values.update(overrides)
    return Settings(**values)


@dataclass(frozen=True)
class Published:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]

    @property
    def body(self) -> dict[str, Any]:
        assert self.value is not None
        parsed: dict[str, Any] = orjson.loads(self.value)
        return parsed


async def produce(settings: Settings, events: Iterable[Event]) -> list[tuple[int, int]]:
    """Produce events in order; return their (partition, offset)."""
    # Room for records at the worker's input limit with their headers (over 1 MiB).
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, linger_ms=5, max_request_size=4_194_304
    )
    await producer.start()
    try:
        futures = [
            await producer.send(settings.input_topic, e.value, key=e.key, headers=list(e.headers))
            for e in events
        ]
        metadata = await asyncio.gather(*futures)
        return [(m.partition, m.offset) for m in metadata]
    finally:
        await producer.stop()


# Run with AIOKAFKA_NO_EXTENSIONS: the pure-Python record builder asks a header name for its
# bytes, so a `str` can hand it some that are not UTF-8.
_ONE_BATCH_PRODUCER = """
import asyncio, json, sys
from aiokafka import AIOKafkaProducer

class RawName(str):
    def encode(self, *args, **kwargs):
        return b"x-\\xff-name"

async def main(bootstrap, topic, records):
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=500)
    await producer.start()
    try:
        futures = []
        for r in json.loads(records):
            headers = [(n, v.encode()) for n, v in r["headers"]]
            if r["bad"]:
                headers.append((RawName("x"), b"v"))
            futures.append(await producer.send(
                topic, r["value"].encode(), key=r["key"].encode(), headers=headers))
        print(json.dumps([(await f).offset for f in futures]))
    finally:
        await producer.stop()

asyncio.run(main(*sys.argv[1:]))
"""


async def produce_in_one_batch(
    bootstrap: str, topic: str, records: Sequence[dict[str, Any]]
) -> list[int]:
    """Produce `records` ({"key", "value", "headers": [(name, value)], "bad"}, all str but
    "bad") in one record batch (a long linger); a record marked bad gets a header name that
    is not UTF-8, which the Kafka client cannot decode. Returns their offsets."""
    producer = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _ONE_BATCH_PRODUCER,
        bootstrap,
        topic,
        orjson.dumps(list(records)).decode(),
        env={**os.environ, "AIOKAFKA_NO_EXTENSIONS": "1"},
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await producer.communicate()
    assert producer.returncode == 0
    offsets: list[int] = orjson.loads(out)
    return offsets


async def read_topic(
    bootstrap: str,
    topic: str,
    until: Callable[[list[Published]], bool],
    timeout_s: float = 60.0,
) -> list[Published]:
    """Read a topic from the beginning (no group) until `until(records)` or the timeout."""
    async with reading(bootstrap, topic) as reader:
        seen: list[Published] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not until(seen) and loop.time() < deadline:
            seen.extend(
                Published(m.topic, m.partition, m.offset, m.key, m.value, dict(m.headers or ()))
                for m in await reader.batch()
            )
        return seen


async def committed_offsets(settings: Settings, partitions: Iterable[int]) -> dict[int, int | None]:
    """The group's committed offset of these input partitions, read without joining it."""
    client = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, group_id=settings.group_id
    )
    await client.start()
    try:
        return {
            p: await client.committed(TopicPartition(settings.input_topic, p)) for p in partitions
        }
    finally:
        await client.stop()


async def read_results(settings: Settings, count: int, timeout_s: float = 60.0) -> list[Published]:
    """Read the results topic until at least `count` records arrived."""
    assert settings.kafka_bootstrap
    return await read_topic(
        settings.kafka_bootstrap, settings.results_topic, lambda seen: len(seen) >= count, timeout_s
    )


@asynccontextmanager
async def running_worker(settings: Settings, partitions: int = 3) -> AsyncIterator[None]:
    """The real worker, in this process, for the duration of the block."""
    await ensure_topics(settings, partitions)
    stop = asyncio.Event()
    task = asyncio.create_task(run_worker(settings, stop=stop, handle_signals=False))
    try:
        yield
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 60) == 0


async def worker_results(
    settings: Settings, events: Iterable[Event], count: int, partitions: int = 3
) -> list[Published]:
    """Run the real worker, produce `events`, and return once `count` results arrived."""
    async with running_worker(settings, partitions):
        await produce(settings, events)
        return await read_results(settings, count)


def http_get(port: int, path: str, timeout_s: float = 10.0) -> tuple[int, str]:
    """GET http://127.0.0.1:<port><path>, blocking: (status, body). From async code, run it
    in a thread (`asyncio.to_thread`), as the probes of a blocked loop are."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


METRIC_NAME = re.compile(r"\brelease_(?:worker|api)_[a-z0-9_]+")
SERIES_SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}


def exported_series(exposition: str) -> set[str]:
    """Every series name a /metrics page declares (`# TYPE` lines), present or not yet
    (a labelled gauge has no sample until its first label): histograms with their
    `_bucket`, `_sum` and `_count` series."""
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names.add(name)
            names.update(name + suffix for suffix in SERIES_SUFFIXES.get(kind, ()))
    return names


def queried_series(text: str) -> set[str]:
    """The release_worker_* / release_api_* series a PromQL text (or a dashboard) names."""
    return set(METRIC_NAME.findall(text))
