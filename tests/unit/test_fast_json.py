"""The orjson fast path of results renders exactly what the pydantic contract model does."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from worker.contract import ItemResult, Outcome, Trigger
from worker.release import ItemDecision
from worker.results import item_result_payload, item_results

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


@given(
    _text,
    st.sampled_from(list(Trigger)),
    _text,
    st.lists(
        st.tuples(_text, _text, st.sampled_from(list(Outcome)), st.integers(0, 2**31)),
        max_size=4,
    ),
    st.datetimes(min_value=datetime(2000, 1, 1), timezones=st.just(UTC)),
)
def test_an_events_item_results_are_each_items_own_rendering(
    event_id: str,
    trigger: Trigger,
    cart_id: str,
    items: list[tuple[str, str, Outcome, int]],
    processed_at: datetime,
) -> None:
    decisions = [ItemDecision(*item) for item in items]
    assert item_results(event_id, trigger, cart_id, decisions, processed_at) == [
        item_result_payload(
            event_id=event_id,
            trigger=trigger,
            cart_id=cart_id,
            cart_item_id=d.cart_item_id,
            reservation_id=d.reservation_id,
            outcome=d.outcome,
            quantity=d.quantity,
            processed_at=processed_at,
        )
        for d in decisions
    ]
