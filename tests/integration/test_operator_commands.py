"""The operator commands (issue 12, DESIGN.md §9) through the real CLI entry (typer's
CliRunner on `worker.cli.main.app`), against the embedded servers and the real worker."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import asyncpg
import orjson
import pytest
import structlog
from aiokafka import AIOKafkaProducer
from structlog.testing import capture_logs
from typer.testing import CliRunner, Result

from tests.integration.conftest import World, reserve
from tests.support import (
    committed_offsets,
    produce,
    read_results,
    read_topic,
    running_worker,
    worker_results,
)
from worker import operator_store, store
from worker.cli.kafka import Message
from worker.cli.main import app
from worker.cli.redrive import DeadLetter, redrive
from worker.config import Settings
from worker.records import OutboxMessage
from worker.testing.environment import settings_env
from worker.testing.scenario import Event, abandon_event
from worker.testing.topics import ensure_topics

pytestmark = pytest.mark.integration


async def cli(settings: Settings, *args: str) -> Result:
    """`release-worker <args>` with these settings, in a thread (the commands run their own
    event loop)."""
    runner = CliRunner()
    env = settings_env(settings)
    # The commands that log configure structlog for their process: not for later tests.
    before = structlog.get_config()
    try:
        return await asyncio.to_thread(runner.invoke, app, list(args), env=env)
    finally:
        structlog.configure(**before)


def json_lines(result: Result) -> list[dict[str, Any]]:
    assert result.exit_code == 0, result.output
    return [orjson.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


async def test_offsets_shows_what_the_worker_committed_in_postgresql_and_kafka(
    world: World, db: asyncpg.Pool
) -> None:
    settings = world.settings
    for n in range(6):
        await reserve(db, world, f"{world.prefix}-o{n}", f"{world.prefix}-oc{n}", "i0", 1)
    events = [
        abandon_event(f"{world.prefix}-oc{n}", [("i0", f"{world.prefix}-o{n}")], world.api_key)
        for n in range(6)
    ]
    await worker_results(settings, events, 6, partitions=3)
    committed = await committed_offsets(settings, range(3))
    stored = await store.stored_offsets(db, settings.group_id, settings.input_topic)

    rows = {r["partition"]: r for r in json_lines(await cli(settings, "offsets", "--json"))}

    assert sorted(rows) == [0, 1, 2]
    assert sum(r["high_water"] for r in rows.values()) == 6
    for p, row in rows.items():
        assert row["kafka"] == committed[p]
        assert row["database"] == stored.get(p)
        if row["high_water"]:
            assert row["database"] == row["high_water"] == row["kafka"]
            assert (row["lag"], row["note"]) == (0, "caught up")
    table = await cli(settings, "offsets")
    assert table.exit_code == 0, table.output
    assert "high_water" in table.stdout
    assert settings.input_topic in table.stdout


async def test_outbox_lists_parked_rows_and_retries_or_drops_only_them(
    world: World, db: asyncpg.Pool
) -> None:
    settings = world.settings
    topic = settings.results_topic  # nothing publishes it in this test: the rows stay
    headers = (("event-id", b"e-1"), ("partner-id", world.partner_id.encode()))
    async with db.acquire() as conn:
        messages = [
            OutboxMessage(topic, f"{world.prefix}-k{n}".encode(), b"{}", headers) for n in range(3)
        ]
        parked, also_parked, waiting = (m.outbox_id for m in await store.enqueue(conn, messages))
    assert parked
    assert also_parked
    assert waiting
    await store.park_outbox(db, [(parked, "too_large"), (also_parked, "not_authorised")])
    try:
        listed = {
            r["id"]: r
            for r in json_lines(await cli(settings, "outbox", "--json", "--limit", "100000"))
        }
        assert listed[parked]["park_reason"] == "too_large"
        assert listed[parked]["partner_id"] == world.partner_id
        assert waiting not in listed
        waiting_rows = json_lines(
            await cli(settings, "outbox", "--waiting", "--json", "--limit", "100000")
        )
        assert waiting in {r["id"] for r in waiting_rows}

        retried = await cli(settings, "outbox", "retry", str(parked), str(waiting))
        assert retried.exit_code == 0, retried.output
        assert f"Not parked (or gone), left alone: [{waiting}]" in retried.stdout
        assert "outbox_rows_retried" in retried.stderr
        rows = await db.fetch(
            "SELECT id, parked_at IS NOT NULL FROM outbox WHERE id = ANY($1::bigint[])",
            [parked, also_parked, waiting],
        )
        state = {r[0]: r[1] for r in rows}
        assert state == {parked: False, also_parked: True, waiting: False}

        unconfirmed = await cli(settings, "outbox", "drop", str(also_parked))
        assert unconfirmed.exit_code == 0
        assert "--yes" in unconfirmed.stdout
        dropped = await cli(settings, "outbox", "drop", str(also_parked), str(waiting), "--yes")
        assert dropped.exit_code == 0, dropped.output
        assert "outbox_rows_dropped" in dropped.stderr
        left = {
            r[0]
            for r in await db.fetch(
                "SELECT id FROM outbox WHERE id = ANY($1::bigint[])", [parked, also_parked, waiting]
            )
        }
        assert left == {parked, waiting}
    finally:
        await store.delete_outbox(db, [parked, also_parked, waiting])


async def test_tail_and_inspect_show_a_cart_release_and_only_that_cart(
    world: World, db: asyncpg.Pool
) -> None:
    settings = world.settings
    cart, other = f"{world.prefix}-tc", f"{world.prefix}-tc-other"
    await reserve(db, world, f"{world.prefix}-t1", cart, "i1", 2)
    await reserve(db, world, f"{world.prefix}-t2", cart, "i2", 3)
    await reserve(db, world, f"{world.prefix}-t3", other, "i1", 1)
    events = [
        abandon_event(cart, None, world.api_key, event_id=f"{world.prefix}-whole"),
        abandon_event(other, None, world.api_key, event_id=f"{world.prefix}-other"),
    ]
    async with running_worker(settings, partitions=2):
        positions = await produce(settings, events)
        await read_results(settings, 3)

    tailed = json_lines(
        await cli(settings, "tail", "--from", "beginning", "--no-follow", "--cart", cart, "--json")
    )
    assert sorted((r["result"]["itemReservationId"], r["result"]["outcome"]) for r in tailed) == [
        (f"{world.prefix}-t1", "released"),
        (f"{world.prefix}-t2", "released"),
    ]
    assert {(r["partner_id"], r["event_id"], r["key"]) for r in tailed} == {
        (world.partner_id, f"{world.prefix}-whole", cart)
    }
    by_event = json_lines(
        await cli(
            settings,
            "tail",
            "--from",
            "beginning",
            "--no-follow",
            "--event",
            f"{world.prefix}-other",
            "--partner",
            world.partner_id,
            "--json",
        )
    )
    assert [r["result"]["cartId"] for r in by_event] == [other]
    readable = await cli(settings, "tail", "--from", "beginning", "--no-follow", "--cart", cart)
    assert readable.exit_code == 0, readable.output
    assert readable.stdout.count(" released ") == 2
    later = await cli(settings, "tail", "--from", "2999-01-01T00:00:00Z", "--no-follow")
    assert later.exit_code == 0, later.output
    assert later.stdout == ""

    inspected = json_lines(
        await cli(settings, "inspect", "cart", cart, "--partner", world.partner_id, "--json")
    )
    reservations = [r for r in inspected if r["kind"] == "reservation"]
    assert {(r["reservation_id"], r["status"], r["release_event_id"]) for r in reservations} == {
        (f"{world.prefix}-t1", "released", f"{world.prefix}-whole"),
        (f"{world.prefix}-t2", "released", f"{world.prefix}-whole"),
    }
    (applied,) = [r for r in inspected if r["kind"] == "event"]
    partition, offset = positions[0]
    assert applied["event_id"] == f"{world.prefix}-whole"
    assert applied["position"] == f"{settings.input_topic}/{partition}/{offset}"
    assert sorted(r["outcome"] for r in applied["results"]) == ["released", "released"]
    table = await cli(settings, "inspect", "cart", cart, "--partner", world.partner_id)
    assert table.exit_code == 0, table.output
    assert f"{world.prefix}-whole" in table.stdout
    assert other not in table.stdout


async def test_tail_from_the_end_follows_only_new_results(world: World) -> None:
    settings = world.settings
    await ensure_topics(settings, 1)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(settings.results_topic, b'{"n": "old"}', key=b"c")
        follower = asyncio.create_task(
            cli(settings, "tail", "--from", "end", "--max", "1", "--json")
        )
        # Sent until the follower, positioned at the end at some point, has seen one.
        while not follower.done():
            await producer.send_and_wait(settings.results_topic, b'{"n": "new"}', key=b"c")
            await asyncio.wait([follower], timeout=0.2)
    finally:
        await producer.stop()
    (line,) = json_lines(await follower)
    assert line["result"] == {"n": "new"}


async def test_a_dead_lettered_release_is_redriven_once_after_its_fix_and_only_then(
    world: World, db: asyncpg.Pool
) -> None:
    # JSON log lines: the audit trail is read back below.
    settings = world.settings.model_copy(update={"poison_max_attempts": 2, "log_format": "json"})
    cart, reservation, event_id = f"{world.prefix}-dc", f"{world.prefix}-d1", f"{world.prefix}-e1"
    # A status the worker does not know makes apply_batch raise: a 500 and a dead letter.
    await reserve(db, world, reservation, cart, "i1", 4, status="mystery")
    poison = abandon_event(cart, [("i1", reservation)], world.api_key, event_id=event_id)
    unreadable = replace(abandon_event(cart, None, world.api_key), value=b"{not json")
    async with running_worker(settings, partitions=1):
        (source, _) = await produce(settings, [poison, unreadable])
        letters = await read_topic(
            settings.kafka_bootstrap or "", settings.dlq_topic, lambda s: len(s) >= 2
        )
    assert [dict(m.headers).get("dlq-code") for m in letters] == [
        b"internal_error",
        b"invalid_json",
    ]
    poisoned, bad = (f"{m.partition}:{m.offset}" for m in letters)
    listed = {r["position"]: r for r in json_lines(await cli(settings, "dlq", "list", "--json"))}
    assert listed[poisoned]["partner_id"] == world.partner_id
    assert listed[poisoned]["event_id"] == event_id
    assert listed[poisoned]["redrivable"] is True
    assert listed[bad]["redrivable"] is False
    assert [
        r["position"]
        for r in json_lines(await cli(settings, "dlq", "list", "--status", "400", "--json"))
    ] == [bad]
    shown = await cli(settings, "dlq", "show", bad)
    assert shown.exit_code == 0, shown.output
    assert "not strict JSON" in shown.stdout
    assert "rokt-api-key" not in shown.stdout

    async def state() -> tuple[Any, ...]:
        row = await db.fetchrow(
            "SELECT r.status, r.release_event_id, s.reserved FROM reservations r "
            "JOIN stock s ON s.sku = r.sku WHERE r.reservation_id = $1",
            reservation,
        )
        inbox = await db.fetch(
            "SELECT source_partition, source_offset FROM inbox "
            "WHERE partner_id = $1 AND event_id = $2",
            world.partner_id,
            event_id,
        )
        outbox = await db.fetchval("SELECT count(*) FROM outbox WHERE key = $1", cart.encode())
        return (*row.values(), [tuple(r) for r in inbox], outbox) if row else ()

    # Not fixed yet: the re-drive fails, changes nothing, and says so (exit 1).
    unfixed = await cli(settings, "dlq", "redrive", poisoned)
    assert unfixed.exit_code == 1, unfixed.output
    assert "dlq_redrive_failed" in unfixed.stderr
    assert await state() == ("mystery", None, 0, [], 0)

    # The fix: the reservation is held again, as it should have been (I1 kept).
    async with db.acquire() as conn, conn.transaction():
        await conn.execute(
            "UPDATE reservations SET status = 'reserved' WHERE reservation_id = $1", reservation
        )
        await conn.execute("UPDATE stock SET reserved = reserved + 4 WHERE sku = $1", world.sku)
    before = await state()
    assert before == ("reserved", None, 4, [], 0)

    dry = json_lines(await cli(settings, "dlq", "redrive", poisoned, "--dry-run", "--json"))
    assert [(r["result"], r["detail"]) for r in dry] == [("would_apply", "1 released")]
    assert await state() == before

    refused = json_lines(await cli(settings, "dlq", "redrive", bad, "--json"))
    assert [r["result"] for r in refused] == ["refused"]

    # Dead letters are published at least once: a second copy of it is the same event.
    copy = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await copy.start()
    try:
        sent = await copy.send_and_wait(
            settings.dlq_topic,
            letters[0].value,
            key=letters[0].key,
            headers=list(letters[0].headers.items()),
        )
    finally:
        await copy.stop()
    duplicate = f"{sent.partition}:{sent.offset}"

    applied = await cli(
        settings, "dlq", "redrive", "--partner", world.partner_id, "--code", "internal_error"
    )
    assert applied.exit_code == 0, applied.output
    assert "1 already_applied, 1 applied; 1 result(s) published" in applied.stdout
    audit = [orjson.loads(line) for line in applied.stderr.splitlines() if line.startswith("{")]
    redriven = {a["dlq_position"]: a for a in audit if a["event"] == "dlq_redriven"}
    assert {p: a["result"] for p, a in redriven.items()} == {
        poisoned: "applied",
        duplicate: "already_applied",
    }
    assert redriven[poisoned]["operator"]
    after = ("released", event_id, 0, [source], 0)
    assert await state() == after

    again = json_lines(await cli(settings, "dlq", "redrive", poisoned, "--json"))
    assert [r["result"] for r in again] == ["already_applied"]
    assert "re-driven before" in again[0]["detail"]
    assert await state() == after

    results = json_lines(
        await cli(
            settings, "tail", "--from", "beginning", "--no-follow", "--event", event_id, "--json"
        )
    )
    assert [
        (r["result"]["type"], r["result"].get("status"), r["result"].get("outcome"))
        for r in results
    ] == [
        ("event_rejected", 500, None),
        ("item_result", None, "released"),
    ]
    assert results[1]["partner_id"] == world.partner_id
    inspected = json_lines(
        await cli(settings, "inspect", "cart", cart, "--partner", world.partner_id, "--json")
    )
    (event,) = [r for r in inspected if r["kind"] == "event"]
    assert event["position"] == f"{settings.input_topic}/{source[0]}/{source[1]}"
    assert [r["outcome"] for r in event["results"]] == ["released"]


def _dead_letter(world: World, event: Event, offset: int) -> DeadLetter:
    """A 500 dead letter of `event` as the worker writes it (the key dropped, dlq-*)."""
    dlq = {
        "dlq-status": b"500",
        "dlq-code": b"internal_error",
        "dlq-partner-id": world.partner_id.encode(),
        "dlq-source-topic": world.settings.input_topic.encode(),
        "dlq-source-partition": b"0",
        "dlq-source-offset": str(offset).encode(),
    }
    headers = [(n, v) for n, v in event.headers if n != "rokt-api-key"] + list(dlq.items())
    return DeadLetter(
        Message(world.settings.dlq_topic, 0, offset, 0, event.key, event.value, tuple(headers))
    )


async def test_a_redrive_waits_one_period_of_its_rate_between_two_dead_letters(
    world: World, db: asyncpg.Pool
) -> None:
    letters = []
    for n in range(3):
        cart, reservation = f"{world.prefix}-rc{n}", f"{world.prefix}-rr{n}"
        await reserve(db, world, reservation, cart, "i1", 1)
        event = abandon_event(cart, [("i1", reservation)], None, event_id=f"{world.prefix}-re{n}")
        letters.append(_dead_letter(world, event, offset=100 + n))
    slept: list[tuple[int, float]] = []  # (dead letters handled before, seconds)
    with capture_logs() as logged:

        async def sleeper(seconds: float, /) -> None:
            slept.append((sum(e["event"] == "dlq_redriven" for e in logged), seconds))

        done = await redrive(
            db, world.settings, letters, dry_run=True, rate_per_s=4.0, operator="t", sleep=sleeper
        )
    assert [o.result for o in done.outcomes] == ["would_apply"] * 3
    # One period (1 / rate) between two dead letters: at most 4 a second.
    assert slept == [(1, 0.25), (2, 0.25)]


async def test_a_redrive_that_stops_at_a_failure_names_what_it_did_not_attempt_and_what_to_do(
    world: World, db: asyncpg.Pool
) -> None:
    # A status the worker does not know makes the apply raise: the cause is not fixed.
    await reserve(db, world, f"{world.prefix}-fr0", f"{world.prefix}-fc0", "i1", 1, "mystery")
    await reserve(db, world, f"{world.prefix}-fr1", f"{world.prefix}-fc1", "i1", 1)
    letters = [
        _dead_letter(
            world,
            abandon_event(f"{world.prefix}-fc{n}", [("i1", f"{world.prefix}-fr{n}")], None),
            offset=200 + n,
        )
        for n in (1, 0)
    ]
    with capture_logs() as logged:
        done = await redrive(
            db, world.settings, letters, dry_run=True, rate_per_s=100, operator="t"
        )
    failed, skipped = done.outcomes
    assert (failed.letter.source, failed.result) == (letters[1].source, "failed")
    assert "then re-drive it" in failed.detail
    assert (skipped.letter.source, skipped.result) == (letters[0].source, "not_attempted")
    assert failed.letter.position in skipped.detail
    assert "run the same command again" in skipped.detail
    assert [(e["event"], e["result"]) for e in logged if e["event"].startswith("dlq_")] == [
        ("dlq_redrive_failed", "failed"),
        ("dlq_redriven", "not_attempted"),
    ]


async def test_inspect_cart_finds_a_carts_events_by_an_index_not_by_reading_the_inbox(
    db: asyncpg.Pool,
) -> None:
    """The inbox keeps every event's key forever: without an index on the cart, `inspect
    cart` read all of it (143 MB a million events; past WORKER_STATEMENT_TIMEOUT_MS at a
    few million: docs/operations.md)."""
    async with db.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")  # the plan without a full read
        plan = await conn.fetchval(
            "EXPLAIN (FORMAT JSON) " + operator_store.CART_EVENTS_SQL, "p", "c"
        )

    def index_conditions(node: dict[str, Any]) -> list[str]:
        found = [node.get("Index Cond", "")]
        for child in node.get("Plans", []):
            found += index_conditions(child)
        return found

    assert any("cart_id" in c for c in index_conditions(orjson.loads(plan)[0]["Plan"])), plan
