"""Abandon events as partners send them, shared by the demo, the bench and the tests."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from worker.contract import API_KEY_HEADER, SESSION_HEADER, TAG_HEADER


@dataclass(frozen=True, slots=True)
class Event:
    """One record to produce to the input topic."""

    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]


def abandon_event(
    cart_id: str,
    items: Sequence[tuple[str, str]] | None,
    api_key: str | None,
    *,
    event_id: str | None = None,
    tag_id: str = "tag-1",
    session_id: str | None = None,
    attributes: dict[str, str] | None = None,
) -> Event:
    """An abandon event; `items` of (cartItemId, itemReservationId), None for the whole cart."""
    body: dict[str, object] = {"cartId": cart_id}
    if event_id is not None:
        body["eventId"] = event_id
    if items is not None:
        body["items"] = [{"cartItemId": c, "itemReservationId": r} for c, r in items]
    if attributes:
        body["attributes"] = attributes
    headers = [
        (SESSION_HEADER, (session_id or str(uuid.uuid4())).encode()),
        (TAG_HEADER, tag_id.encode()),
        ("content-type", b"application/json"),
    ]
    if api_key is not None:
        headers.append((API_KEY_HEADER, api_key.encode()))
    return Event(cart_id.encode(), orjson.dumps(body), tuple(headers))
