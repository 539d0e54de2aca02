"""`release-worker tail`: follow the results topic, filtered, as readable lines or JSON."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
import typer

from worker.cli.common import load_settings, parse_time, reflowed, required, run
from worker.cli.kafka import BEGINNING, END, Message, Start


@reflowed
def tail(
    cart: Annotated[
        str | None, typer.Option(help="Only this cartId (the results' key, or their body's).")
    ] = None,
    partner: Annotated[
        str | None, typer.Option(help="Only results naming this partner (`partner-id`).")
    ] = None,
    event: Annotated[str | None, typer.Option(help="Only this eventId (`event-id`).")] = None,
    start: Annotated[
        str,
        typer.Option(
            "--from",
            help="Where to start: `beginning`, `end` (only new results), or an ISO 8601 "
            "time such as 2026-12-03T07:00:00Z (the first result at or after it).",
        ),
    ] = END,
    follow: Annotated[
        bool, typer.Option(help="Keep following; --no-follow stops at the current end.")
    ] = True,
    limit: Annotated[
        int | None, typer.Option("--max", help="Stop after this many matching results.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object a line: position, headers, body.")
    ] = False,
) -> None:
    """Follow the results topic (WORKER_RESULTS_TOPIC), filtered by cart, partner or
    eventId: one line per result, `item_result` (outcome, reservation, quantity) or
    `event_rejected` (status, code, message). Reads without a consumer group and commits
    nothing, so it never disturbs the worker or the result consumers. Ctrl-C stops it.

    Rejections decided before the partner was known (400 before authentication, 401)
    carry no `partner-id` and are keyed by the record's own key: --partner skips them."""
    settings = load_settings()
    bootstrap = required(settings.kafka_bootstrap, "WORKER_KAFKA_BOOTSTRAP")
    where: Start = start if start in (BEGINNING, END) else parse_time(start)

    def keep(m: Message) -> bool:
        if partner is not None and m.header("partner-id") != partner:
            return False
        if event is not None and m.header("event-id") != event:
            return False
        return cart is None or cart in (_key(m), _body(m).get("cartId"))

    async def go() -> None:
        from rich.console import Console

        from worker.cli import kafka

        console = Console(highlight=False, soft_wrap=True)
        shown = 0
        if limit is not None and limit <= 0:
            return
        async with kafka.consumer(bootstrap) as client:
            async for m in kafka.read(client, settings.results_topic, where, follow, keep):
                if as_json:
                    typer.echo(json_line(m))
                else:
                    console.print(readable_line(m), style=_style(m), markup=False)
                shown += 1
                if limit is not None and shown >= limit:
                    return

    try:
        run(go)
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


def _key(m: Message) -> str | None:
    return None if m.key is None else m.key.decode(errors="replace")


def _body(m: Message) -> dict[str, Any]:
    try:
        body = orjson.loads(m.value or b"")
    except orjson.JSONDecodeError:
        return {}
    return body if isinstance(body, dict) else {}


def json_line(m: Message) -> str:
    return orjson.dumps(
        {
            "partition": m.partition,
            "offset": m.offset,
            "timestamp": _time(m).isoformat(),
            "key": _key(m),
            "event_id": m.header("event-id"),
            "partner_id": m.header("partner-id"),
            "result": _body(m) or (m.value or b"").decode(errors="replace"),
        }
    ).decode()


def readable_line(m: Message) -> str:
    body = _body(m)
    head = (
        f"{_time(m):%Y-%m-%d %H:%M:%S} {m.partition}:{m.offset} "
        f"cart={body.get('cartId') or _key(m)} "
        f"partner={m.header('partner-id') or '-'} event={m.header('event-id')}"
    )
    if body.get("type") == "item_result":
        return (
            f"{head} {body.get('outcome')} {body.get('itemReservationId')} "
            f"quantity={body.get('quantity')} ({body.get('trigger')})"
        )
    if body.get("type") == "event_rejected":
        errors = body.get("errors") or [{}]
        return (
            f"{head} REJECTED {body.get('status')} {errors[0].get('code')}: "
            f"{errors[0].get('message')}"
        )
    return f"{head} (not a result: {len(m.value or b'')} bytes)"


def _style(m: Message) -> str | None:
    body = _body(m)
    if body.get("type") == "event_rejected":
        return "red"
    return "green" if body.get("outcome") == "released" else None


def _time(m: Message) -> datetime:
    return datetime.fromtimestamp(m.timestamp_ms / 1000, UTC)
