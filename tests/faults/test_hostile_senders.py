"""Hostile senders against a real worker process, real PostgreSQL and the real broker.

DESIGN.md §7: no input, alone or in volume, with any documented setting, makes the process
exit, a lane die or a partition stall.
"""

from __future__ import annotations

import re
import time
import uuid

import pytest

from tests.faults.conftest import BedFactory
from worker.auth import MAX_CACHED_DIGESTS, key_digest
from worker.testing.scenario import abandon_event

pytestmark = pytest.mark.faults

# Past the authenticator's cache bound: the old purge (keep only unexpired entries, none
# with TTL 0) ran once the cache passed MAX_CACHED_DIGESTS, and the next decision read an
# entry it had just dropped: a KeyError that ended the process (finding 3).
FLOOD = MAX_CACHED_DIGESTS + 1_000


@pytest.mark.timeout(600)
async def test_distinct_unknown_keys_past_the_cache_bound_with_a_zero_ttl_are_all_401(
    bed_factory: BedFactory,
) -> None:
    async with bed_factory(partitions=2, auth_cache_ttl_s=0) as bed:
        await bed.seed(carts=1)
        run = uuid.uuid4().hex[:8]
        keys = [f"rk_flood_{run}_{n}" for n in range(FLOOD)]
        flood = [
            abandon_event(f"{bed.prefix}c-{n % 500}", [("i", f"r-{n}")], key, event_id=f"f-{n}")
            for n, key in enumerate(keys)
        ]
        # A partner's own release behind the flood: the partitions keep moving through it.
        items = [("item-0", bed.rid(0, 0))]
        last = abandon_event(bed.cart_id(0), items, bed.api_key, event_id=f"{bed.prefix}ok")
        worker = await bed.start_worker()
        started = time.monotonic()
        await bed.produce([*flood, last])
        await bed.wait_drained(timeout_s=420)
        drained_s = time.monotonic() - started
        assert worker.running, f"the worker exited during the flood\n{worker.tail()}"

        want = {(f"f-{n}", "None") for n in range(FLOOD)} | {(f"{bed.prefix}ok", bed.rid(0, 0))}
        results = await bed.read_results(want, timeout_s=180)
        codes: dict[str, set[tuple[int, str]]] = {}
        for r in results:
            body = r.body
            if body["type"] == "event_rejected":
                codes.setdefault(body["eventId"], set()).add(
                    (body["status"], body["errors"][0]["code"])
                )
        assert len(codes) == FLOOD
        assert set().union(*codes.values()) == {(401, "unknown_api_key")}
        (ok,) = {r.body["outcome"] for r in results if r.body["eventId"] == f"{bed.prefix}ok"}
        assert ok == "released"

        log = worker.log_path.read_text(errors="replace")
        assert "Traceback" not in log
        assert "KeyError" not in log
        digests = {key_digest(k).hex() for k in keys}
        assert not digests & set(re.findall(r"[0-9a-f]{64}", log)), "a key's digest was logged"
        code, _ = await worker.terminate(timeout_s=30)
        assert code == 0
        print(
            f"\n[fault] {FLOOD} distinct unknown keys, TTL 0: all 401, drained in "
            f"{drained_s:.1f}s (produce + apply + publish), worker exit 0"
        )
