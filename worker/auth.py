"""Partner authentication by the sha256 of `rokt-api-key`, with a short-lived cache.

The key itself is never stored, logged or cached: only its digest. A suspension
or a change of `tag_ids` takes effect within `auth_cache_ttl_s`.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from worker.validate import Rejection, ReleaseCommand


@dataclass(frozen=True, slots=True)
class Partner:
    partner_id: str
    api_key_sha256: bytes
    tag_ids: tuple[str, ...]
    status: str


PartnerLookup = Callable[[list[bytes]], Awaitable[list[Partner]]]


def key_digest(api_key: str) -> bytes:
    return hashlib.sha256(api_key.encode("utf-8")).digest()


class Authenticator:
    """Resolves commands to partners; unknown digests are cached as misses too."""

    def __init__(self, lookup: PartnerLookup, ttl_s: float) -> None:
        self._lookup = lookup
        self._ttl_s = ttl_s
        self._cache: dict[bytes, tuple[float, Partner | None]] = {}

    async def authorize(
        self, commands: Iterable[ReleaseCommand]
    ) -> list[tuple[ReleaseCommand, Partner | Rejection]]:
        commands = list(commands)
        digests = [key_digest(c.api_key) if c.api_key else b"" for c in commands]
        await self._refresh({d for d in digests if d})
        return [
            (command, self._decide(command, digest))
            for command, digest in zip(commands, digests, strict=True)
        ]

    async def _refresh(self, digests: set[bytes]) -> None:
        now = time.monotonic()
        stale = [d for d in digests if d not in self._cache or self._cache[d][0] <= now]
        if not stale:
            return
        found = {p.api_key_sha256: p for p in await self._lookup(stale)}
        expires = now + self._ttl_s
        for digest in stale:
            self._cache[digest] = (expires, found.get(digest))
        if len(self._cache) > 100_000:
            self._cache = {d: v for d, v in self._cache.items() if v[0] > now}

    def _decide(self, command: ReleaseCommand, digest: bytes) -> Partner | Rejection:
        def reject(status: int, code: str, message: str, value: object = None) -> Rejection:
            return Rejection(status, code, message, value, command.event_id, command.cart_id)

        if not digest:
            return reject(401, "missing_api_key", "Header rokt-api-key is required.")
        partner = self._cache[digest][1]
        # The digest comparison is constant-time, so timing does not reveal how
        # much of a guessed key matched a stored one.
        if partner is None or not hmac.compare_digest(partner.api_key_sha256, digest):
            return reject(401, "unknown_api_key", "The rokt-api-key is not known.")
        if partner.status != "active":
            return reject(
                403,
                "partner_suspended",
                "The partner is suspended; contact support to reactivate it.",
            )
        if partner.tag_ids and command.tag_id not in partner.tag_ids:
            return reject(
                403,
                "tag_not_allowed",
                "rokt-tag-id is not one of the partner's allowed tags.",
                command.tag_id,
            )
        return partner
