"""The Grafana dashboard (deploy/grafana/release-worker.json) queries only series a live
worker's /metrics serves, and covers what an operator watches."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests.integration.conftest import World
from tests.support import exported_series, http_get, queried_series, running_worker
from worker.testing.embedded import free_port

pytestmark = pytest.mark.integration

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "release-worker.json"


def dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel["targets"]]


async def ready(port: int) -> None:
    """Until /readyz answers 200: assigned, so the per-partition series exist from then on."""
    async with asyncio.timeout(30):
        while True:
            try:
                status, _ = await asyncio.to_thread(http_get, port, "/readyz")
            except OSError:  # the server is not listening yet
                status = 0
            if status == 200:
                return
            await asyncio.sleep(0.2)


async def test_every_series_the_dashboard_queries_is_on_a_live_workers_metrics(
    world: World,
) -> None:
    queried = set().union(*(queried_series(expr) for expr in dashboard_queries()))
    for watched in (
        "release_worker_records_total",  # throughput
        "release_worker_items_total",  # outcomes
        "release_worker_rejections_total",  # rejections by status
        "release_worker_consumer_lag",  # lag per partition
        "release_worker_record_latency_seconds_bucket",  # result latency
        "release_worker_dead_letters_total",
        "release_worker_outbox_backlog",
        "release_worker_retries_total",
        "release_worker_lock_waits_total",
    ):
        assert watched in queried, f"the dashboard has no panel on {watched}"

    settings = world.settings.model_copy(update={"metrics_port": free_port()})
    async with running_worker(settings):
        await ready(settings.metrics_port)
        status, page = await asyncio.to_thread(http_get, settings.metrics_port, "/metrics")
    assert status == 200
    assert queried - exported_series(page) == set()
    assert 'release_worker_consumer_lag{partition="0"}' in page
