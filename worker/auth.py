"""Partner authentication by the sha256 of `rokt-api-key`, with a short-lived cache.

The key itself is never stored, logged or cached: `parse_record` keeps only its digest,
and partners are looked up by digest (`partners.api_key_sha256`, unique). Lookups are
cached per digest, misses included, for `ttl_s` seconds (at most MAX_CACHED_DIGESTS of
them, least recently used out first), so the database is asked at most
once per distinct key per TTL rather than once per record. The price is a bounded delay:
a suspension, a change of `tag_ids`, a new partner or a revoked key takes effect within
`ttl_s` (`WORKER_AUTH_CACHE_TTL_S`, default 5 s) plus the batch then in flight.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from worker.contract import Rejection

if TYPE_CHECKING:  # validate imports key_digest from here
    from worker.validate import ReleaseCommand

# A bound on the cache: past it the least recently used digests are dropped, so a flood of
# random keys costs a bounded amount of memory and cannot push out the keys in use.
MAX_CACHED_DIGESTS = 100_000


def key_digest(api_key: bytes | str) -> bytes:
    """sha256 of a key; partners are stored and found by this digest, never by the key."""
    raw = api_key.encode("utf-8") if isinstance(api_key, str) else api_key
    return hashlib.sha256(raw).digest()


@dataclass(frozen=True, slots=True)
class Partner:
    partner_id: str
    api_key_sha256: bytes
    tag_ids: tuple[str, ...]
    status: str


PartnerLookup = Callable[[list[bytes]], Awaitable[list[Partner]]]


class Authenticator:
    """Resolves commands to partners (or to their 401/403 rejection)."""

    def __init__(
        self,
        lookup: PartnerLookup,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lookup = lookup
        self._ttl_s = ttl_s
        self._clock = clock
        self._cache: OrderedDict[bytes, tuple[float, Partner | None]] = OrderedDict()

    @property
    def cached(self) -> int:
        """How many digests the cache holds (at most MAX_CACHED_DIGESTS)."""
        return len(self._cache)

    async def authorize(
        self, commands: Iterable[ReleaseCommand]
    ) -> list[tuple[ReleaseCommand, Partner | Rejection]]:
        commands = list(commands)
        partners = await self._resolve({c.api_key_sha256 for c in commands if c.api_key_sha256})
        return [(c, self._decide(c, partners.get(c.api_key_sha256))) for c in commands]

    async def _resolve(self, digests: set[bytes]) -> dict[bytes, Partner | None]:
        """The partner (None: unknown) of each digest, from the cache or one lookup.

        Decisions are made from this result, never by reading the cache back: another lane
        may evict or replace an entry while this one awaits its lookup.
        """
        now = self._clock()
        resolved: dict[bytes, Partner | None] = {}
        for digest in digests:
            entry = self._cache.get(digest)
            if entry is not None and entry[0] > now:
                self._cache.move_to_end(digest)
                resolved[digest] = entry[1]
        stale = sorted(digests - resolved.keys())
        if not stale:
            return resolved
        found = {p.api_key_sha256: p for p in await self._lookup(stale)}
        expires = now + self._ttl_s
        for digest in stale:
            resolved[digest] = found.get(digest)
            if self._ttl_s > 0:
                self._cache[digest] = (expires, resolved[digest])
                self._cache.move_to_end(digest)
        while len(self._cache) > MAX_CACHED_DIGESTS:
            self._cache.popitem(last=False)
        return resolved

    def _decide(self, command: ReleaseCommand, partner: Partner | None) -> Partner | Rejection:
        digest = command.api_key_sha256
        if not digest:
            return _reject(
                command,
                None,
                401,
                "missing_api_key",
                "Header rokt-api-key is required: send the partner's API key.",
            )
        # The stored digest is compared in constant time, so the time taken does not
        # reveal how much of it matched. (The key never appears in the value echoed back.)
        if partner is None or not hmac.compare_digest(partner.api_key_sha256, digest):
            return _reject(
                command,
                None,
                401,
                "unknown_api_key",
                "The rokt-api-key is not known: check the key, or ask for a new one if it "
                "was revoked.",
            )
        return admit(command, partner)


def admit(command: ReleaseCommand, partner: Partner) -> Partner | Rejection:
    """The checks after the key: the partner is active and the record's tag is one of its
    own. `release-worker dlq redrive` makes them too, for the partner a dead letter names."""
    if partner.status != "active":
        return _reject(
            command,
            partner,
            403,
            "partner_suspended",
            "The partner is suspended; contact support to reactivate it.",
        )
    if partner.tag_ids and command.tag_id not in partner.tag_ids:
        return _reject(
            command,
            partner,
            403,
            "tag_not_allowed",
            "rokt-tag-id is not one of the partner's allowed tags; use one registered "
            "for this key.",
            command.tag_id,
        )
    return partner


def _reject(
    command: ReleaseCommand,
    partner: Partner | None,
    status: int,
    code: str,
    message: str,
    value: object = None,
) -> Rejection:
    # A 403 knows its partner (its result names it); a 401 has none.
    return Rejection(
        status,
        code,
        message,
        value,
        command.event_id,
        command.cart_id,
        partner_id=partner.partner_id if partner is not None else None,
    )
