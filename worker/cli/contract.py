"""`release-worker contract write|check`: the machine-readable Kafka contract in docs/contract/.

Every document is generated from the pydantic models of `worker/contract.py`: a JSON
Schema (draft 2020-12) per record body and per header set, and an AsyncAPI 3.0 document
of the three topics (keys, headers, payloads). `check` (and tests/unit/test_contract_docs.py)
fails when a committed file differs from what the models give now.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode, models_json_schema

import worker
from worker.config import Settings
from worker.contract import (
    DeadLetterHeaders,
    EventRejected,
    InputHeaders,
    ItemResult,
    ReleaseRequest,
    ResultHeaders,
)

CONTRACT_DIR = Path(__file__).resolve().parents[2] / "docs" / "contract"
REGENERATE = "release-worker contract write"
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

# File name, model, and whether the worker reads it (validation) or writes it (serialization).
SCHEMAS: tuple[tuple[str, type[BaseModel], JsonSchemaMode], ...] = (
    ("release-request.schema.json", ReleaseRequest, "validation"),
    ("input-headers.schema.json", InputHeaders, "validation"),
    ("item-result.schema.json", ItemResult, "serialization"),
    ("event-rejected.schema.json", EventRejected, "serialization"),
    ("result-headers.schema.json", ResultHeaders, "serialization"),
    ("dead-letter-headers.schema.json", DeadLetterHeaders, "serialization"),
)
ASYNCAPI = "asyncapi.json"
KAFKA_BINDING = "0.5.0"


class _Untitled(GenerateJsonSchema):
    """pydantic's schemas without a title per field ("Cartitemid"): the names say it."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False


def json_schema(model: type[BaseModel], mode: JsonSchemaMode) -> dict[str, Any]:
    schema = model.model_json_schema(by_alias=True, mode=mode, schema_generator=_Untitled)
    return {"$schema": JSON_SCHEMA_DIALECT, **schema}


def asyncapi() -> dict[str, Any]:
    """The AsyncAPI 3.0 document: the worker receives on the input topic and sends on the
    results and dead-letter topics. Topic names and group are the defaults (configurable)."""
    defaults = {name: field.default for name, field in Settings.model_fields.items()}
    _, top = models_json_schema(
        [(model, mode) for _, model, mode in SCHEMAS],
        by_alias=True,
        ref_template="#/components/schemas/{model}",
        schema_generator=_Untitled,
    )

    def ref(path: str) -> dict[str, str]:
        return {"$ref": f"#/{path}"}

    def key(description: str) -> dict[str, Any]:
        return {"kafka": {"key": {"type": "string", "description": description}, **_binding()}}

    cart_key = key("The cartId (UTF-8): one cart's records are processed in offset order.")
    messages = {
        "releaseRequest": {
            "name": "releaseRequest",
            "title": "Release request",
            "summary": "Release a cart's reservations: listed items, or the whole cart.",
            "contentType": "application/json",
            "headers": ref("components/schemas/InputHeaders"),
            "payload": ref("components/schemas/ReleaseRequest"),
            "bindings": cart_key,
        },
        "itemResult": {
            "name": "itemResult",
            "title": "Item result",
            "summary": "The outcome of one item of a request, or of one expired reservation.",
            "contentType": "application/json",
            "headers": ref("components/schemas/ResultHeaders"),
            "payload": ref("components/schemas/ItemResult"),
            "bindings": key("The cartId."),
        },
        "eventRejected": {
            "name": "eventRejected",
            "title": "Event rejected",
            "summary": "The only result of a request refused as a whole (400-504).",
            "contentType": "application/json",
            "headers": ref("components/schemas/ResultHeaders"),
            "payload": ref("components/schemas/EventRejected"),
            "bindings": key(
                "The cartId once the partner is identified; before that (400 before "
                "authentication, 401) the input record's own key."
            ),
        },
        "deadLetter": {
            "name": "deadLetter",
            "title": "Dead letter",
            "summary": "A record that could not be read (400) or kept failing (500, 504), "
            "as it came.",
            "contentType": "application/octet-stream",
            "headers": ref("components/schemas/DeadLetterHeaders"),
            "payload": {
                "description": "The input record's value bytes unchanged; cut to fit the topic "
                "when too large (then the `dlq-truncated` header is present)."
            },
            "bindings": key("The input record's key, unchanged."),
        },
    }
    channels = {
        "releaseRequests": _channel(
            defaults["input_topic"],
            "Cart-abandon events: what the checkout emits.",
            ["releaseRequest"],
        ),
        "releaseResults": _channel(
            defaults["results_topic"],
            "Every input record yields one `item_result` per item, or exactly one "
            "`event_rejected`; published at least once, a repeat byte-for-byte the first.",
            ["itemResult", "eventRejected"],
        ),
        "deadLetters": _channel(
            defaults["dlq_topic"],
            "Unreadable records, 500s and 504s (also answered on the results topic). An "
            "outage is never a reason to dead-letter.",
            ["deadLetter"],
        ),
    }
    group = {"kafka": {"groupId": {"type": "string", "enum": [defaults["group_id"]]}}}
    operations = {
        "receiveReleaseRequests": _operation(
            "receive", "releaseRequests", channels, "Apply each release once, in cart order."
        )
        | {"bindings": {"kafka": {**group["kafka"], **_binding()}}},
        "sendResults": _operation(
            "send", "releaseResults", channels, "Publish the results of each record."
        ),
        "sendDeadLetters": _operation(
            "send", "deadLetters", channels, "Dead-letter unreadable and poison records."
        ),
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "cart-release-worker",
            "version": worker.__version__,
            "description": "The Kafka contract of the cart release worker (DESIGN.md §2): the "
            "event-driven form of POST /v1/cart/release. Topic names and the consumer group "
            "are the defaults; each is configurable (WORKER_INPUT_TOPIC, "
            "WORKER_RESULTS_TOPIC, WORKER_DLQ_TOPIC, WORKER_GROUP_ID). Generated from "
            f"worker/contract.py by `{REGENERATE}`.",
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": top["$defs"]},
    }


def _binding() -> dict[str, str]:
    return {"bindingVersion": KAFKA_BINDING}


def _channel(address: str, description: str, messages: list[str]) -> dict[str, Any]:
    return {
        "address": address,
        "description": description,
        "messages": {m: {"$ref": f"#/components/messages/{m}"} for m in messages},
    }


def _operation(
    action: Literal["send", "receive"],
    channel: str,
    channels: dict[str, Any],
    summary: str,
) -> dict[str, Any]:
    return {
        "action": action,
        "summary": summary,
        "channel": {"$ref": f"#/channels/{channel}"},
        "messages": [
            {"$ref": f"#/channels/{channel}/messages/{m}"} for m in channels[channel]["messages"]
        ],
    }


def documents() -> dict[str, str]:
    """Every generated file of docs/contract/, by name, as its exact text."""
    docs: dict[str, Any] = {name: json_schema(model, mode) for name, model, mode in SCHEMAS}
    docs[ASYNCAPI] = asyncapi()
    return {
        name: json.dumps(doc, indent=2, ensure_ascii=False) + "\n" for name, doc in docs.items()
    }


def stale(directory: Path = CONTRACT_DIR) -> list[str]:
    """Names of the files in `directory` that are missing or differ from the models."""
    return [
        name
        for name, text in documents().items()
        if not (directory / name).is_file() or (directory / name).read_text() != text
    ]


def write(directory: Path = CONTRACT_DIR) -> list[str]:
    """Write every document; return the names that changed."""
    changed = stale(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in documents().items():
        (directory / name).write_text(text)
    return changed


contract_app = typer.Typer(
    help="The machine-readable contract (JSON Schema, AsyncAPI) in docs/contract/, generated "
    "from worker/contract.py.",
    no_args_is_help=True,
)
DirOption = Annotated[Path, typer.Option("--dir", help="Where the documents live.")]


@contract_app.command("write")
def write_command(directory: DirOption = CONTRACT_DIR) -> None:
    """Regenerate the documents from the models."""
    changed = write(directory)
    typer.echo(f"Updated {', '.join(changed)}." if changed else "Already up to date.")


@contract_app.command("check")
def check_command(directory: DirOption = CONTRACT_DIR) -> None:
    """Exit 1 if a committed document differs from what the models give."""
    found = stale(directory)
    if found:
        typer.echo(f"Out of date: {', '.join(found)}. Regenerate with `{REGENERATE}`.", err=True)
        raise typer.Exit(1)
    typer.echo("The contract documents match the models.")
