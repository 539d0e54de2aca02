"""The HTTP answers of `POST /v1/cart/release` (the page's schemas), beside the Kafka
contract's models they are built from (`worker.contract`)."""

from __future__ import annotations

from worker.contract import ErrorDetail, Id128, Id256, Outcome, _WireModel


class ReleasedItem(_WireModel):
    """One item of the page's 200 body; `outcome` is an addition to the page."""

    cart_item_id: Id128
    item_reservation_id: Id256
    success: bool
    outcome: Outcome


class ReleaseResponse(_WireModel):
    """200: the items in request order (whole cart: reservation id order)."""

    cart_id: Id128
    items: list[ReleasedItem]


class ErrorBody(_WireModel):
    """The page's error schema, shared with `event_rejected` (description and errors)."""

    description: str
    errors: list[ErrorDetail]
