"""The wire format of DESIGN.md §2: names, order, timestamps."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest
from pydantic import ValidationError

from worker.contract import ErrorDetail, EventRejected, ItemResult, Outcome, ReleaseRequest, Trigger

# The API page's sample request, verbatim.
API_SAMPLE = b"""{
    "cartId": "1580265846172",
    "items": [
        {
            "cartItemId": "30d0a389-5f63-4e20-9553-13ff40f8b11c",
            "itemReservationId": "rokt_item_reservation_id.63a94103-75da-4d71-8c14-84674d286b98"
        }
    ]
}"""


def test_api_sample_request_round_trips_with_camel_case_names() -> None:
    request = ReleaseRequest.model_validate_json(API_SAMPLE)
    assert request.cart_id == "1580265846172"
    assert request.items is not None
    assert request.items[0].item_reservation_id.startswith("rokt_item_reservation_id.")
    again = orjson.loads(request.model_dump_json(exclude_none=True))
    assert again == orjson.loads(API_SAMPLE)


def test_unknown_fields_are_ignored_and_items_may_be_absent() -> None:
    request = ReleaseRequest.model_validate_json(b'{"cartId": "c", "future": {"x": 1}}')
    assert request.items is None
    assert request.event_id is None


def test_item_result_has_the_contract_fields_in_order() -> None:
    result = ItemResult(
        event_id="e1",
        trigger=Trigger.RELEASE_REQUEST,
        cart_id="c1",
        cart_item_id="i1",
        item_reservation_id="r1",
        success=True,
        outcome=Outcome.RELEASED,
        quantity=2,
        processed_at=datetime(2026, 11, 27, 15, 0, 0, 123456, tzinfo=UTC),
    )
    assert result.model_dump_json() == (
        '{"type":"item_result","eventId":"e1","trigger":"release_request","cartId":"c1",'
        '"cartItemId":"i1","itemReservationId":"r1","success":true,"outcome":"released",'
        '"quantity":2,"processedAt":"2026-11-27T15:00:00.123Z"}'
    )


def test_event_rejected_follows_the_api_error_schema() -> None:
    rejected = EventRejected(
        event_id="e1",
        cart_id=None,
        status=422,
        description="Unprocessable",
        errors=[ErrorDetail(code="duplicate_item", message="twice", value="r1")],
        processed_at=datetime(2026, 11, 27, 15, 0, tzinfo=UTC),
    )
    body = orjson.loads(rejected.model_dump_json())
    assert body == {
        "type": "event_rejected",
        "eventId": "e1",
        "cartId": None,
        "status": 422,
        "description": "Unprocessable",
        "errors": [{"code": "duplicate_item", "message": "twice", "value": "r1"}],
        "processedAt": "2026-11-27T15:00:00.000Z",
    }


def test_only_released_already_released_and_expired_are_successes() -> None:
    assert {o for o in Outcome if o.success} == {
        Outcome.RELEASED,
        Outcome.ALREADY_RELEASED,
        Outcome.EXPIRED,
    }


@pytest.mark.parametrize(
    "body",
    [
        b'{"cartId": "a\\u0000b"}',
        b'{"cartId": "c", "eventId": "e\\u0000"}',
        b'{"cartId": "c", "items": [{"cartItemId": "i", "itemReservationId": "r\\u0000"}]}',
    ],
)
def test_identifiers_with_nul_are_refused_before_they_reach_postgresql(body: bytes) -> None:
    with pytest.raises(ValidationError, match="NUL"):
        ReleaseRequest.model_validate_json(body)
