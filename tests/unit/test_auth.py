"""Authentication: digest lookup, 401/403 rules, and the cache's bounded staleness."""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import replace

import pytest

from worker.auth import MAX_CACHED_DIGESTS, Authenticator, Partner, key_digest
from worker.contract import Rejection
from worker.records import RawRecord
from worker.validate import ReleaseCommand

KEY = "rk_auth_unit_key"
TTL = 5.0


class Directory:
    """The partners table, as the lookup sees it; counts the lookups."""

    def __init__(self, *partners: Partner) -> None:
        self.partners = {p.api_key_sha256: p for p in partners}
        self.lookups: list[list[bytes]] = []

    async def lookup(self, digests: list[bytes]) -> list[Partner]:
        self.lookups.append(digests)
        return [self.partners[d] for d in digests if d in self.partners]

    def update(self, partner: Partner) -> None:
        self.partners[partner.api_key_sha256] = partner


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


ACTIVE = Partner("p1", key_digest(KEY), ("tag-1", "tag-2"), "active")


def command(api_key: str | None = KEY, tag: str = "tag-1", event_id: str = "e1") -> ReleaseCommand:
    return ReleaseCommand(
        record=RawRecord("in", 0, 0, b"c1", b"{}"),
        event_id=event_id,
        cart_id="c1",
        items=None,
        session_id="s",
        tag_id=tag,
        api_key_sha256=key_digest(api_key) if api_key else b"",
    )


async def decide(auth: Authenticator, *commands: ReleaseCommand) -> list[Partner | Rejection]:
    return [verdict for _, verdict in await auth.authorize(commands)]


def codes(verdicts: list[Partner | Rejection]) -> list[str]:
    return [v.partner_id if isinstance(v, Partner) else f"{v.status} {v.code}" for v in verdicts]


async def test_partners_are_found_by_the_sha256_of_their_key() -> None:
    directory = Directory(ACTIVE)
    auth = Authenticator(directory.lookup, TTL, Clock())
    assert codes(await decide(auth, command())) == ["p1"]
    assert directory.lookups == [[key_digest(KEY)]]
    assert all(KEY.encode() not in d for d in directory.lookups[0])


@pytest.mark.parametrize(
    ("cmd", "expected"),
    [
        (command(api_key=None), "401 missing_api_key"),
        (command(api_key="rk_wrong"), "401 unknown_api_key"),
        (command(tag="tag-9"), "403 tag_not_allowed"),
    ],
)
async def test_credentials_rules(cmd: ReleaseCommand, expected: str) -> None:
    auth = Authenticator(Directory(ACTIVE).lookup, TTL, Clock())
    (verdict,) = await decide(auth, cmd)
    assert codes([verdict]) == [expected]
    assert isinstance(verdict, Rejection)
    assert (verdict.event_id, verdict.cart_id, verdict.dead_letter) == ("e1", "c1", False)
    assert KEY not in repr(verdict)
    # A 403 knows its partner, and its result will name it; a 401 knows none.
    assert verdict.partner_id == ("p1" if verdict.status == 403 else None)


async def test_a_tag_not_allowed_echoes_the_tag_and_an_empty_tag_list_allows_any() -> None:
    open_partner = Partner("p2", key_digest("rk_open"), (), "active")
    auth = Authenticator(Directory(ACTIVE, open_partner).lookup, TTL, Clock())
    refused, allowed = await decide(
        auth, command(tag="tag-9"), command(api_key="rk_open", tag="anything")
    )
    assert isinstance(refused, Rejection)
    assert refused.value == "tag-9"
    assert allowed == open_partner


async def test_a_suspended_partner_is_403_whatever_the_tag() -> None:
    suspended = replace(ACTIVE, status="suspended")
    auth = Authenticator(Directory(suspended).lookup, TTL, Clock())
    assert codes(await decide(auth, command(), command(tag="tag-9"))) == [
        "403 partner_suspended",
        "403 partner_suspended",
    ]


async def test_one_lookup_per_distinct_key_per_ttl_misses_included() -> None:
    directory = Directory(ACTIVE)
    clock = Clock()
    auth = Authenticator(directory.lookup, TTL, clock)
    batch = [command(event_id=f"e{n}") for n in range(50)] + [command(api_key="rk_bad")] * 5
    await decide(auth, *batch)
    clock.now += TTL - 0.01
    await decide(auth, *batch)
    assert len(directory.lookups) == 1
    assert sorted(directory.lookups[0]) == sorted({key_digest(KEY), key_digest("rk_bad")})


async def test_a_suspension_takes_effect_once_the_ttl_has_passed() -> None:
    directory = Directory(ACTIVE)
    clock = Clock()
    auth = Authenticator(directory.lookup, TTL, clock)
    assert codes(await decide(auth, command())) == ["p1"]
    directory.update(replace(ACTIVE, status="suspended"))
    clock.now += TTL / 2
    assert codes(await decide(auth, command())) == ["p1"]  # still cached: the documented bound
    clock.now += TTL / 2
    assert codes(await decide(auth, command())) == ["403 partner_suspended"]


async def test_a_new_key_and_a_new_tag_are_seen_within_the_ttl() -> None:
    directory = Directory()
    clock = Clock()
    auth = Authenticator(directory.lookup, TTL, clock)
    assert codes(await decide(auth, command())) == ["401 unknown_api_key"]
    directory.update(replace(ACTIVE, tag_ids=("tag-1",)))
    clock.now += TTL
    assert codes(await decide(auth, command(tag="tag-3"))) == ["403 tag_not_allowed"]
    directory.update(replace(ACTIVE, tag_ids=("tag-3",)))
    clock.now += TTL
    assert codes(await decide(auth, command(tag="tag-3"))) == ["p1"]


async def test_a_zero_ttl_looks_up_every_batch() -> None:
    directory = Directory(ACTIVE)
    auth = Authenticator(directory.lookup, 0.0, Clock())
    await decide(auth, command())
    await decide(auth, command())
    assert len(directory.lookups) == 2


async def test_the_stored_digest_is_compared_in_constant_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compared: list[tuple[bytes, bytes]] = []
    constant_time = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return constant_time(a, b)

    monkeypatch.setattr("worker.auth.hmac.compare_digest", spy)
    auth = Authenticator(Directory(ACTIVE).lookup, TTL, Clock())
    assert codes(await decide(auth, command())) == ["p1"]
    assert compared == [(key_digest(KEY), key_digest(KEY))]


def unknown_keys(count: int, prefix: str = "rk_flood") -> list[ReleaseCommand]:
    return [command(api_key=f"{prefix}_{n}", event_id=f"e{n}") for n in range(count)]


async def test_a_flood_of_unknown_keys_past_the_cache_bound_is_all_401_with_a_zero_ttl() -> None:
    # Finding 3: past MAX_CACHED_DIGESTS the purge kept only unexpired entries (none, with
    # TTL 0), and the decision then read the entry back from the cache: KeyError.
    auth = Authenticator(Directory(ACTIVE).lookup, 0.0, Clock())
    flood = unknown_keys(MAX_CACHED_DIGESTS + 5_000)
    verdicts: list[Partner | Rejection] = []
    for start in range(0, len(flood), 4_000):
        verdicts += await decide(auth, *flood[start : start + 4_000], command())
    assert set(codes(verdicts)) == {"401 unknown_api_key", "p1"}
    assert codes(verdicts).count("p1") == len(range(0, len(flood), 4_000))
    assert auth.cached <= MAX_CACHED_DIGESTS


async def test_the_cache_stays_bounded_and_keeps_the_keys_in_use() -> None:
    directory = Directory(ACTIVE)
    auth = Authenticator(directory.lookup, TTL, Clock())
    flood = unknown_keys(MAX_CACHED_DIGESTS + 5_000)
    for start in range(0, len(flood), 4_000):
        # The partner's key is used in every batch: a flood of new keys does not evict it.
        assert codes(await decide(auth, command(), *flood[start : start + 4_000]))[0] == "p1"
    assert auth.cached == MAX_CACHED_DIGESTS
    assert sum(key_digest(KEY) in digests for digests in directory.lookups) == 1


async def test_a_decision_does_not_depend_on_another_lane_keeping_the_entry_cached() -> None:
    # Two lanes share the authenticator. Lane A finds the partner's key cached and fresh,
    # then waits for the lookup of a new key; meanwhile the entry expires and lane B's
    # flood pushes it out of the cache. Lane A must still decide from what it resolved.
    class SlowDirectory(Directory):
        def __init__(self, *partners: Partner) -> None:
            super().__init__(*partners)
            self.gate = asyncio.Event()

        async def lookup(self, digests: list[bytes]) -> list[Partner]:
            if key_digest("rk_slow") in digests:
                await self.gate.wait()
            return await super().lookup(digests)

    directory = SlowDirectory(ACTIVE)
    clock = Clock()
    auth = Authenticator(directory.lookup, TTL, clock)
    await decide(auth, command())
    lane_a = asyncio.create_task(decide(auth, command(), command(api_key="rk_slow")))
    await asyncio.sleep(0)
    clock.now += TTL
    await decide(auth, *unknown_keys(MAX_CACHED_DIGESTS + 1))
    directory.gate.set()
    assert codes(await lane_a) == ["p1", "401 unknown_api_key"]
