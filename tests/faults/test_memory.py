"""Memory is bounded in bytes, not only in records (issue 9, finding 9).

Every record is a valid release of about 1 MiB (a large `attributes` value pads it to just
under WORKER_MAX_RECORD_BYTES), so each one is fetched, queued, parsed and applied, not
rejected at the door. The worker reaches PostgreSQL through a proxy that the test stalls
for a while: the database hangs, the worker keeps fetching, and its lanes fill up to their
bounds. With the default settings its peak RSS must stay under the bound the README
documents (Memory), however many records wait.
"""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from tests.faults.conftest import BedFactory
from tests.faults.harness import Bed
from tests.faults.proxy import Proxy
from worker.testing.embedded import free_port
from worker.testing.scenario import Event

pytestmark = pytest.mark.faults

# `make test` runs 1,000 (about a minute: already far past the bound); `make test-memory` 3,000.
RECORDS = int(os.environ.get("MEMORY_TEST_RECORDS", "1000"))
RSS_BOUND_MB = 600  # README, "Memory": default settings, every record at the size limit
STALL_S = 20  # long enough for the fetcher to fill the lanes while the database hangs


def _padded(event: Event, size: int) -> Event:
    assert event.value is not None
    body = orjson.loads(event.value)
    body["attributes"] = {"padding": ""}
    room = size - len(orjson.dumps(body))
    body["attributes"]["padding"] = "x" * room
    value = orjson.dumps(body)
    assert len(value) == size
    return replace(event, value=value)


async def _produce_large(bed: Bed, events: list[Event]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bed.bootstrap, max_request_size=2 * 1024 * 1024, linger_ms=5
    )
    await producer.start()
    try:
        for n in range(0, len(events), 100):
            futures = [
                await producer.send(
                    bed.settings.input_topic, e.value, key=e.key, headers=list(e.headers)
                )
                for e in events[n : n + 100]
            ]
            for future in futures:
                metadata = await future
                bed.produced[metadata.partition] = max(
                    bed.produced.get(metadata.partition, 0), metadata.offset + 1
                )
    finally:
        await producer.stop()


def _peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    assert match, status
    return int(match.group(1)) / 1024


async def test_records_at_the_size_limit_keep_the_worker_under_its_memory_bound(
    bed_factory: BedFactory,
) -> None:
    async with bed_factory() as bed:
        assert bed.settings.database_url
        url = urlsplit(bed.settings.database_url)
        assert url.port
        proxy = Proxy(url.port, free_port())
        await proxy.start()
        try:
            await bed.seed(carts=RECORDS // 2)
            stream = bed.stream(replay_share=0, whole_cart_share=0)
            size = bed.settings.max_record_bytes - 512  # the headers stay under the limit too
            stream.events = [_padded(e, size) for e in stream.events]
            await _produce_large(bed, stream.events)
            proxied = url._replace(
                netloc=url.netloc.replace(f":{url.port}", f":{proxy.listen_port}")
            )
            worker = await bed.start_worker(database_url=proxied.geturl())
            await bed.wait_applied(1, timeout_s=120)
            proxy.stall()
            await asyncio.sleep(1)  # a commit already on its way may still land
            applied_in_stall = await bed.applied()
            await asyncio.sleep(STALL_S - 1)
            stalled_peak = _peak_rss_mb(worker.pid)
            # The stall reached the worker: its bytes were held and nothing was applied.
            frozen = await bed.applied() == applied_in_stall
            await proxy.restore()
            await bed.wait_drained(timeout_s=600)
            peak = _peak_rss_mb(worker.pid)
            code, _ = await worker.terminate(30)
        finally:
            await proxy.stop()
        assert code == 0, worker.tail()
        assert proxy.held > 0, "the worker sent nothing to the database during the stall"
        assert frozen, "records were applied while the database was stalled"
        counts = await bed.check(
            stream,
            f"{len(stream.events)} records of {size:,} bytes, the database stalled for "
            f"{STALL_S}s: worker peak RSS {stalled_peak:.0f} MB while stalled, {peak:.0f} MB "
            f"overall (bound {RSS_BOUND_MB} MB)",
        )
        print(f"\n[memory] {len(stream.events)} records of {size:,} B, peak RSS {peak:.0f} MB")
        assert counts.records == len(stream.events)
        assert peak < RSS_BOUND_MB
