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
from worker.logs import LineBudget
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
        processor._count(probing(records=1, items=50_000), LineBudget(per_second=10))
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
        processor._count(probing(records=500, items=2), budget)
        now[0] = 1.5
        processor._count(probing(records=1, items=1), budget)
    lines = attempts(logs)
    assert len(lines) == 11
    assert [line["suppressed"] for line in lines] == [0] * 10 + [490]
    assert REGISTRY.get_sample_value(METRIC) == before + 1001
