"""The machine-readable contract in docs/contract/: generated from the models, committed,
and true of what the worker actually writes and reads."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema_rs
import orjson
import pytest
from typer.testing import CliRunner

from worker.cli.contract import ASYNCAPI, CONTRACT_DIR, REGENERATE, documents, stale, write
from worker.cli.main import app
from worker.contract import (
    DESCRIPTIONS,
    REJECTION_STATUSES,
    Outcome,
    Rejection,
    ReleaseRequest,
    Trigger,
)
from worker.records import Headers, RawRecord
from worker.results import dead_letter, item_result_payload, rejection_payload, result_headers
from worker.testing.scenario import abandon_event
from worker.validate import Limits, parse_record

NOW = datetime(2026, 11, 27, 15, 0, 0, 123456, tzinfo=UTC)


def committed(name: str) -> Any:
    return json.loads((CONTRACT_DIR / name).read_text())


def validator(name: str) -> Any:
    return jsonschema_rs.validator_for(committed(name), validate_formats=True)


def as_json(headers: Headers) -> dict[str, str | None]:
    return {n: None if v is None else v.decode() for n, v in headers}


def test_the_committed_contract_documents_match_the_models() -> None:
    found = stale()
    assert not found, (
        f"docs/contract/ {', '.join(found)} differ from the models in worker/contract.py: "
        f"regenerate them with `{REGENERATE}` (or `make contract`) and commit the result."
    )


def test_a_changed_or_missing_document_is_reported_and_the_command_names_the_fix(
    tmp_path: Path,
) -> None:
    assert write(tmp_path) == list(documents())
    assert stale(tmp_path) == []
    (tmp_path / "item-result.schema.json").write_text("{}\n")
    (tmp_path / ASYNCAPI).unlink()

    assert stale(tmp_path) == ["item-result.schema.json", ASYNCAPI]
    result = CliRunner().invoke(app, ["contract", "check", "--dir", str(tmp_path)])
    assert result.exit_code == 1
    assert REGENERATE in result.output
    assert CliRunner().invoke(app, ["contract", "write", "--dir", str(tmp_path)]).exit_code == 0
    assert stale(tmp_path) == []


@pytest.mark.parametrize("outcome", list(Outcome))
def test_rendered_item_results_and_their_headers_follow_the_committed_schemas(
    outcome: Outcome,
) -> None:
    payload = item_result_payload(
        event_id="e-1",
        trigger=Trigger.RELEASE_REQUEST,
        cart_id="c-1",
        cart_item_id="i-1",
        reservation_id="r-1",
        outcome=outcome,
        quantity=2 if outcome is Outcome.RELEASED else 0,
        processed_at=NOW,
    )
    validator("item-result.schema.json").validate(orjson.loads(payload))
    event = abandon_event("c-1", [("i-1", "r-1")], "key", event_id="e-1")
    record = RawRecord("in", 0, 7, event.key, event.value, event.headers)
    schema = validator("result-headers.schema.json")
    schema.validate(as_json(result_headers("e-1", "p", record, count=3)))  # a request's
    schema.validate(as_json(result_headers("e-1", "p", None)))  # the sweeper's
    schema.validate(as_json(result_headers("e-1", None, record)))  # a 401's


@pytest.mark.parametrize("status", sorted(DESCRIPTIONS))
def test_rendered_rejections_follow_the_committed_schema(status: int) -> None:
    rejection = Rejection(status, "some_code", "why", {"nested": [1]}, "e-1", None)
    validator("event-rejected.schema.json").validate(
        orjson.loads(rejection_payload(rejection, NOW))
    )


def test_the_schema_lists_exactly_the_statuses_the_worker_can_reject_with() -> None:
    assert set(REJECTION_STATUSES) == set(DESCRIPTIONS)


@pytest.mark.parametrize(
    ("value", "max_bytes"), [(b"{not json", 1_048_588), (b"{" + b"x" * 5_000, 16 * 1024)]
)
def test_dead_letter_headers_follow_the_committed_schema_and_never_carry_the_key(
    value: bytes, max_bytes: int
) -> None:
    headers: Headers = (
        ("Rokt-Api-Key", b"secret"),
        ("rokt-session-id", b"s"),
        ("traceparent", None),
        *((f"x-{n}", b"v" * 1_000) for n in range(12)),
    )
    rejection = Rejection(400, "invalid_json", "not JSON", dead_letter=True)
    letter = dead_letter(RawRecord("in", 3, 41, b"k", value, headers), rejection, "dlq", max_bytes)
    schema = validator("dead-letter-headers.schema.json")
    schema.validate(as_json(letter.headers))
    assert not schema.is_valid(as_json(letter.headers) | {"ROKT-API-KEY": "k"})


def test_the_input_schemas_accept_what_the_worker_accepts_and_refuse_its_400s() -> None:
    body, headers = validator("release-request.schema.json"), validator("input-headers.schema.json")
    event = abandon_event("c-1", [("i-1", "r-1")], "key", event_id="e-1", attributes={"a": "b"})
    record = RawRecord("in", 0, 7, event.key, event.value, event.headers)
    assert not isinstance(parse_record(record, Limits()), Rejection)
    body.validate(orjson.loads(record.value or b""))
    headers.validate(as_json(event.headers))

    refused: list[dict[str, Any]] = [
        {"cartId": ""},
        {"cartId": "c", "items": []},
        {"cartId": "c", "items": [{"cartItemId": "i"}]},
        {"cartId": "c", "eventId": "expiry:r-1"},
        {"cartId": "c", "eventId": "cart.abandoned/3/41"},
        {"cartId": "c\u0000"},
        {"cartId": "c", "occurredAt": "yesterday"},
        {"cartId": "c", "attributes": {"a": 1}},
        {"cartId": 7},
    ]
    for value in refused:
        raw = RawRecord("in", 0, 7, b"c", orjson.dumps(value), event.headers)
        verdict = parse_record(raw, Limits())
        assert isinstance(verdict, Rejection), value
        assert verdict.status == 400, value
        assert not body.is_valid(value), value
    assert ReleaseRequest.model_validate({"cartId": "c", "future": 1}).cart_id == "c"
    assert body.is_valid({"cartId": "c", "future": 1}), "unknown fields are ignored"
    assert not headers.is_valid(as_json(event.headers) | {"rokt-session-id": "a\nb"})


def test_every_reference_in_the_asyncapi_document_resolves() -> None:
    doc = committed(ASYNCAPI)
    refs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            refs.extend([node["$ref"]] if "$ref" in node else [])
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(doc)
    assert len(refs) > 20
    for ref in refs:
        node = doc
        for part in ref.removeprefix("#/").split("/"):
            assert part in node, f"{ref} does not resolve"
            node = node[part]
    assert doc["asyncapi"] == "3.0.0"
    assert {c["address"] for c in doc["channels"].values()} == {
        "cart.abandoned",
        "cart.release-results",
        "cart.abandoned.dlq",
    }
