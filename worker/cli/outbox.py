"""`release-worker outbox`: the backlog, the parked rows, and retrying or dropping them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated

import structlog
import typer

from worker.cli.common import (
    JSON_OPTION_HELP,
    audit_logging,
    database,
    load_settings,
    operator,
    print_rows,
    reflow,
    reflowed,
    run,
)
from worker.store import Db

log = structlog.get_logger("worker.cli.outbox")

app = typer.Typer(
    help=reflow(
        """The outbox: results and dead letters committed with their work, waiting to be
    published (the backlog), and rows parked because the broker refused them for good
    (too large, not authorised, invalid topic; DESIGN.md §7). The worker never re-sends a
    parked row by itself: fix the cause, then `outbox retry` or `outbox drop` it.

    Without a subcommand: the backlog and parked counts, and the parked rows."""
    ),
    invoke_without_command=True,
    no_args_is_help=False,
)

COLUMNS = ["id", "topic", "key", "event_id", "partner_id", "payload_bytes"]
PARK_COLUMNS = ["parked_at", "park_reason"]
Ids = Annotated[list[int], typer.Argument(help="Outbox row ids, as `outbox` lists them.")]


@app.callback()
@reflowed
def show(
    ctx: typer.Context,
    waiting: Annotated[
        bool, typer.Option("--waiting", help="List the rows waiting to be published instead.")
    ] = False,
    limit: Annotated[int, typer.Option(help="Most rows listed.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_OPTION_HELP)] = False,
) -> None:
    """Backlog and parked counts, then the parked rows (or the waiting ones)."""
    if ctx.invoked_subcommand is not None:
        return
    from worker import operator_store

    settings = load_settings()

    async def go() -> tuple[operator_store.OutboxSummary, list[dict[str, object]]]:
        async with database(settings) as pool:
            summary = await operator_store.outbox_summary(pool)
            rows = await operator_store.outbox_rows(pool, parked=not waiting, limit=limit)
            return summary, rows

    summary, rows = run(go)
    if not as_json:
        typer.echo(
            f"waiting: {summary.waiting} (oldest {summary.oldest_waiting or '-'}); "
            f"parked: {summary.parked} (oldest {summary.oldest_parked or '-'}); "
            f"unpublished inbox rows (above their partition's watermark): {summary.unpublished}"
        )
    columns = COLUMNS + (["created_at"] if waiting else PARK_COLUMNS)
    print_rows(rows, columns, as_json, title="waiting rows" if waiting else "parked rows")


@app.command()
@reflowed
def retry(ids: Ids) -> None:
    """Give parked rows back to the relay: the running workers publish them on their next
    relay pass (WORKER_OUTBOX_RELAY_INTERVAL_S), or park them again, with the new reason,
    if the broker still refuses them. Rows not parked are left alone. Logged with the OS
    user (`outbox_rows_retried`)."""
    from worker import operator_store

    _act("retried", ids, operator_store.unpark_outbox)


@app.command()
@reflowed
def drop(
    ids: Ids,
    yes: Annotated[
        bool, typer.Option("--yes", help="Do it (without it: say what would go).")
    ] = False,
) -> None:
    """Delete parked rows for good: their results or dead letters are never published.
    Only parked rows can be dropped. Logged with the OS user (`outbox_rows_dropped`)."""
    from worker import operator_store

    if not yes:
        typer.echo(f"Would drop parked row(s) {ids}; run again with --yes to drop them.")
        return
    _act("dropped", ids, operator_store.drop_parked_outbox)


def _act(
    verb: str, ids: list[int], action: Callable[[Db, Sequence[int]], Awaitable[list[int]]]
) -> None:
    settings = load_settings()
    audit_logging(settings)

    async def go() -> list[int]:
        async with database(settings) as pool:
            return await action(pool, ids)

    done = run(go)
    log.info(f"outbox_rows_{verb}", operator=operator(), requested=ids, ids=done)
    skipped = sorted(set(ids) - set(done))
    typer.echo(f"{verb.capitalize()} {len(done)} parked row(s): {done}")
    if skipped:
        typer.echo(f"Not parked (or gone), left alone: {skipped}")
