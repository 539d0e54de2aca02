"""The sweeper's results: what an expired reservation publishes."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson

from worker.expiry import expiry_result
from worker.release import Reservation

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def test_an_expiry_result_names_the_reservations_partner() -> None:
    row = Reservation("r1", "pA", "c1", "i1", "s1", "default", 3, "reserved")
    result = expiry_result(row, "results", NOW)
    assert (result.topic, result.key) == ("results", b"c1")
    assert dict(result.headers) == {"event-id": b"expiry:r1", "partner-id": b"pA"}
    body = orjson.loads(result.payload or b"")
    assert (body["trigger"], body["outcome"], body["quantity"]) == ("expiry", "expired", 3)
