"""`release-worker inspect cart`: what happened to one cart, from the database alone."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
import typer

from worker.cli.common import database, jsonable, load_settings, print_rows, reflowed, run

app = typer.Typer(help="Look into the worker's books (read-only).", no_args_is_help=True)


@app.command()
@reflowed
def cart(
    cart_id: Annotated[str, typer.Argument(help="The cartId.")],
    partner: Annotated[str, typer.Option(help="The partner_id the cart belongs to.")],
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="JSON lines, each with `kind`: reservation, event or unpublished.",
        ),
    ] = False,
) -> None:
    """What happened to a cart, in one command: its reservations (status, expiry, the
    eventId that released each), the events applied to it (inbox rows: eventId, the
    input record's topic/partition/offset, when) with the results they produced, and
    its results not yet published (outbox rows waiting or parked).

    An event that is not listed was never applied: it was rejected before the domain
    (400/401/403/422 item rules record nothing), dead-lettered (see `release-worker dlq
    list --cart`), or not read yet (see `release-worker offsets`). Results of an event
    older than WORKER_INBOX_RETENTION_HOURS are pruned: its row shows `(pruned)`.
    Expiry releases are not events: the reservation shows status `expired`."""
    from worker import operator_store

    settings = load_settings()

    async def go() -> dict[str, list[dict[str, Any]]]:
        async with database(settings) as pool:
            return {
                "reservation": await operator_store.cart_reservations(pool, partner, cart_id),
                "event": await operator_store.cart_events(pool, partner, cart_id),
                "unpublished": await operator_store.cart_outbox(
                    pool, cart_id, settings.results_topic
                ),
            }

    found = run(go)
    if as_json:
        for kind, rows in found.items():
            for row in rows:
                typer.echo(orjson.dumps({"kind": kind} | row, default=jsonable).decode())
        return
    print_rows(
        found["reservation"],
        [
            "reservation_id",
            "cart_item_id",
            "sku",
            "quantity",
            "status",
            "expires_at",
            "released_at",
            "release_event_id",
        ],
        False,
        title=f"reservations of cart {cart_id!r} (partner {partner!r})",
    )
    events = [{**e, "results": _summary(e["results"])} for e in found["event"]]
    print_rows(
        events,
        ["event_id", "position", "processed_at", "results"],
        False,
        title="events applied (inbox)",
    )
    unpublished = [{**u, "result": _summary([u["result"]])} for u in found["unpublished"]]
    print_rows(
        unpublished,
        ["id", "event_id", "result", "created_at", "parked_at", "park_reason"],
        False,
        title="results not yet published (outbox)",
    )


def _summary(results: list[Any] | None) -> str:
    """One line per result: `released res-1 ×2`, or `422 cart_not_found`."""
    if results is None:
        return "(pruned)"
    lines = []
    for r in results:
        if not isinstance(r, dict):
            lines.append("?")
        elif r.get("type") == "item_result":
            lines.append(f"{r.get('outcome')} {r.get('itemReservationId')} ×{r.get('quantity')}")
        else:
            code = (r.get("errors") or [{}])[0].get("code")
            lines.append(f"{r.get('status')} {code}")
    return "\n".join(lines)
