"""SQL checks of DESIGN.md §3's invariants, used by the demo, the bench and the tests."""

from __future__ import annotations

from dataclasses import dataclass

from worker.store import Db


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
