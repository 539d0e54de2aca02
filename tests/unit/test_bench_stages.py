"""bench.stages.breakdown (where a record's time goes) and bench.latency_ab's variants."""

from __future__ import annotations

import pytest

from bench.latency_ab import parse_variant
from bench.stages import Row, breakdown


def row(offset: int, ts: float, fetched: float, began: float, done: float, sent: float) -> Row:
    return [0, offset, ts, fetched, began, done, sent]


def test_breakdown_splits_each_record_by_stage_and_singles_out_the_slowest() -> None:
    # 99 records of 10 ms (1 fetch, 2 queue, 6 txn, 1 publish) and one of 100 ms
    # (10 fetch, 40 queue, 45 txn, 5 publish), all within the window.
    rows = [row(i, 1000 + i, 1001 + i, 1003 + i, 1009 + i, 1010 + i) for i in range(99)]
    rows.append(row(99, 1100, 1110, 1150, 1195, 1200))
    rows.append([0, 100, 0, None, 5, 6, 7])  # never seen fetched: left out
    data = {"rows": rows, "batches": [(1003, 1009, 5), (1150, 1195, 1)], "commits": [(1008, 2.0)]}

    result = breakdown(data, seconds=1.0)

    assert result["all"]["records"] == 100
    assert result["all"]["fetch"] == pytest.approx((99 * 1 + 10) / 100, abs=0.05)
    assert result["all"]["queue"] == pytest.approx((99 * 2 + 40) / 100, abs=0.05)
    assert result["slowest_1pct"] == {
        "records": 1,
        "fetch": 10.0,
        "queue": 40.0,
        "txn": 45.0,
        "publish": 5.0,
        "total": 100.0,
    }
    assert result["p99_ms"] == 100.0
    assert result["batches"]["count"] == 2
    assert result["commit_ms"] == {"p50": 2.0, "p99": 2.0}


def test_breakdown_keeps_only_the_measured_window() -> None:
    early = row(0, 0, 50, 60, 70, 80)  # the warm-up: 80 ms, far before the window
    late = [row(i, 10_000 + i, 10_001 + i, 10_002 + i, 10_003 + i, 10_004 + i) for i in range(1, 5)]
    result = breakdown({"rows": [early, *late], "batches": []}, seconds=1.0)
    assert result["all"]["records"] == 4
    assert result["all"]["total"] == 4.0


def test_variants_name_worker_settings_only() -> None:
    assert parse_variant("base") == ("base", {})
    assert parse_variant("l4:WORKER_LANES=4,WORKER_PRODUCER_LINGER_MS=20") == (
        "l4",
        {"lanes": "4", "producer_linger_ms": "20"},
    )
    with pytest.raises(SystemExit):
        parse_variant("x:LANES=4")


def test_breakdown_splits_the_fetch_at_the_response_that_brought_the_record() -> None:
    # Sent at 1000, its fetch asked at 995 and answered (parsed by the loop) at 1010, handed
    # to its lane at 1030: 10 ms to the worker, 20 in aiokafka's buffer, a 15 ms fetch.
    stamped = [0, 1, 1000, 1030, 1040, 1050, 1060, 995, 1010]
    unstamped = [0, 2, 1000, 1030, 1040, 1050, 1060, None, None]
    result = breakdown({"rows": [stamped, unstamped], "batches": []}, seconds=1.0)
    assert result["all"]["fetch"] == 30.0
    assert result["all"]["fetch_to_worker"] == 10.0  # over the stamped record only
    assert result["all"]["fetch_handover"] == 20.0
    assert result["all"]["fetch_response_ms"] == 15.0
