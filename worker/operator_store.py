"""The SQL of the operator commands (`worker/cli/`): reading the worker's books, the
two explicit actions on parked outbox rows, and adding partners. The running worker
never calls these.

Every statement runs as the worker's own login (`release_worker`'s grants suffice), except
`add_partner`: partners are the owner's to add.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from worker.auth import Partner, key_digest
from worker.store import Db, decode_headers, unpublished_backlog


def new_api_key() -> str:
    return "rk_" + secrets.token_urlsafe(32)


async def add_partner(
    db: Db,
    partner_id: str,
    name: str,
    tag_ids: Sequence[str] = (),
    api_key: str | None = None,
    status: str = "active",
) -> str:
    """Create the partner; return its API key (the only time it is available: only its
    sha256 is stored)."""
    key = api_key or new_api_key()
    await db.execute(
        """
        INSERT INTO partners (partner_id, name, api_key_sha256, tag_ids, status)
        VALUES ($1, $2, $3, $4, $5)
        """,
        partner_id,
        name,
        key_digest(key),
        list(tag_ids),
        status,
    )
    return key


@dataclass(frozen=True, slots=True)
class OutboxSummary:
    waiting: int  # not yet acknowledged by the broker (the relay publishes them)
    oldest_waiting: datetime | None
    parked: int  # refused by the broker for good; wait for `outbox retry` or `outbox drop`
    oldest_parked: datetime | None
    # Inbox rows at or above their partition's published watermark: fresh results not yet
    # known acknowledged (no outbox rows); the partition's owner republishes them.
    unpublished: int = 0


async def outbox_summary(db: Db) -> OutboxSummary:
    row = await db.fetchrow(
        """
        SELECT count(*) FILTER (WHERE parked_at IS NULL),
               min(created_at) FILTER (WHERE parked_at IS NULL),
               count(parked_at), min(parked_at)
          FROM outbox
        """
    )
    assert row is not None
    unpublished = await unpublished_backlog(db)
    return OutboxSummary(int(row[0]), row[1], int(row[2]), row[3], unpublished)


async def outbox_rows(db: Db, parked: bool, limit: int) -> list[dict[str, Any]]:
    """Outbox rows, oldest first: the parked ones, or those waiting to be published."""
    rows = await db.fetch(
        """
        SELECT id, topic, key, headers, octet_length(payload) AS payload_bytes,
               created_at, parked_at, park_reason
          FROM outbox WHERE (parked_at IS NOT NULL) = $1
         ORDER BY id LIMIT $2
        """,
        parked,
        limit,
    )
    return [
        _outbox_row(
            r,
            {
                "topic": r["topic"],
                "key": None if r["key"] is None else bytes(r["key"]).decode(errors="replace"),
            },
            {"payload_bytes": r["payload_bytes"]},
        )
        for r in rows
    ]


def _outbox_row(
    r: asyncpg.Record, identity: dict[str, Any], content: dict[str, Any]
) -> dict[str, Any]:
    """An outbox row for the operator: id, `identity`, event and partner (from its
    headers), `content`, then when it was written and parked (and why)."""
    headers = dict(decode_headers(r["headers"]))
    return {
        "id": r["id"],
        **identity,
        "event_id": _text(headers.get("event-id")),
        "partner_id": _text(headers.get("partner-id")),
        **content,
        "created_at": r["created_at"],
        "parked_at": r["parked_at"],
        "park_reason": r["park_reason"],
    }


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode(errors="replace")


async def unpark_outbox(db: Db, ids: Sequence[int]) -> list[int]:
    """Give parked rows back to the relay (it publishes them on its next pass, or parks
    them again if the broker still refuses them); return the ids that were parked."""
    rows = await db.fetch(
        """
        UPDATE outbox SET parked_at = NULL, park_reason = NULL
         WHERE id = ANY($1::bigint[]) AND parked_at IS NOT NULL
        RETURNING id
        """,
        list(ids),
    )
    return sorted(r[0] for r in rows)


async def drop_parked_outbox(db: Db, ids: Sequence[int]) -> list[int]:
    """Delete parked rows (never a row still waiting); return the ids deleted."""
    rows = await db.fetch(
        "DELETE FROM outbox WHERE id = ANY($1::bigint[]) AND parked_at IS NOT NULL RETURNING id",
        list(ids),
    )
    return sorted(r[0] for r in rows)


async def cart_reservations(db: Db, partner_id: str, cart_id: str) -> list[dict[str, Any]]:
    rows = await db.fetch(
        """
        SELECT reservation_id, cart_item_id, sku, location_id, quantity, status, expires_at,
               released_at, release_event_id
          FROM reservations WHERE partner_id = $1 AND cart_id = $2
         ORDER BY cart_item_id, reservation_id
        """,
        partner_id,
        cart_id,
    )
    return [dict(r) for r in rows]


CART_EVENTS_SQL = """
SELECT event_id, source_topic, source_partition, source_offset, processed_at, results
  FROM inbox WHERE partner_id = $1 AND cart_id = $2
 ORDER BY processed_at, source_topic, source_partition, source_offset
"""


async def cart_events(db: Db, partner_id: str, cart_id: str) -> list[dict[str, Any]]:
    """The inbox rows of the cart (events applied to it), in the order they were applied,
    with their results decoded (None once pruned past the retention: the key alone is kept).

    Found by `inbox_partner_cart_idx` (the inbox keeps every event's key forever: a
    filter on the cart alone read the whole table).
    """
    rows = await db.fetch(CART_EVENTS_SQL, partner_id, cart_id)
    return [
        {
            "event_id": r["event_id"],
            "position": f"{r['source_topic']}/{r['source_partition']}/{r['source_offset']}",
            "processed_at": r["processed_at"],
            "results": None if r["results"] is None else [orjson.loads(p) for p in r["results"]],
        }
        for r in rows
    ]


async def cart_outbox(db: Db, cart_id: str, topic: str) -> list[dict[str, Any]]:
    """Results of the cart not yet published (waiting or parked)."""
    rows = await db.fetch(
        """
        SELECT id, headers, payload, created_at, parked_at, park_reason FROM outbox
         WHERE topic = $2 AND key = convert_to($1, 'UTF8') ORDER BY id
        """,
        cart_id,
        topic,
    )
    return [
        _outbox_row(r, {}, {"result": None if r["payload"] is None else orjson.loads(r["payload"])})
        for r in rows
    ]


async def partner_by_id(db: Db, partner_id: str) -> Partner | None:
    row = await db.fetchrow(
        "SELECT partner_id, api_key_sha256, tag_ids, status FROM partners WHERE partner_id = $1",
        partner_id,
    )
    return None if row is None else Partner(row[0], bytes(row[1]), tuple(row[2]), row[3])


async def applied_from(db: Db, partner_id: str, event_id: str) -> str | None:
    """The input position (`topic/partition/offset`) of the record that applied this event,
    or None if the inbox has no such event: the idempotency check of a re-drive."""
    row = await db.fetchrow(
        """
        SELECT source_topic, source_partition, source_offset FROM inbox
         WHERE partner_id = $1 AND event_id = $2
        """,
        partner_id,
        event_id,
    )
    return None if row is None else f"{row[0]}/{row[1]}/{row[2]}"
