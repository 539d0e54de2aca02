"""`release-worker dlq list | show | redrive`: the dead-letter topic for operators."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
import typer

from worker.cli.common import (
    JSON_OPTION_HELP,
    audit_logging,
    database,
    jsonable,
    load_settings,
    operator,
    parse_time,
    print_rows,
    reflow,
    reflowed,
    required,
    run,
)
from worker.cli.redrive import EXPLANATIONS, DeadLetter

app = typer.Typer(
    help=reflow(
        """The dead-letter topic (WORKER_DLQ_TOPIC): records the worker could not read
        (400) and releases that failed on every attempt (500 internal_error, 504
        database_timeout). `list` and `show` read it without a consumer group; `redrive`
        applies failed releases again once their cause is fixed.

        A dead letter is named by its position in the dead-letter topic,
        `partition:offset`, as `list` prints it."""
    ),
    no_args_is_help=True,
)

COLUMNS = ["position", "time", "status", "code", "partner_id", "cart_id", "event_id", "source"]

Status = Annotated[int | None, typer.Option(help="Only this status: 400, 500 or 504.")]
Code = Annotated[str | None, typer.Option(help="Only this code, e.g. internal_error.")]
Partner = Annotated[str | None, typer.Option(help="Only dead letters of this partner_id.")]
Cart = Annotated[str | None, typer.Option(help="Only this cartId.")]
Since = Annotated[
    str | None, typer.Option(help="Only dead letters written at or after this ISO 8601 time.")
]
Until = Annotated[
    str | None, typer.Option(help="Only dead letters written before this ISO 8601 time.")
]
AsJson = Annotated[bool, typer.Option("--json", help=JSON_OPTION_HELP)]


def _matches(
    status: int | None,
    code: str | None,
    partner: str | None,
    cart: str | None,
    until: datetime | None,
) -> Any:
    until_ms = None if until is None else until.timestamp() * 1000

    def keep(letter: DeadLetter) -> bool:
        return (
            (status is None or letter.status == status)
            and (code is None or letter.code == code)
            and (partner is None or letter.partner_id == partner)
            and (cart is None or letter.cart_id == cart)
            and (until_ms is None or letter.message.timestamp_ms < until_ms)
        )

    return keep


def _read(
    status: int | None = None,
    code: str | None = None,
    partner: str | None = None,
    cart: str | None = None,
    since: str | None = None,
    until: str | None = None,
) -> list[DeadLetter]:
    """The dead letters now in the topic that match (read to its current end)."""
    from worker.cli import kafka

    settings = load_settings()
    bootstrap = required(settings.kafka_bootstrap, "WORKER_KAFKA_BOOTSTRAP")
    keep = _matches(status, code, partner, cart, None if until is None else parse_time(until))
    start: kafka.Start = kafka.BEGINNING if since is None else parse_time(since)

    async def go() -> list[DeadLetter]:
        async with kafka.consumer(bootstrap) as client:
            return [
                letter
                async for m in kafka.read(client, settings.dlq_topic, start, follow=False)
                if keep(letter := DeadLetter(m))
            ]

    return run(go)


def _row(letter: DeadLetter) -> dict[str, Any]:
    row = letter.summary()
    row["time"] = datetime.fromtimestamp(letter.message.timestamp_ms / 1000, UTC)
    row["redrive"] = "yes" if row["redrivable"] else f"no: {row['why_not']}"
    return row


@app.command("list")
@reflowed
def list_(
    status: Status = None,
    code: Code = None,
    partner: Partner = None,
    cart: Cart = None,
    since: Since = None,
    until: Until = None,
    as_json: AsJson = False,
) -> None:
    """List dead letters, oldest first, filtered by status, code, partner, cart and time:
    position, time, status, code, partner, cart, eventId, the input record's position,
    and whether it can be re-driven (and why not). Unreadable records (400) are listed
    with their explanation; they are never re-driven."""
    rows = [_row(letter) for letter in _read(status, code, partner, cart, since, until)]
    print_rows(rows, [*COLUMNS, "redrive"], as_json, title="dead letters")


@app.command()
@reflowed
def show(
    position: Annotated[str, typer.Argument(help="`partition:offset` in the dead-letter topic.")],
    as_json: AsJson = False,
) -> None:
    """Show one dead letter in full: what its code means and what to do, every header
    (the API key was never kept), and its value (JSON pretty-printed)."""
    found = [letter for letter in _read() if letter.position == position]
    if not found:
        typer.echo(f"No dead letter at {position} in the dead-letter topic.", err=True)
        raise typer.Exit(1)
    letter = found[0]
    value = letter.message.value
    try:
        body: Any = orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        body = None
    shown = {
        **letter.summary(),
        "explanation": EXPLANATIONS.get(letter.code or "", "See docs/errors.md."),
        "headers": {n: jsonable(v) for n, v in letter.message.headers},
        "key": jsonable(letter.message.key),
        "value": body if body is not None else jsonable(value),
    }
    if as_json:
        typer.echo(orjson.dumps(shown).decode())
        return
    for name in ("position", "status", "code", "partner_id", "cart_id", "event_id", "source"):
        typer.echo(f"{name}: {shown[name]}")
    typer.echo(f"re-drivable: {'yes' if shown['redrivable'] else 'no, ' + shown['why_not']}")
    typer.echo(f"meaning: {shown['explanation']}")
    typer.echo("headers:")
    for name, header in shown["headers"].items():
        typer.echo(f"  {name}: {header}")
    typer.echo(f"key: {shown['key']}")
    rendered = (
        orjson.dumps(body, option=orjson.OPT_INDENT_2).decode()
        if body is not None
        else jsonable(value)
    )
    typer.echo(f"value:\n{rendered}")


@app.command()
@reflowed
def redrive(
    positions: Annotated[
        list[str] | None,
        typer.Argument(help="`partition:offset` of each dead letter (or use the filters)."),
    ] = None,
    status: Status = None,
    code: Code = None,
    partner: Partner = None,
    cart: Cart = None,
    since: Since = None,
    until: Until = None,
    every: Annotated[
        bool, typer.Option("--all", help="Every re-drivable dead letter (no filter).")
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Say what each would do (applied in a transaction rolled back: the rows are "
            "locked a moment, nothing changes, nothing is published).",
        ),
    ] = False,
    rate: Annotated[
        float, typer.Option(min=0.1, help="Most dead letters applied a second.")
    ] = 10.0,
    as_json: AsJson = False,
) -> None:
    """Apply failed releases (500/504 dead letters) again after their cause is fixed,
    selected by position or by filter, in their original order.

    Each is applied in this process through the worker's own release code, as the partner
    its `dlq-partner-id` header names (checked again: still active, tag still allowed):
    no API key is needed and nothing is written to the input topic. Its results go through
    the outbox and are published as the worker's are (what the broker does not
    acknowledge now, the workers' relay publishes).

    At most once: the event's inbox key (partner_id, eventId) is the idempotency key. A
    500/504 records nothing in the inbox, so the first re-drive applies the event and
    records it; any later one (the same dead letter again, a duplicate copy of it, or the
    partner's own re-send of the eventId) finds it, changes and publishes nothing, and is
    reported `already_applied`.

    Unreadable (400) dead letters, and those without `dlq-partner-id` or shrunk to fit,
    are reported `refused` with the reason, never applied. The run stops at the first
    `failed` one (the cause is not fixed yet); exit code 1 then. Every dead letter handled
    is logged to standard error (`dlq_redriven`, `dlq_redrive_failed`) with the OS user
    who ran it; with the log's timestamp, that is who, when and what."""
    from worker.cli import redrive as core

    wanted = set(positions or ())
    filtered = any(f is not None for f in (status, code, partner, cart, since, until))
    if not (wanted or filtered or every):
        typer.echo("Name dead letters by position, or select them with filters or --all.")
        raise typer.Exit(2)
    settings = load_settings()
    audit_logging(settings)
    letters = [
        letter
        for letter in _read(status, code, partner, cart, since, until)
        if not wanted or letter.position in wanted
    ]
    missing = wanted - {letter.position for letter in letters}
    if missing:
        typer.echo(f"No such dead letter (or not matching the filters): {sorted(missing)}")
        raise typer.Exit(1)
    who = operator()
    core.log.info(
        "dlq_redrive_started",
        operator=who,
        dry_run=dry_run,
        dead_letters=len(letters),
        positions=sorted(wanted),
        filters={
            k: v
            for k, v in dict(
                status=status, code=code, partner=partner, cart=cart, since=since, until=until
            ).items()
            if v is not None
        },
    )

    async def go() -> core.Run:
        async with database(settings) as pool:
            return await core.redrive(pool, settings, letters, dry_run, rate, who)

    done = run(go)
    print_rows(
        [o.row() for o in done.outcomes],
        ["position", "source", "partner_id", "event_id", "result", "detail"],
        as_json,
        title="re-drive" + (" (dry run: nothing changed)" if dry_run else ""),
    )
    counts: dict[str, int] = {}
    for o in done.outcomes:
        counts[o.result] = counts.get(o.result, 0) + 1
    summary = ", ".join(f"{n} {result}" for result, n in sorted(counts.items())) or "nothing"
    unpublished = done.results - done.published
    if not as_json:
        typer.echo(
            f"{summary}; {done.published} result(s) published"
            + (f", {unpublished} left in the outbox for the relay" if unpublished > 0 else "")
        )
    core.log.info(
        "dlq_redrive_finished",
        operator=who,
        dry_run=dry_run,
        published=done.published,
        unpublished=max(0, unpublished),
        **counts,
    )
    if counts.get("failed"):
        raise typer.Exit(1)
