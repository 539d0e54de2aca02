"""`release-worker` (also `python -m worker`): the top-level command line and its commands."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from collections.abc import Callable
from typing import Annotated

import typer

from worker import logs
from worker.cli import dlq, inspection, offsets, outbox, tail
from worker.cli.common import load_settings
from worker.cli.contract import contract_app
from worker.errors import SchemaNotReady, StartupError

app = typer.Typer(
    help="Consumes cart-abandon events from Kafka, releases the matching stock reservations "
    "in PostgreSQL inside transactions, and publishes one result per item.\n\n"
    "Servers come from WORKER_DATABASE_URL and WORKER_KAFKA_BOOTSTRAP; `demo` and `bench` "
    "start embedded ones when these are unset. Every setting: `release-worker config`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
partner_app = typer.Typer(help="Manage partners (API keys are stored only as sha256).")
app.add_typer(partner_app, name="partner")
app.add_typer(contract_app, name="contract")
app.command("offsets")(offsets.offsets)
app.add_typer(outbox.app, name="outbox")
app.command("tail")(tail.tail)
app.add_typer(inspection.app, name="inspect")
app.add_typer(dlq.app, name="dlq")


@app.command()
def migrate() -> None:
    """Apply the SQL migrations in migrations/ to WORKER_DATABASE_URL (dbmate up)."""
    from worker.app import require_database
    from worker.migrate import migrate as run_migrate
    from worker.redaction import redact_text

    database_url = require_database(load_settings())
    result = run_migrate(database_url)
    # dbmate's messages may repeat the URL with a query-string password in it.
    typer.echo(redact_text(result.stdout.strip(), database_url) or "Nothing to migrate.")
    if result.returncode != 0:
        failure = redact_text(result.stderr.strip(), database_url)
        typer.echo(f"Migration failed:\n{failure}", err=True)
        raise typer.Exit(1)


@app.command()
def run() -> None:
    """Run the worker until SIGTERM/SIGINT (the servers must exist and be migrated)."""
    from worker import tracing
    from worker.app import run_worker

    settings = load_settings()
    logs.configure(settings.log_format, settings.log_level)
    tracing.configure_from_environment()  # off unless OTEL_* variables ask for it
    tune_garbage_collector()
    try:
        with asyncio.Runner(loop_factory=event_loop_factory(settings.event_loop)) as runner:
            code = runner.run(run_worker(settings))
    except SchemaNotReady as error:
        typer.echo(f"Refusing to start: {error}", err=True)
        raise typer.Exit(3) from None
    finally:
        tracing.shutdown()
    raise typer.Exit(code)


def event_loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """WORKER_EVENT_LOOP's loop for `asyncio.Runner` (None: asyncio's own). uvloop costs
    the worker less CPU per item where batches are small and the loop wakes often
    (docs/benchmark.md: uvloop for the worker)."""
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


def tune_garbage_collector() -> None:
    """Move what start-up built (modules, clients, models) out of the collector's reach.

    The full collections the batches trigger otherwise rescan that whole long-lived heap:
    ~15-20% of the worker's CPU per item in `release-worker bench`. The thresholds stay
    at their defaults: raising them let cyclic garbage pile up (resident memory grew with
    the burst's backlog, 130 -> 270 MB), while freezing alone keeps it flat (~130 MB).
    """
    gc.freeze()


@partner_app.command("add")
def partner_add(
    partner_id: Annotated[str, typer.Argument(help="Identifier of the partner, e.g. acme.")],
    name: Annotated[str, typer.Option(help="Display name.")] = "",
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="Allowed rokt-tag-id (repeat); none = any.")
    ] = None,
) -> None:
    """Create a partner and print its new API key once; only its sha256 is stored."""
    from worker.app import create_pool
    from worker.operator_store import add_partner

    settings = load_settings()

    async def go() -> str:
        pool = await create_pool(settings, size=2)
        try:
            return await add_partner(pool, partner_id, name or partner_id, tag or [])
        finally:
            await pool.close()

    key = asyncio.run(go())
    typer.echo(f"Partner {partner_id} created. Its API key (shown only now, store it safely):")
    typer.echo(key)


@app.command()
def emit(
    cart: Annotated[list[str], typer.Option("--cart", help="Cart id (repeat for several).")],
    api_key: Annotated[str, typer.Option(envvar="ROKT_API_KEY", help="The partner's key.")],
    count: Annotated[int, typer.Option(help="Events to produce (carts used round robin).")] = 1,
    item: Annotated[
        list[str] | None,
        typer.Option(
            "--item",
            help="CART_ITEM_ID=RESERVATION_ID to release (repeat); none = the whole cart.",
        ),
    ] = None,
    tag_id: Annotated[str, typer.Option(help="rokt-tag-id header.")] = "tag-1",
) -> None:
    """Produce abandon events to the input topic (for tests and demos)."""
    from aiokafka import AIOKafkaProducer

    from worker.app import require_broker
    from worker.testing.scenario import abandon_event

    items = None
    if item:
        bad = [i for i in item if "=" not in i]
        if bad:
            typer.echo(f"--item must be CART_ITEM_ID=RESERVATION_ID, got {bad[0]!r}", err=True)
            raise typer.Exit(2)
        items = [tuple(i.split("=", 1)) for i in item]
    settings = load_settings()
    bootstrap = require_broker(settings)

    async def go() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            for n in range(count):
                event = abandon_event(cart[n % len(cart)], items, api_key, tag_id=tag_id)  # type: ignore[arg-type]
                await producer.send_and_wait(
                    settings.input_topic, event.value, key=event.key, headers=list(event.headers)
                )
        finally:
            await producer.stop()

    asyncio.run(go())
    typer.echo(f"Produced {count} event(s) to {settings.input_topic}.")


@app.command()
def demo(
    reservations: Annotated[int, typer.Option(help="Reservations to seed.")] = 10_000,
) -> None:
    """Start embedded PostgreSQL and broker (unless given), seed, emit every case, run the
    worker with live progress, and print a summary with the invariants checked in SQL."""
    from worker.cli.demo import run_demo

    settings = load_settings()
    logs.configure("console", "warning")
    with asyncio.Runner(loop_factory=event_loop_factory(settings.event_loop)) as runner:
        raise typer.Exit(runner.run(run_demo(settings, reservations)))


@app.command()
def bench(
    quick: Annotated[bool, typer.Option(help="CI-sized run, under a minute.")] = False,
    out: Annotated[str | None, typer.Option(help="Directory for JSON and plots.")] = None,
    rate: Annotated[
        list[float] | None,
        typer.Option(
            help="Open-loop rate as a fraction of the measured maximum (repeat); offered "
            "through Kafka and through the HTTP api."
        ),
    ] = None,
    scaling: Annotated[bool, typer.Option(help="Also run 2 and 4 worker processes.")] = True,
    profile: Annotated[
        bool, typer.Option(help="Sample the worker processes with py-spy (`bench` extra).")
    ] = False,
    scale_only: Annotated[
        float | None,
        typer.Option(help="Run only the scale scenario (1 → 3 → 1 processes) at this rec/s."),
    ] = None,
) -> None:
    """Measure the worker end to end against the db_limit, kafka_pipe and naive baselines
    on embedded servers (or WORKER_* ones); print a table, write JSON and plots."""
    from dataclasses import replace
    from pathlib import Path

    # The harness is not in the wheel: it lives in the source checkout, beside worker/
    # when this is an editable install of one.
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "bench" / "run.py").is_file() and (checkout / "pyproject.toml").is_file():
        sys.path.insert(0, str(checkout))
    try:
        from bench.run import FULL, QUICK, RESULTS_DIR, only_scale, run_bench, summary_ok
    except ModuleNotFoundError as error:
        if error.name not in ("bench", "bench.run"):
            raise
        typer.echo(
            "bench runs from a source checkout (the harness is not installed with the "
            "wheel): run `make bench` in a checkout of cart-release-worker.",
            err=True,
        )
        raise typer.Exit(2) from None

    settings = load_settings()
    logs.configure("console", "warning")
    plan = QUICK if quick else FULL
    if rate:
        plan = replace(plan, rate_fractions=tuple(rate), http_fractions=tuple(rate))
    plan = replace(plan, profile=profile)
    if not scaling:
        plan = replace(plan, scaling=())
    if scale_only is not None:
        plan = only_scale(scale_only)
    try:
        measurements, _ = asyncio.run(
            run_bench(
                settings,
                plan,
                Path(out) if out else RESULTS_DIR,
                label="quick" if quick else "full",
            )
        )
    except (asyncio.CancelledError, KeyboardInterrupt):
        # A signal stopped it; its child processes and servers were stopped first.
        typer.echo("bench stopped by a signal; nothing written", err=True)
        raise typer.Exit(130) from None
    raise typer.Exit(0 if summary_ok(measurements) else 1)


@app.command("config")
def show_config() -> None:
    """Print every setting: environment variable, default and description."""
    from worker.cli.settings_doc import settings_table

    typer.echo(settings_table())


@app.command()
def doctor() -> None:
    """Check the servers, schema, topics and consumer group; say what to fix (exit 1 if any).

    Changes nothing: topics are only listed, and the group check joins a throwaway group.
    """
    from worker.cli.doctor import render, run_checks

    settings = load_settings()
    # The checks report connection failures themselves; aiokafka's own lines are noise here.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    checks = asyncio.run(run_checks(settings))
    typer.echo(render(checks))
    if not all(c.ok for c in checks):
        raise typer.Exit(1)


from worker.cli.api import API_HELP, api  # noqa: E402  (registered once the app exists)

app.command("api", help=API_HELP)(api)


def main() -> None:
    try:
        app()
    except StartupError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(4)


if __name__ == "__main__":
    main()
