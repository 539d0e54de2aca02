"""The SQL of the test and demo kits: seeding stock and reservations, and checking
DESIGN.md §3's invariants (the worker's own SQL is in worker/store.py)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from worker.store import Conn, Db


@dataclass(frozen=True)
class StockSnapshot:
    on_hand: int
    reserved: int
    confirmed: int


async def snapshot(db: Db) -> StockSnapshot:
    row = await db.fetchrow(
        """
        SELECT (SELECT coalesce(sum(on_hand), 0) FROM stock),
               (SELECT coalesce(sum(reserved), 0) FROM stock),
               (SELECT count(*) FROM reservations WHERE status = 'confirmed')
        """
    )
    assert row is not None
    return StockSnapshot(int(row[0]), int(row[1]), int(row[2]))


async def i1_violations(db: Db) -> int:
    """Stock rows whose `reserved` differs from the sum of their reserved reservations."""
    value = await db.fetchval(
        """
        SELECT count(*) FROM stock s
        LEFT JOIN (SELECT sku, location_id, sum(quantity) AS held FROM reservations
                   WHERE status = 'reserved' GROUP BY sku, location_id) r
          USING (sku, location_id)
        WHERE s.reserved <> coalesce(r.held, 0)
        """
    )
    return int(value)


async def returned_quantity(db: Db) -> int:
    """Units of reservations that left `reserved` through the worker (released or expired)."""
    value = await db.fetchval(
        "SELECT coalesce(sum(quantity), 0) FROM reservations "
        "WHERE status IN ('released', 'expired') AND released_at IS NOT NULL"
    )
    return int(value)


@dataclass(frozen=True, slots=True)
class SeededReservation:
    reservation_id: str
    partner_id: str
    cart_id: str
    cart_item_id: str
    sku: str
    quantity: int
    status: str


@dataclass
class Seed:
    reservations: list[SeededReservation] = field(default_factory=list)

    def carts(self, partner_id: str) -> dict[str, list[SeededReservation]]:
        carts: dict[str, list[SeededReservation]] = {}
        for r in self.reservations:
            if r.partner_id == partner_id:
                carts.setdefault(r.cart_id, []).append(r)
        return carts


async def seed_stock(conn: Conn, skus: Sequence[str], on_hand: int = 1_000_000) -> None:
    await conn.copy_records_to_table(
        "stock",
        records=[(sku, "default", on_hand, 0) for sku in skus],
        columns=["sku", "location_id", "on_hand", "reserved"],
    )


async def seed_reservations(
    conn: Conn,
    partner_id: str,
    carts: int,
    items_per_cart: int,
    skus: Sequence[str],
    *,
    prefix: str = "",
    statuses: Sequence[tuple[str, float]] = (("reserved", 1.0),),
    overdue_share: float = 0.0,
    rng: random.Random | None = None,
) -> Seed:
    """Reservations of `carts` carts; `statuses` is a (status, weight) mix. Keeps I1."""
    rng = rng or random.Random(7)
    now = datetime.now(UTC)
    names = [s for s, _ in statuses]
    weights = [w for _, w in statuses]
    rows = []
    seed = Seed()
    for c in range(carts):
        cart_id = f"{prefix}cart-{partner_id}-{c}"
        for i in range(items_per_cart):
            status = rng.choices(names, weights)[0]
            quantity = rng.randint(1, 3)
            sku = rng.choice(skus)
            rid = f"{prefix}res-{partner_id}-{c}-{i}"
            overdue = status == "reserved" and rng.random() < overdue_share
            expires = now - timedelta(minutes=1) if overdue else now + timedelta(hours=1)
            released_at = now if status in ("released", "expired") else None
            rows.append(
                (
                    rid,
                    partner_id,
                    cart_id,
                    f"item-{i}",
                    sku,
                    "default",
                    quantity,
                    status,
                    expires,
                    released_at,
                )
            )
            seed.reservations.append(
                SeededReservation(rid, partner_id, cart_id, f"item-{i}", sku, quantity, status)
            )
    await conn.copy_records_to_table(
        "reservations",
        records=rows,
        columns=[
            "reservation_id",
            "partner_id",
            "cart_id",
            "cart_item_id",
            "sku",
            "location_id",
            "quantity",
            "status",
            "expires_at",
            "released_at",
        ],
    )
    await conn.execute(
        """
        UPDATE stock s SET reserved = s.reserved + r.held
          FROM (SELECT sku, location_id, sum(quantity) AS held FROM reservations
                WHERE partner_id = $1 AND status = 'reserved' AND reservation_id LIKE $2
                GROUP BY sku, location_id) r
         WHERE s.sku = r.sku AND s.location_id = r.location_id
        """,
        partner_id,
        f"{prefix}res-{partner_id}-%",
    )
    return seed
