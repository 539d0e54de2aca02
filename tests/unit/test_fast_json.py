"""The orjson fast path of results renders exactly what the pydantic contract model does."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from worker.contract import ItemResult, Outcome, Trigger
from worker.results import item_result_payload

_text = st.text(min_size=1, max_size=40)


def assert_fast_equals_model(**fields: Any) -> None:
    """`fields` are `item_result_payload`'s arguments; the model gets the same values."""
    model = ItemResult(
        **{name: value for name, value in fields.items() if name != "reservation_id"},
        item_reservation_id=fields["reservation_id"],
        success=fields["outcome"].success,
    )
    assert item_result_payload(**fields) == model.model_dump_json().encode()


@given(
    st.fixed_dictionaries(
        {
            "event_id": _text,
            "cart_id": _text,
            "cart_item_id": _text,
            "reservation_id": _text,
            "trigger": st.sampled_from(list(Trigger)),
            "outcome": st.sampled_from(list(Outcome)),
            "quantity": st.integers(min_value=0, max_value=2**31),
            "processed_at": st.datetimes(
                min_value=datetime(2000, 1, 1),
                timezones=st.sampled_from([UTC, timezone(timedelta(hours=-5))]),
            ),
        }
    )
)
def test_fast_item_result_is_byte_identical_to_the_contract_model(fields: dict[str, Any]) -> None:
    assert_fast_equals_model(**fields)


def test_fast_item_result_escapes_control_characters_like_the_model() -> None:
    tricky = 'a"b\\c\n\t\x00\x1f\u2028é😀/'
    assert_fast_equals_model(
        event_id=tricky,
        trigger=Trigger.EXPIRY,
        cart_id=tricky,
        cart_item_id=tricky,
        reservation_id=tricky,
        outcome=Outcome.NOT_FOUND,
        quantity=0,
        processed_at=datetime(2026, 11, 27, 15, 0, 0, 999999, tzinfo=UTC),
    )
