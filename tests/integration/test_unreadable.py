"""An unreadable record inside a record batch, through the real client and broker (finding 15).

aiokafka parses a record batch from its first record and gives up on the whole batch at a
header name that is not UTF-8, so the records after the bad one in its batch cannot be
read either. The worker answers the span with one `unreadable_record` rejection, named
after its first offset, and reads on from the next batch. (The unit tests in
test_consumer.py cover gaps in the offsets with a fake source.)
"""

from __future__ import annotations

import uuid

import pytest

from tests.conftest import Servers
from tests.integration.conftest import World
from tests.support import produce, produce_in_one_batch, read_topic, running_worker
from worker.testing.scenario import abandon_event

pytestmark = pytest.mark.integration


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
        before, bad, behind = await produce_in_one_batch(
            servers.bootstrap, world.settings.input_topic, batch
        )
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
