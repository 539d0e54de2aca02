"""`release-worker api`: serve the partner API page over HTTP (DESIGN.md §8)."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import typer

API_HELP = (
    "Serve POST /v1/cart/release over HTTP on top of the Kafka pipeline (docs/api.md).\n\n"
    "Each request is checked as the worker checks a record: bad input and bad credentials "
    "are answered here and never reach Kafka. A valid request becomes a record on "
    "WORKER_INPUT_TOPIC (key = cartId, Idempotency-Key = eventId) and is answered from that "
    "record's results on WORKER_RESULTS_TOPIC: 200 with every item's result, the "
    "rejection's status and body, or 504 results_timeout after WORKER_API_TIMEOUT_S (a "
    "retry with the same Idempotency-Key then gets the results and releases nothing "
    "twice).\n\n"
    "Needs WORKER_KAFKA_BOOTSTRAP, WORKER_DATABASE_URL (partners, for authentication) and "
    "a `release-worker run` on the same topics. Listens on WORKER_API_HOST:WORKER_API_PORT "
    "and also serves /openapi.json, /healthz, /readyz and /metrics. Any number of api "
    "processes may run: each reads the results topic itself. Stops on SIGTERM/SIGINT "
    "after answering the requests in flight."
)


def api(
    print_openapi: Annotated[
        bool,
        typer.Option(
            "--print-openapi",
            help="Print the OpenAPI document (docs/contract/openapi.json) and exit.",
        ),
    ] = False,
) -> None:
    if print_openapi:
        from worker.api.http import openapi_document

        typer.echo(json.dumps(openapi_document(), indent=2, ensure_ascii=False))
        return
    import uvloop

    from worker import logs
    from worker.api.server import run_api
    from worker.cli.common import load_settings

    settings = load_settings()
    logs.configure(settings.log_format, settings.log_level)
    # libuv's event loop: cheaper per request than asyncio's (docs/api.md, Performance).
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        code = runner.run(run_api(settings))
    raise typer.Exit(code)
