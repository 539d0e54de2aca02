"""Operating the worker: /metrics during a run, /readyz through a PostgreSQL outage, doctor."""

from __future__ import annotations

import asyncio
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import asyncpg
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from tests.conftest import Servers
from tests.integration.conftest import World, reserve
from tests.support import Published, produce, read_topic, running_worker
from tests.support import http_get as http_get_blocking
from worker import store
from worker.cli.doctor import check_database, check_kafka
from worker.config import Settings
from worker.metrics import RETRIES
from worker.testing.embedded import free_port
from worker.testing.environment import settings_env
from worker.testing.scenario import Event, abandon_event
from worker.testing.topics import ensure_topics

pytestmark = pytest.mark.integration

T = TypeVar("T")
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
OPERATIONS_DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
# `task` names a supervised task: a fixed set of names in the code (app.py, api/server.py).
BOUNDED_LABELS = {"result", "status", "outcome", "cause", "partition", "le", "reason", "task"}


async def http_get(port: int, path: str) -> tuple[int, str]:
    return await asyncio.to_thread(http_get_blocking, port, path, 5.0)


async def eventually(
    probe: Callable[[], Awaitable[T | None]], what: str, timeout_s: float = 30
) -> T:
    """Poll until `probe` returns something other than None."""
    async with asyncio.timeout(timeout_s):
        while True:
            found = await probe()
            if found is not None:
                return found
            await asyncio.sleep(0.2)
    raise AssertionError(what)  # unreachable: the timeout raises first


async def status_becomes(port: int, path: str, status: int) -> str:
    async def probe() -> str | None:
        try:
            got, text = await http_get(port, path)
        except ConnectionRefusedError:  # the worker is still starting its endpoints
            return None
        return text if got == status else None

    return await eventually(probe, f"{path} never answered {status}")


def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


async def scrape(port: int) -> tuple[Samples, dict[str, set[str]]]:
    """Samples by (name, labels) and, per exported `release_worker_` series, its label names."""
    status, text = await http_get(port, "/metrics")
    assert status == 200
    samples: Samples = {}
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("release_worker_"):
            continue
        name = family.name + ("_total" if family.type == "counter" else "")
        series[name] = set()
        for s in family.samples:
            samples[key(s.name, **s.labels)] = s.value
            series[name] |= set(s.labels)
    return samples, series


def in_process(name: str, **labels: str) -> float:
    """The same registry, read directly: the value before the worker starts."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def with_ops(settings: Settings, **changes: object) -> Settings:
    return settings.model_copy(update={"metrics_port": free_port(), **changes})


async def test_metrics_endpoint_shows_a_run_with_plausible_values(
    db: asyncpg.Pool, world: World
) -> None:
    p = world.prefix
    await reserve(db, world, f"{p}-r1", f"{p}-c1", "i1", 2)
    await reserve(db, world, f"{p}-x1", f"{p}-c9", "i1", 1, partner_id=world.other_partner_id)
    await reserve(db, world, f"{p}-old", f"{p}-c3", "i1", 3)
    await db.execute(
        "UPDATE reservations SET expires_at = now() - interval '1 minute' "
        "WHERE reservation_id = $1",
        f"{p}-old",
    )
    settings = with_ops(
        world.settings, expiry_enabled=True, expiry_interval_s=0.2, outbox_relay_interval_s=0.2
    )
    good = abandon_event(
        f"{p}-c1", [("i1", f"{p}-r1"), ("i2", f"{p}-x1")], world.api_key, event_id=f"{p}-e1"
    )
    unknown_key = abandon_event(f"{p}-c2", None, "not-a-key", event_id=f"{p}-e2")
    unreadable = Event(b"cart", b"{not json", good.headers)
    counted = {
        "records": key("release_worker_records_total", result="processed"),
        "rejected": key("release_worker_records_total", result="rejected"),
        "401": key("release_worker_rejections_total", status="401"),
        "400": key("release_worker_rejections_total", status="400"),
        "dead": key("release_worker_dead_letters_total"),
        "released": key("release_worker_items_total", outcome="released"),
        "not_found": key("release_worker_items_total", outcome="not_found"),
        "expired": key("release_worker_items_total", outcome="expired"),
        "cross": key("release_worker_cross_partner_attempts_total"),
        "expiry": key("release_worker_expiry_releases_total"),
        "quantity": key("release_worker_released_quantity_total"),
        "batched": key("release_worker_batch_records_sum"),
        "batches": key("release_worker_batch_duration_seconds_count"),
        "latencies": key("release_worker_record_latency_seconds_count"),
        "latency_sum": key("release_worker_record_latency_seconds_sum"),
    }
    before = {k: in_process(name, **dict(labels)) for k, (name, labels) in counted.items()}

    def all_results(seen: list[Published]) -> bool:
        ids = [r.body.get("eventId") for r in seen]
        rejections = sum(r.body.get("type") == "event_rejected" for r in seen)
        return ids.count(f"{p}-e1") == 2 and rejections == 2 and f"expiry:{p}-old" in ids

    with capture_logs() as logged:
        async with running_worker(settings):
            started = time.time()  # no record latency and no loop delay can exceed the run
            positions = await produce(settings, [good, unknown_key, unreadable])
            await read_topic(settings.kafka_bootstrap or "", settings.results_topic, all_results)
            next_offsets: dict[str, int] = {}
            for partition, offset in positions:
                next_offsets[str(partition)] = max(next_offsets.get(str(partition), 0), offset + 1)

            async def settled() -> tuple[Samples, dict[str, set[str]]] | None:
                samples, series = await scrape(settings.metrics_port)
                lag = "release_worker_consumer_lag"
                lags = [samples.get(key(lag, partition=str(n))) for n in range(3)]
                committed = {
                    part: samples.get(key("release_worker_committed_offset", partition=part))
                    for part in next_offsets
                }
                ready = samples.get(key("release_worker_ready")) == 1  # sampled every 0.5 s
                # The backlog gauge shows the table (sampled every relay pass).
                waiting, parked = await store.outbox_backlog(db)
                backlog = (
                    samples.get(key("release_worker_outbox_backlog")),
                    samples.get(key("release_worker_outbox_parked_rows")),
                )
                caught_up = (
                    lags == [0, 0, 0]
                    and committed == next_offsets
                    and ready
                    and backlog == (waiting, parked)
                )
                return (samples, series) if caught_up else None

            samples, series = await eventually(
                settled,
                "never ready with lag 0, the offsets committed and the outbox gauges "
                "equal to the table's counts",
            )
            elapsed = time.time() - started
            assert (await http_get(settings.metrics_port, "/healthz"))[0] == 200
            assert await http_get(settings.metrics_port, "/readyz") == (200, "ready\n")

    events = [e["event"] for e in logged]
    for expected in ("worker_started", "partitions_assigned", "worker_stopped"):
        assert expected in events
    rejected = {e["status"]: e for e in logged if e["event"] == "record_rejected"}
    assert (rejected[401]["cart_id"], rejected[401]["event_id"]) == (f"{p}-c2", f"{p}-e2")
    assert rejected[400]["dead_lettered"] is True
    assert not any(world.api_key in repr(e) for e in logged), "an API key was logged"

    delta = {k: samples.get(counted[k], 0.0) - before[k] for k in counted}
    assert delta["records"] == 1
    assert delta["rejected"] == 2
    assert (delta["401"], delta["400"], delta["dead"]) == (1, 1, 1)
    assert (delta["released"], delta["not_found"], delta["cross"]) == (1, 1, 1)
    assert delta["expiry"] >= 1
    assert delta["expired"] >= 1
    assert delta["quantity"] >= 2 + 3
    assert delta["batched"] == 3  # every input record went through exactly one batch
    assert delta["batches"] >= 1
    assert delta["latencies"] >= 4  # two item results, two rejections
    latency = samples[key("release_worker_record_latency_seconds_sum")] - before["latency_sum"]
    assert 0 < latency <= elapsed * delta["latencies"]
    assert samples[key("release_worker_ready")] == 1
    assert samples[key("release_worker_assigned_partitions")] == 3
    assert 0 <= samples[key("release_worker_stalled_seconds")] < settings.stall_timeout_s
    assert 0 <= samples[key("release_worker_event_loop_delay_seconds")] <= elapsed
    assert key("release_worker_retries_total", cause="race") in samples

    documented = set(re.findall(r"`(release_worker_[a-z_]+)`", OPERATIONS_DOC.read_text()))
    assert documented == set(series), "docs/operations.md and /metrics list different series"
    for name, labels in series.items():
        assert labels <= BOUNDED_LABELS, f"{name} has an unbounded label: {labels}"


async def test_readyz_follows_a_postgresql_outage_and_work_resumes_after(
    servers: Servers, db: asyncpg.Pool, world: World
) -> None:
    if servers.stack is None:
        pytest.skip("the servers come from WORKER_* variables: this test cannot stop them")
    postgres = servers.stack.postgres
    p = world.prefix
    await reserve(db, world, f"{p}-r1", f"{p}-c1", "i1", 2)
    settings = with_ops(world.settings, retry_max_s=0.5)
    port = settings.metrics_port
    retries = "release_worker_retries_total"
    retries_before = sum(
        s.value for family in RETRIES.collect() for s in family.samples if s.name == retries
    )
    async with running_worker(settings):
        await status_becomes(port, "/readyz", 200)
        await asyncio.to_thread(postgres.stop)
        try:
            reason = await status_becomes(port, "/readyz", 503)
            assert "database" in reason
            # An outage is waited out, not a reason to restart the process.
            assert (await http_get(port, "/healthz"))[0] == 200
            await produce(
                settings,
                [abandon_event(f"{p}-c1", [("i1", f"{p}-r1")], world.api_key, event_id=f"{p}-e1")],
            )
            await asyncio.sleep(1)  # the record is fetched and its database work retried
        finally:
            await asyncio.to_thread(postgres.start)
            await db.expire_connections()
        await status_becomes(port, "/readyz", 200)
        results = await read_topic(
            settings.kafka_bootstrap or "",
            settings.results_topic,
            lambda seen: any(r.body.get("eventId") == f"{p}-e1" for r in seen),
        )
        samples, _ = await scrape(port)
    assert [r.body["outcome"] for r in results if r.body.get("eventId") == f"{p}-e1"] == [
        "released"
    ]
    retries_after = sum(v for (name, _), v in samples.items() if name == retries)
    assert retries_after > retries_before


async def run_doctor(env: dict[str, str]) -> tuple[int, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "doctor",
        env={**clean, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, output.decode()


def doctor_env(settings: Settings, database_url: str) -> dict[str, str]:
    return settings_env(settings, database_url=database_url)


async def test_doctor_passes_on_a_migrated_database_with_all_topics(
    db: asyncpg.Pool, world: World
) -> None:
    await ensure_topics(world.settings, 2)
    # The session's database is shared: earlier tests may leave inbox rows above a
    # watermark (stopped workers, the watermark tests' deliberate gaps). Doctor must
    # report the count it finds, whatever it is.
    unpublished = await store.unpublished_backlog(db)
    # The worker's own least-privilege login, with a password that must not be printed.
    database_url = world.settings.database_url or ""
    password = urlsplit(database_url).password
    code, output = await run_doctor(doctor_env(world.settings, database_url))
    assert code == 0, output
    assert "✗" not in output
    assert password
    assert password not in output
    assert "has what the worker needs" in output
    assert f"✓ input topic: '{world.settings.input_topic}': 2 partition(s)" in output
    assert "✓ consumer group: joinable" in output
    assert "✓ outbox: no parked rows" in output
    assert "✓ message size: WORKER_MAX_MESSAGE_BYTES 1048588 fits" in output
    assert f"✓ unpublished results: {unpublished} inbox row(s) above" in output
    assert "All 11 checks passed." in output


@pytest.mark.parametrize("reachable", [True, False])
async def test_doctor_never_prints_a_password_given_in_the_query_string(
    world: World, reachable: bool
) -> None:
    parts = urlsplit(world.settings.database_url or "")
    password = unquote(parts.password or "")
    host = parts.netloc.rpartition("@")[2] if reachable else "127.0.0.1:1"
    url = urlunsplit(
        parts._replace(
            netloc=f"{parts.username}@{host}",
            query=f"sslmode=disable&password={quote(password, safe='')}",
        )
    )
    code, output = await run_doctor(doctor_env(world.settings, url))
    assert password
    assert password not in output
    assert quote(password, safe="") not in output
    if reachable:  # every database check ran and printed its line
        assert "has what the worker needs" in output, output
    else:
        assert code == 1
        assert "✗ PostgreSQL: cannot connect to" in output, output
        assert "password=***" in output


async def test_doctor_names_the_privileges_a_login_lacks(
    servers: Servers, db: asyncpg.Pool
) -> None:
    login = f"doctor_{uuid.uuid4().hex[:8]}"
    await db.execute(f"CREATE ROLE {login} LOGIN")
    parts = urlsplit(servers.database_url)
    url = urlunsplit(parts._replace(netloc=f"{login}@{parts.netloc.rpartition('@')[2]}"))
    try:
        bare = await check_database(Settings(database_url=url))
        # Some grants, not all: the check names exactly what is still missing.
        await db.execute(f"GRANT SELECT ON schema_migrations, partners, inbox TO {login}")
        partial = await check_database(Settings(database_url=url))
    finally:
        await db.execute(f"DROP OWNED BY {login}")
        await db.execute(f"DROP ROLE {login}")
    assert [(c.name, c.ok) for c in bare] == [("PostgreSQL", True), ("database privileges", False)]
    assert "may not read the schema version" in bare[-1].detail
    assert [(c.name, c.ok) for c in partial] == [
        ("PostgreSQL", True),
        ("schema", True),
        ("database privileges", False),
    ]
    assert "UPDATE(reserved) ON stock" in partial[-1].detail
    assert "INSERT ON inbox" in partial[-1].detail
    assert "SELECT ON partners" not in partial[-1].detail
    for check in (bare[-1], partial[-1]):
        assert f"GRANT release_worker TO {login}" in check.fix


async def test_doctor_reports_a_missing_topic_and_an_unmigrated_database(
    servers: Servers, db: asyncpg.Pool, world: World
) -> None:
    database = f"doctor_{uuid.uuid4().hex[:8]}"
    await db.execute(f'CREATE DATABASE "{database}"')
    settings = world.settings
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:  # the input and results topics exist; the dead-letter topic does not
        await admin.create_topics(
            [NewTopic(settings.input_topic, 2, 1), NewTopic(settings.results_topic, 2, 1)]
        )
    finally:
        await admin.close()
    fresh_url = urlunsplit(urlsplit(servers.database_url)._replace(path=f"/{database}"))
    try:
        code, output = await run_doctor(doctor_env(settings, fresh_url))
    finally:
        await db.execute(f'DROP DATABASE "{database}" WITH (FORCE)')
    assert code == 1, output
    assert "✓ PostgreSQL: version" in output
    assert "✗ schema: The database is not migrated" in output
    assert "fix: run `release-worker migrate`" in output
    assert f"✗ dead-letter topic: '{settings.dlq_topic}' does not exist" in output
    assert f"--create --topic {settings.dlq_topic} " in output
    assert f"✓ input topic: '{settings.input_topic}': 2 partition(s)" in output
    assert "✓ consumer group: joinable" in output
    assert "2 problem(s) found" in output


async def test_doctor_says_when_a_topic_accepts_less_than_worker_max_message_bytes(
    world: World,
) -> None:
    settings = world.settings
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:  # a dead-letter topic that takes at most 100,000 bytes a message
        await admin.create_topics(
            [
                NewTopic(settings.input_topic, 1, 1),
                NewTopic(settings.results_topic, 1, 1),
                NewTopic(settings.dlq_topic, 1, 1, topic_configs={"max.message.bytes": "100000"}),
            ]
        )
    finally:
        await admin.close()

    default = {c.name: c for c in await check_kafka(settings)}["message size"]
    fitted = settings.model_copy(update={"max_message_bytes": 100_000})
    fitting = {c.name: c for c in await check_kafka(fitted)}["message size"]

    assert not default.ok
    assert f"'{settings.dlq_topic}' accepts 100000 bytes" in default.detail
    assert default.fix.startswith("set WORKER_MAX_MESSAGE_BYTES=100000")
    assert fitting.ok, fitting.detail
    assert f"'{settings.dlq_topic}' 100000" in fitting.detail


async def test_healthz_fails_while_the_event_loop_is_blocked(world: World) -> None:
    settings = with_ops(world.settings, health_loop_block_s=1.0)
    port = settings.metrics_port
    probed: list[tuple[int, str]] = []

    def probe_while_blocked() -> None:
        time.sleep(1.8)  # the loop is blocked from now on for 3 s
        probed.append(asyncio.run(http_get(port, "/healthz")))

    async with running_worker(settings):
        await status_becomes(port, "/healthz", 200)
        prober = threading.Thread(target=probe_while_blocked)
        prober.start()
        time.sleep(3)  # noqa: ASYNC251 - blocking the loop is what this test is about
        prober.join()
        await status_becomes(port, "/healthz", 200)
    assert len(probed) == 1
    status, text = probed[0]
    assert status == 503
    assert "event loop blocked" in text


async def test_healthz_fails_when_records_wait_and_nothing_commits(
    db: asyncpg.Pool, world: World
) -> None:
    p = world.prefix
    await reserve(db, world, f"{p}-r1", f"{p}-c1", "i1", 2)
    settings = with_ops(
        world.settings,
        stall_timeout_s=2.0,
        rebalance_drain_timeout_s=1.0,
        statement_timeout_ms=0,  # the blocked batch waits on the lock instead of timing out
    )
    port = settings.metrics_port
    event = abandon_event(f"{p}-c1", [("i1", f"{p}-r1")], world.api_key, event_id=f"{p}-e1")
    async with running_worker(settings):
        await status_becomes(port, "/readyz", 200)
        async with db.acquire() as conn, conn.transaction():
            # Hold the reservation's row lock: the worker's batch waits for it while both
            # servers stay reachable, which is how a stuck worker looks from outside.
            await conn.execute(
                "SELECT 1 FROM reservations WHERE reservation_id = $1 FOR UPDATE", f"{p}-r1"
            )
            await produce(settings, [event])
            reason = await status_becomes(port, "/healthz", 503)
            assert "lag 1 with no batch committed" in reason
            assert (await http_get(port, "/readyz"))[0] == 200
        await status_becomes(port, "/healthz", 200)
        results = await read_topic(
            settings.kafka_bootstrap or "", settings.results_topic, lambda seen: len(seen) >= 1
        )
    assert [r.body["outcome"] for r in results] == ["released"]
