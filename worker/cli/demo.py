"""`release-worker demo`: the whole job on the embedded stack, every case, with a summary.

Seeds two partners (plus a suspended one), a few hundred SKUs and ~10,000 reservations,
emits abandon events covering every outcome and the common rejections, runs the
real worker with a live progress display, reads the results topic back, and checks
the invariants in SQL. Exits non-zero if an invariant fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaProducer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from worker.app import run_worker
from worker.cli.demo_http import HttpCase, show_http
from worker.config import Settings
from worker.migrate import migrate
from worker.operator_store import add_partner
from worker.release import BatchReport
from worker.testing import store as kit_store
from worker.testing.embedded import embedded_stack
from worker.testing.scenario import Event, abandon_event
from worker.testing.store import Seed, seed_reservations, seed_stock
from worker.testing.topic_reader import reading
from worker.testing.topics import ensure_topics

PARTITIONS = 12
SKUS = 300


@dataclass
class Plan:
    events: list[Event] = field(default_factory=list)
    cases: Counter[str] = field(default_factory=Counter)
    http: HttpCase | None = None  # a reservation no event touches, released over HTTP

    def add(self, case: str, event: Event) -> None:
        self.events.append(event)
        self.cases[case] += 1


@dataclass
class Results:
    """What the results topic showed, deduplicated the way consumers do."""

    messages: int = 0
    duplicates: int = 0
    mismatched_duplicates: int = 0
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    rejections: Counter[tuple[int, str]] = field(default_factory=Counter)
    returned: int = 0
    seen: dict[tuple[str, str], bytes] = field(default_factory=dict)

    def add(self, value: bytes) -> None:
        self.messages += 1
        body: dict[str, Any] = orjson.loads(value)
        key = (body["eventId"], body.get("itemReservationId", ""))
        if key in self.seen:
            self.duplicates += 1
            self.mismatched_duplicates += self.seen[key] != value
            return
        self.seen[key] = value
        if body["type"] == "item_result":
            self.outcomes[(body["trigger"], body["outcome"])] += 1
            self.returned += body["quantity"]
        else:
            self.rejections[(body["status"], body["errors"][0]["code"])] += 1


async def run_demo(settings: Settings, reservations: int = 10_000) -> int:
    console = Console()
    with contextlib.ExitStack() as stack:
        if not settings.database_url or not settings.kafka_bootstrap:
            with console.status("Starting embedded PostgreSQL and Tansu broker on 127.0.0.1…"):
                servers = stack.enter_context(embedded_stack())
            console.print(
                f"[green]✓[/] PostgreSQL at {servers.database_url}, broker at {servers.bootstrap}"
            )
            settings = settings.model_copy(
                update={
                    "database_url": settings.database_url or servers.database_url,
                    "kafka_bootstrap": settings.kafka_bootstrap or servers.bootstrap,
                }
            )
        tag = uuid.uuid4().hex[:6]
        settings = settings.model_copy(
            update={
                "metrics_port": 0,
                "session_timeout_ms": 6000,
                "expiry_interval_s": 1.0,
                "group_id": f"{settings.group_id}-demo-{tag}",
            }
        )
        return await _demo(console, settings, reservations, tag)
    return 1  # unreachable: the with block returns


async def _demo(console: Console, settings: Settings, reservations: int, tag: str) -> int:
    assert settings.database_url
    assert settings.kafka_bootstrap
    result = migrate(settings.database_url)
    if result.returncode != 0:
        console.print(f"[red]Migration failed:[/] {result.stderr}")
        return 1
    console.print("[green]✓[/] Schema migrated (dbmate)")
    await ensure_topics(settings, PARTITIONS)
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=4)
    try:
        plan, seeded = await _seed_and_plan(pool, reservations, tag)
        console.print(
            f"[green]✓[/] Seeded {len(seeded.reservations):,} reservations over {SKUS} SKUs "
            f"for partners acme-{tag} and globex-{tag}"
        )
        before = await kit_store.snapshot(pool)
        await _produce(settings, plan.events, console)
        http_ok: list[bool] = []

        async def over_http(results: Results) -> None:
            if plan.http is None:
                return
            seen = results.messages
            http_ok.append(await show_http(console, settings, plan.http, tag))
            # Its results (the release and its replay) are read before the worker stops,
            # so the invariants below count them.
            for _ in range(100):
                if results.messages >= seen + 2:
                    break
                await asyncio.sleep(0.1)

        results, elapsed, processed = await _run(settings, plan, console, over_http)
        after = await kit_store.snapshot(pool)
        i1 = await kit_store.i1_violations(pool)
        backlog = int(await pool.fetchval("SELECT count(*) FROM outbox"))
    finally:
        await pool.close()
    return _summary(
        console,
        plan,
        results,
        elapsed,
        processed,
        before,
        after,
        i1,
        backlog,
        bool(http_ok) and all(http_ok),
    )


async def _seed_and_plan(pool: asyncpg.Pool, total: int, tag: str) -> tuple[Plan, Seed]:
    rng = random.Random(42)
    acme, globex, initech = f"acme-{tag}", f"globex-{tag}", f"initech-{tag}"
    keys = {
        acme: await add_partner(pool, acme, "Acme", ["tag-1", "tag-2"]),
        globex: await add_partner(pool, globex, "Globex"),
        initech: await add_partner(pool, initech, "Initech", status="suspended"),
    }
    skus = [f"{tag}-sku-{n}" for n in range(SKUS)]
    mix = (("reserved", 0.85), ("confirmed", 0.05), ("expired", 0.05), ("released", 0.05))
    async with pool.acquire() as conn:
        await seed_stock(conn, skus)
        seed = await seed_reservations(
            conn, acme, int(total * 0.8) // 3, 3, skus, statuses=mix, overdue_share=0.01, rng=rng
        )
        other = await seed_reservations(conn, globex, int(total * 0.2) // 3, 3, skus, rng=rng)
    seed.reservations.extend(other.reservations)

    plan = Plan()
    explicit: list[Event] = []
    for n, (cart_id, rows) in enumerate(sorted(seed.carts(acme).items())):
        if n % 10 == 9:
            held = [r for r in rows if r.status == "reserved"]
            if plan.http is None and held:
                r = held[0]
                plan.http = HttpCase(cart_id, r.cart_item_id, r.reservation_id, keys[acme])
            continue  # left alone: overdue ones are released by the sweeper
        if n % 5 == 4:
            plan.add("whole-cart abandon", abandon_event(cart_id, None, keys[acme]))
            continue
        chosen = rows if n % 2 else rows[:2]
        items = [(r.cart_item_id, r.reservation_id) for r in chosen]
        event = abandon_event(cart_id, items, keys[acme], event_id=f"evt-{cart_id}")
        explicit.append(event)
        plan.add("release items", event)
    for event in rng.sample(explicit, min(200, len(explicit))):
        plan.add("replay (same eventId)", event)
    for event in rng.sample(explicit, min(100, len(explicit))):
        body = orjson.loads(event.value or b"{}")
        items = [(i["cartItemId"], i["itemReservationId"]) for i in body["items"]]
        plan.add("release again (new eventId)", abandon_event(body["cartId"], items, keys[acme]))
    globex_carts = sorted(seed.carts(globex).items())
    for cart_id, rows in globex_carts[: len(globex_carts) // 2]:
        items = [(r.cart_item_id, r.reservation_id) for r in rows]
        plan.add("release items", abandon_event(cart_id, items, keys[globex], tag_id="any"))
    acme_carts = sorted(seed.carts(acme).items())
    for cart_id, rows in acme_carts[:50]:
        items = [(r.cart_item_id, r.reservation_id) for r in rows]
        plan.add("another partner's reservation", abandon_event(cart_id, items, keys[globex]))
    for n in range(100):
        items = [("item-0", f"unknown-{tag}-{n}")]
        plan.add("unknown reservation", abandon_event(f"cart-x-{n}", items, keys[acme]))
    plan.add("whole cart with no reservation", abandon_event("cart-none", None, keys[acme]))
    bad = Event(b"cart-bad", b"{not json", (("rokt-api-key", keys[acme].encode()),))
    for _ in range(5):
        plan.add("invalid JSON", bad)
        plan.add("unknown API key", abandon_event("cart-k", None, "rk_not_a_key"))
        plan.add("suspended partner", abandon_event("cart-s", None, keys[initech]))
        plan.add("tag not allowed", abandon_event("cart-t", None, keys[acme], tag_id="tag-9"))
        dup = [("a", "same-id"), ("b", "same-id")]
        plan.add("duplicate item", abandon_event("cart-d", dup, keys[acme]))
    return plan, seed


async def _produce(settings: Settings, events: list[Event], console: Console) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=5)
    await producer.start()
    try:
        with progress_bars(console) as progress:
            task = progress.add_task("Emitting abandon events", total=len(events))
            futures = []
            for n, e in enumerate(events):
                futures.append(
                    await producer.send(
                        settings.input_topic, e.value, key=e.key, headers=list(e.headers)
                    )
                )
                if n % 500 == 0:
                    progress.update(task, completed=n)
            await asyncio.gather(*futures)
            progress.update(task, completed=len(events))
    finally:
        await producer.stop()


async def _run(
    settings: Settings,
    plan: Plan,
    console: Console,
    before_stop: Callable[[Results], Awaitable[None]],
) -> tuple[Results, float, int]:
    processed = 0
    outcomes: Counter[str] = Counter()

    first_report: float | None = None

    def on_report(report: BatchReport) -> None:
        nonlocal processed, first_report
        first_report = first_report or time.perf_counter()
        processed += report.records
        outcomes.update(report.outcomes)

    results = Results()
    stop = asyncio.Event()
    started = time.perf_counter()
    worker = asyncio.create_task(
        run_worker(settings, on_report=on_report, stop=stop, handle_signals=False)
    )
    reader = asyncio.create_task(_read_results(settings, results))
    total = len(plan.events)
    elapsed = 0.0
    try:
        with progress_bars(console) as progress:
            task = progress.add_task("Worker releasing", total=total)
            quiet_since: float | None = None
            last_seen = -1
            while True:
                await asyncio.sleep(0.2)
                progress.update(task, completed=processed)
                if worker.done():
                    break
                if processed >= total and elapsed == 0.0 and first_report is not None:
                    elapsed = time.perf_counter() - first_report
                if processed >= total and results.messages == last_seen:
                    quiet_since = quiet_since or time.perf_counter()
                    if time.perf_counter() - quiet_since > 2.5:
                        break
                else:
                    quiet_since = None
                last_seen = results.messages
        if not worker.done():
            await before_stop(results)
    finally:
        stop.set()
        code = await worker
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    if code != 0:
        console.print(f"[red]The worker exited with {code}[/]")
    return results, elapsed or (time.perf_counter() - started), processed


async def _read_results(settings: Settings, results: Results) -> None:
    assert settings.kafka_bootstrap
    async with reading(settings.kafka_bootstrap, settings.results_topic, PARTITIONS) as reader:
        while True:
            for m in await reader.batch():
                if m.value is not None:
                    results.add(m.value)


def progress_bars(console: Console) -> Progress:
    """The progress display of `demo` and `bench`: description, bar, n of total, time."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def _summary(
    console: Console,
    plan: Plan,
    results: Results,
    elapsed: float,
    processed: int,
    before: kit_store.StockSnapshot,
    after: kit_store.StockSnapshot,
    i1: int,
    backlog: int,
    http_ok: bool,
) -> int:
    cases = Table(title="Events emitted, by case")
    cases.add_column("case")
    cases.add_column("records", justify="right")
    for case, n in plan.cases.most_common():
        cases.add_row(case, f"{n:,}")
    console.print(cases)

    outcomes = Table(title="Item results (deduplicated on eventId + itemReservationId)")
    for column in ("trigger", "outcome", "items"):
        outcomes.add_column(column, justify="right" if column == "items" else "left")
    for (trigger, outcome), n in sorted(results.outcomes.items()):
        outcomes.add_row(trigger, outcome, f"{n:,}")
    console.print(outcomes)

    rejections = Table(title="Rejections (event_rejected)")
    for column in ("status", "code", "records"):
        rejections.add_column(column)
    for (status, code), n in sorted(results.rejections.items()):
        rejections.add_row(str(status), code, f"{n:,}")
    console.print(rejections)

    items = sum(results.outcomes.values())
    returned_by_stock = before.reserved - after.reserved
    checks = [
        ("I1 stock.reserved = sum of reserved reservations (rows off)", i1 == 0, str(i1)),
        ("I2 on_hand unchanged", before.on_hand == after.on_hand, f"{after.on_hand:,}"),
        (
            "I2 confirmed reservations untouched",
            before.confirmed == after.confirmed,
            f"{after.confirmed:,}",
        ),
        (
            "I2 stock returned = quantities reported (no double release)",
            returned_by_stock == results.returned,
            f"{returned_by_stock:,} = {results.returned:,}",
        ),
        ("I3 outbox drained (every result published)", backlog == 0, str(backlog)),
        (
            "G2 duplicates byte-identical",
            results.mismatched_duplicates == 0,
            f"{results.duplicates:,} duplicates",
        ),
        ("every record processed", processed >= len(plan.events), f"{processed:,}"),
        ("HTTP: 200, same answer on retry, 403 rejection", http_ok, "release-worker api"),
    ]
    table = Table(title="Summary")
    table.add_column("check")
    table.add_column("ok")
    table.add_column("value", justify="right")
    table.add_row("records", "", f"{len(plan.events):,}")
    table.add_row(
        "throughput (first to last batch)", "", f"{len(plan.events) / elapsed:,.0f} records/s"
    )
    table.add_row("item results", "", f"{items:,} ({items / elapsed:,.0f}/s)")
    for name, ok, value in checks:
        table.add_row(name, "[green]✓[/]" if ok else "[red]✗[/]", value)
    console.print(table)
    failed = [name for name, ok, _ in checks if not ok]
    if failed:
        console.print(f"[red]Failed: {', '.join(failed)}[/]")
        return 1
    console.print("[green]All invariants hold.[/]")
    return 0
