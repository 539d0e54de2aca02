from __future__ import annotations

import uuid
from dataclasses import dataclass

import asyncpg
import pytest

from tests.conftest import Servers
from tests.support import isolated_settings
from worker.config import Settings
from worker.operator_store import add_partner

pytestmark = pytest.mark.integration


@dataclass
class World:
    """A partner with a key, its own SKU, and settings with private topics."""

    settings: Settings
    partner_id: str
    api_key: str
    other_partner_id: str
    other_api_key: str
    sku: str
    prefix: str


@pytest.fixture
async def world(servers: Servers, db: asyncpg.Pool) -> World:
    prefix = uuid.uuid4().hex[:8]
    partner, other = f"p-{prefix}", f"q-{prefix}"
    key = await add_partner(db, partner, "Partner", ["tag-1"])
    other_key = await add_partner(db, other, "Other")
    sku = f"sku-{prefix}"
    await db.execute("INSERT INTO stock (sku, on_hand) VALUES ($1, 1000)", sku)
    # The worker connects as a member of the least-privilege role `release_worker`.
    settings = isolated_settings(servers.worker_database_url, servers.bootstrap)
    return World(settings, partner, key, other, other_key, sku, prefix)


async def reserve(
    db: asyncpg.Pool,
    world: World,
    reservation_id: str,
    cart_id: str,
    cart_item_id: str,
    quantity: int,
    status: str = "reserved",
    partner_id: str | None = None,
) -> None:
    """Insert a reservation and keep stock.reserved consistent with it (I1)."""
    async with db.acquire() as conn, conn.transaction():
        await conn.execute(
            """
            INSERT INTO reservations (reservation_id, partner_id, cart_id, cart_item_id, sku,
                                      quantity, status, expires_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, now() + interval '1 hour')
            """,
            reservation_id,
            partner_id or world.partner_id,
            cart_id,
            cart_item_id,
            world.sku,
            quantity,
            status,
        )
        if status == "reserved":
            await conn.execute(
                "UPDATE stock SET reserved = reserved + $2 WHERE sku = $1", world.sku, quantity
            )
