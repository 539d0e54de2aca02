"""`metrics.RunHistogram`: one value observed several times over in one call."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram

from worker.metrics import RunHistogram

BUCKETS = (0.01, 0.1, 1.0, 10.0)


def _samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    return {
        (s.name, s.labels.get("le", "")): s.value
        for metric in registry.collect()
        for s in metric.samples
    }


@pytest.mark.parametrize(
    ("runs"), [[(0.05, 3)], [(0.0, 1), (0.1, 2), (0.1000001, 4), (3.5, 1), (99.0, 5)], []]
)
def test_observe_times_records_what_as_many_observes_would(runs: list[tuple[float, int]]) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    run = RunHistogram("latency_seconds", "l", buckets=BUCKETS, registry=ours)
    plain = Histogram("latency_seconds", "l", buckets=BUCKETS, registry=theirs)
    for amount, times in runs:
        run.observe_times(amount, times)
        for _ in range(times):
            plain.observe(amount)

    got, expected = _samples(ours), _samples(theirs)
    total = ("latency_seconds_sum", "")
    assert got.pop(total) == pytest.approx(expected.pop(total))
    assert got == expected  # every bucket and the count exactly
