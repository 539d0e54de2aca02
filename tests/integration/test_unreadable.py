"""An unreadable record inside a record batch, through the real client and broker (finding 15).

aiokafka parses a record batch from its first record and gives up on the whole batch at a
header name that is not UTF-8, so the records after the bad one in its batch cannot be
read either. The worker answers the span with one `unreadable_record` rejection, named
after its first offset, and reads on from the next batch. (The unit tests in
test_consumer.py cover gaps in the offsets with a fake source.)
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid

import orjson
import pytest

from tests.conftest import Servers
from tests.integration.conftest import World
from tests.support import produce, read_topic, running_worker
from worker.testing.scenario import abandon_event

pytestmark = pytest.mark.integration

# Sends its records in one batch (one key, a long linger); a record marked bad gets a
# header name that is not UTF-8 (aiokafka's pure-Python builder, AIOKAFKA_NO_EXTENSIONS,
# asks the name for its bytes). Prints the offsets it got.
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


async def test_a_bad_header_mid_batch_costs_one_rejection_for_the_rest_of_its_batch(
    world: World, servers: Servers
) -> None:
    tag = uuid.uuid4().hex[:8]
    cart = f"cart-{tag}"
    events = {
        name: abandon_event(cart, None, world.api_key, event_id=f"{tag}-{name}")
        for name in ("before", "bad", "behind", "after")
    }
    batch = [
        {
            "key": cart,
            "value": (events[name].value or b"").decode(),
            "headers": [(n, v.decode()) for n, v in events[name].headers],
            "bad": name == "bad",
        }
        for name in ("before", "bad", "behind")
    ]
    async with running_worker(world.settings):
        producer = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _ONE_BATCH_PRODUCER,
            servers.bootstrap,
            world.settings.input_topic,
            orjson.dumps(batch).decode(),
            env={**os.environ, "AIOKAFKA_NO_EXTENSIONS": "1"},
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await producer.communicate()
        assert producer.returncode == 0
        before, bad, behind = orjson.loads(out)
        [(partition, after)] = await produce(world.settings, [events["after"]])
        results = await read_topic(
            servers.bootstrap,
            world.settings.results_topic,
            lambda seen: f"{tag}-after" in {r.body.get("eventId") for r in seen},
            timeout_s=20,
        )
    answered = [r.body["eventId"] for r in results]
    position = f"{world.settings.input_topic}/{partition}/{bad}"
    assert bad == before + 1
    assert after > behind
    assert f"{tag}-before" in answered
    assert f"{tag}-bad" not in answered
    assert f"{tag}-behind" not in answered  # in the bad record's batch: unreadable too
    assert answered.count(position) == 1  # one rejection for the span (it was one per offset)
    [rejection] = [r.body for r in results if r.body["eventId"] == position]
    assert rejection["errors"][0]["code"] == "unreadable_record"
    assert f"offsets {bad}-{behind}" in rejection["errors"][0]["message"]
