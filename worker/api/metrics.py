"""Prometheus series of `release-worker api` (prefixed `release_api_`), in a registry of
their own: the api's /metrics shows these, not the worker's series it never moves."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter(
    "release_api_requests_total",
    "POST /v1/cart/release answers, by HTTP status.",
    ["status"],
    registry=REGISTRY,
)
LATENCY = Histogram(
    "release_api_request_seconds",
    "Time to answer POST /v1/cart/release (request read to answer ready).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=REGISTRY,
)
WAITERS = Gauge(
    "release_api_waiters", "Events this process waits for the results of.", registry=REGISTRY
)
RESULTS_READ = Counter(
    "release_api_results_read_total",
    "Results read from the results topic, by whether a request here waited for them.",
    ["matched"],
    registry=REGISTRY,
)
for _status in ("200", "400", "401", "403", "406", "422", "500", "503", "504"):
    REQUESTS.labels(status=_status)
