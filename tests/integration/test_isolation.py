"""Tenant isolation and the least-privilege database role, on the real servers.

A partner naming another partner's reservation learns nothing (`not_found`, like a
missing one), changes nothing, and leaves a metric and a security log event behind.
The worker runs as a member of `release_worker`, whose grants are pinned here.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from tests.conftest import WORKER_LOGIN, Servers
from tests.integration.conftest import World, reserve
from tests.support import produce, read_topic, running_worker
from worker.testing.scenario import abandon_event
from worker.testing.store import i1_violations

pytestmark = pytest.mark.integration

CROSS_PARTNER = "release_worker_cross_partner_attempts_total"


def _shape(result: dict[str, Any]) -> dict[str, Any]:
    """What a result says about a reservation, minus the ids the partner sent itself."""
    return {k: v for k, v in result.items() if k not in ("itemReservationId", "cartItemId")}


async def test_another_partners_reservation_is_not_found_untouched_counted_and_logged(
    db: asyncpg.Pool, world: World, servers: Servers
) -> None:
    p, other = world.prefix, world.other_partner_id
    await reserve(db, world, f"{p}-mine", f"{p}-c", "i0", 1)
    await reserve(db, world, f"{p}-theirs", f"{p}-their-cart", "i0", 4, partner_id=other)
    await reserve(db, world, f"{p}-theirs-too", f"{p}-c", "i1", 2, partner_id=other)
    key = world.api_key
    events = [
        # Exactly the other partner's ids: reservation, cart and cart item.
        abandon_event(f"{p}-their-cart", [("i0", f"{p}-theirs")], key, event_id=f"{p}-e1"),
        # A cart id both partners use: only this partner's reservation is released.
        abandon_event(
            f"{p}-c",
            [("i0", f"{p}-mine"), ("i1", f"{p}-theirs-too"), ("i9", f"{p}-nowhere")],
            key,
            event_id=f"{p}-e2",
        ),
        abandon_event(f"{p}-their-cart", None, key, event_id=f"{p}-e3"),
        abandon_event(f"{p}-c", None, key, event_id=f"{p}-e4"),
        # The other partner reuses an eventId: idempotency is per partner, so this is not a
        # replay of the first partner's stored results, and it names a foreign reservation.
        abandon_event(
            f"{p}-c", [("i0", f"{p}-mine")], world.other_api_key, event_id=f"{p}-e2", tag_id="x"
        ),
    ]
    before = REGISTRY.get_sample_value(CROSS_PARTNER) or 0.0
    with capture_logs() as logs:
        async with running_worker(world.settings):
            await produce(world.settings, events)
            records = await read_topic(
                servers.bootstrap, world.settings.results_topic, lambda seen: len(seen) >= 7
            )
    assert (REGISTRY.get_sample_value(CROSS_PARTNER) or 0.0) - before == 3
    by_event: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_event.setdefault(r.body["eventId"], []).append(r.body)
    (e1,) = by_event[f"{p}-e1"]
    assert (e1["outcome"], e1["success"], e1["quantity"]) == ("not_found", False, 0)
    assert sorted((r["itemReservationId"], r["outcome"]) for r in by_event[f"{p}-e2"]) == [
        (f"{p}-mine", "not_found"),  # the other partner's event
        (f"{p}-mine", "released"),
        (f"{p}-nowhere", "not_found"),
        (f"{p}-theirs-too", "not_found"),
    ]
    e2 = {r["itemReservationId"]: r for r in by_event[f"{p}-e2"] if r["cartItemId"] != "i0"}
    # Existence is not leaked: a foreign reservation reads exactly like a missing one.
    assert _shape(e2[f"{p}-theirs-too"]) == _shape(e2[f"{p}-nowhere"])
    (e3,) = by_event[f"{p}-e3"]
    assert (e3["status"], e3["errors"][0]["code"]) == (422, "cart_not_found")
    (e4,) = by_event[f"{p}-e4"]  # the whole cart is this partner's part of it only
    assert (e4["itemReservationId"], e4["outcome"]) == (f"{p}-mine", "already_released")

    rows = await db.fetch(
        "SELECT reservation_id, status, release_event_id FROM reservations WHERE sku = $1",
        world.sku,
    )
    assert {r[0]: (r[1], r[2]) for r in rows} == {
        f"{p}-mine": ("released", f"{p}-e2"),
        f"{p}-theirs": ("reserved", None),
        f"{p}-theirs-too": ("reserved", None),
    }
    assert await db.fetchval("SELECT reserved FROM stock WHERE sku = $1", world.sku) == 6
    assert await i1_violations(db) == 0

    security = [e for e in logs if e["event"] == "security_cross_partner_attempt"]
    assert {
        (e["partner_id"], e["event_id"], e["items"], *e["reservation_ids"]) for e in security
    } == {
        (world.partner_id, f"{p}-e1", 1, f"{p}-theirs"),
        (world.partner_id, f"{p}-e2", 1, f"{p}-theirs-too"),
        (other, f"{p}-e2", 1, f"{p}-mine"),
    }
    assert all(e["log_level"] == "warning" for e in security)
    for secret in (world.api_key, world.other_api_key):
        assert not [e for e in logs if secret in repr(e)]


# What `release_worker` may do, table by table (docs/errors.md, "Database role").
EXPECTED_GRANTS = {
    ("schema_migrations", "SELECT", None),
    ("partners", "SELECT", None),
    ("reservations", "SELECT", None),
    ("reservations", "UPDATE", "status"),
    ("reservations", "UPDATE", "released_at"),
    ("reservations", "UPDATE", "release_event_id"),
    ("stock", "SELECT", None),
    ("stock", "UPDATE", "reserved"),
    ("inbox", "SELECT", None),
    ("inbox", "INSERT", None),
    ("inbox", "UPDATE", "results"),  # pruned to a tombstone after the retention
    ("inbox", "UPDATE", "result_headers"),  # pruned with the results
    ("outbox", "SELECT", None),
    ("outbox", "INSERT", None),
    ("outbox", "DELETE", None),
    ("outbox", "UPDATE", "created_at"),
    ("outbox", "UPDATE", "parked_at"),  # a message the broker refuses for good is parked
    ("outbox", "UPDATE", "park_reason"),
    ("consumer_offsets", "SELECT", None),
    ("consumer_offsets", "INSERT", None),
    ("consumer_offsets", "UPDATE", "next_offset"),
    ("consumer_offsets", "UPDATE", "published_offset"),  # the published watermark
    ("consumer_offsets", "UPDATE", "updated_at"),
}


async def test_the_worker_role_has_exactly_the_grants_it_needs(db: asyncpg.Pool) -> None:
    # Table-level grants, then column-level ones that are not implied by a table grant.
    tables = await db.fetch(
        """
        SELECT table_name, privilege_type FROM information_schema.role_table_grants
        WHERE grantee = 'release_worker'
        """
    )
    columns = await db.fetch(
        """
        SELECT c.table_name, c.privilege_type, c.column_name
        FROM information_schema.column_privileges c
        WHERE c.grantee = 'release_worker' AND NOT EXISTS (
            SELECT 1 FROM information_schema.role_table_grants t
            WHERE t.grantee = c.grantee AND t.table_name = c.table_name
              AND t.privilege_type = c.privilege_type)
        """
    )
    granted = {(r[0], r[1], None) for r in tables} | {(r[0], r[1], r[2]) for r in columns}
    assert granted == EXPECTED_GRANTS
    # One function, run as the table's owner: it re-summarises the expiry index
    # (migrations/20261203200000_hot_releases.sql) and does nothing else.
    routines = await db.fetch(
        "SELECT routine_name, privilege_type FROM information_schema.role_routine_grants "
        "WHERE grantee = 'release_worker'"
    )
    assert {tuple(r) for r in routines} == {("release_worker_resummarize_expiry", "EXECUTE")}
    role = await db.fetchrow(
        "SELECT rolcanlogin, rolsuper, rolcreaterole, rolbypassrls FROM pg_roles "
        "WHERE rolname = 'release_worker'"
    )
    assert role is not None
    assert tuple(role) == (False, False, False, False)


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE stock SET on_hand = on_hand + 1",
        "UPDATE reservations SET partner_id = partner_id",
        "UPDATE reservations SET quantity = quantity",
        "INSERT INTO reservations (reservation_id, partner_id, cart_id, cart_item_id, sku, "
        "quantity, status, expires_at) VALUES ('x', 'x', 'x', 'x', 'x', 1, 'reserved', now())",
        "DELETE FROM reservations",
        "UPDATE partners SET status = 'active'",
        "INSERT INTO partners (partner_id, name, api_key_sha256) VALUES ('x', 'x', 'x')",
        # Inbox keys are kept forever: only the results may go (pruned to a tombstone).
        "UPDATE inbox SET event_id = event_id",
        "DELETE FROM inbox",
        "TRUNCATE outbox",
        "CREATE TABLE intruder (id int)",
    ],
)
async def test_the_worker_login_cannot_step_outside_its_grants(
    servers: Servers, statement: str
) -> None:
    conn = await asyncpg.connect(servers.worker_database_url)
    try:
        assert await conn.fetchval("SELECT current_user") == WORKER_LOGIN
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with conn.transaction():
                await conn.execute(statement)
    finally:
        await conn.close()


async def test_integration_workers_connect_as_the_least_privilege_login(
    world: World, db: asyncpg.Pool
) -> None:
    assert world.settings.database_url is not None
    assert world.settings.database_url.startswith(f"postgresql://{WORKER_LOGIN}:")
    member = await db.fetchval(
        "SELECT pg_has_role($1, 'release_worker', 'MEMBER') AND NOT rolsuper "
        "FROM pg_roles WHERE rolname = $1",
        WORKER_LOGIN,
    )
    assert member is True
