"""Partner administration: keys are shown once and stored only as their sha256."""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from worker.auth import key_digest
from worker.store import Db


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
    """Create the partner; return its API key (the only time it is available)."""
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
