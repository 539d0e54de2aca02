"""Finding 16: one sender cannot flood the logs with `security_cross_partner_attempt`.

One line per record (with the count and a few reservation ids), at most
`CROSS_PARTNER_LINES_PER_S` lines a second per process, with the number of lines held
back reported on the next one; the metric still counts every item.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from worker import processor
from worker.contract import Rejection
from worker.logs import LineBudget
from worker.records import RawRecord
from worker.release import BatchReport

METRIC = "release_worker_cross_partner_attempts_total"


def probing(records: int, items: int) -> BatchReport:
    """A batch of `records` records, each naming `items` reservations of another partner."""
    report = BatchReport(records=records)
    report.cross_partner = [
        ("p-b", f"e-{r}", f"their-reservation-{r}-{i}")
        for r in range(records)
        for i in range(items)
    ]
    return report


def attempts(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == "security_cross_partner_attempt"]


def test_one_line_per_record_however_many_items_and_the_metric_counts_them_all() -> None:
    before = REGISTRY.get_sample_value(METRIC) or 0.0
    with capture_logs() as logs:
        processor._count(probing(records=1, items=50_000), LineBudget(10), LineBudget(100))
    (line,) = attempts(logs)
    assert line["partner_id"] == "p-b"
    assert line["event_id"] == "e-0"
    assert line["items"] == 50_000
    assert line["reservation_ids"] == [f"their-reservation-0-{i}" for i in range(5)]
    assert line["suppressed"] == 0
    assert REGISTRY.get_sample_value(METRIC) == before + 50_000


def test_lines_past_the_budget_are_held_back_and_counted_on_the_next_line() -> None:
    now = [0.0]
    budget = LineBudget(per_second=10, clock=lambda: now[0])
    before = REGISTRY.get_sample_value(METRIC) or 0.0
    with capture_logs() as logs:
        processor._count(probing(records=500, items=2), budget, LineBudget(100))
        now[0] = 1.5
        processor._count(probing(records=1, items=1), budget, LineBudget(100))
    lines = attempts(logs)
    assert len(lines) == 11
    assert [line["suppressed"] for line in lines] == [0] * 10 + [490]
    assert REGISTRY.get_sample_value(METRIC) == before + 1001


def test_rejection_lines_are_budgeted_too_and_the_held_back_are_counted() -> None:
    """A flood of bad records (e.g. 100,000 unknown keys) writes at most
    `REJECTION_LINES_PER_S` `record_rejected` lines a second, not one per record; the next
    line says how many were held back, and the rejection metric counts every record."""
    metric = "release_worker_rejections_total"
    now = [0.0]
    budget = LineBudget(per_second=100, clock=lambda: now[0])
    before = REGISTRY.get_sample_value(metric, {"status": "401"}) or 0.0
    flood = BatchReport(records=1000)
    flood.rejected = [
        (RawRecord("in", 0, n, None, b"{}"), Rejection(401, "unknown_api_key", "unknown"))
        for n in range(1000)
    ]
    with capture_logs() as logs:
        processor._count(flood, LineBudget(10), budget)
        now[0] = 1.5
        processor._count(
            BatchReport(records=1, rejected=[flood.rejected[0]]), LineBudget(10), budget
        )
    lines = [e for e in logs if e["event"] == "record_rejected"]
    assert len(lines) == 101
    assert [line["suppressed"] for line in lines] == [0] * 100 + [900]
    assert REGISTRY.get_sample_value(metric, {"status": "401"}) == before + 1001
