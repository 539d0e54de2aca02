"""Every status and code of docs/errors.md, produced through the real broker and PostgreSQL.

One worker (running as the least-privilege role) answers every case of the table in one
go (`answered`, module scope); each case is then checked by its own test: the
`event_rejected` result, the dead letter where DESIGN.md §2 calls for one, and that no
API key appears in anything the worker wrote, logged or exported. The 504 and the
1,000-record stream need settings of their own and run their own worker.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import json
import logging
import random
import re
import uuid
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.error import HTTPError
from urllib.request import urlopen

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import REGISTRY, generate_latest
from structlog.testing import capture_logs

from tests.conftest import Servers
from tests.integration.conftest import World, reserve
from tests.support import (
    Published,
    isolated_settings,
    produce_in_one_batch,
    read_topic,
    running_worker,
)
from worker.config import Settings
from worker.contract import DESCRIPTIONS
from worker.operator_store import add_partner
from worker.testing.embedded import free_port
from worker.testing.store import i1_violations

pytestmark = pytest.mark.integration

P = uuid.uuid4().hex[:8]
KEY = f"rk_{P}_active_partner_key"
SUSPENDED_KEY = f"rk_{P}_suspended_partner_key"
UNKNOWN_KEY = f"rk_{P}_nobody_has_this_key"
SECRETS = (KEY, SUSPENDED_KEY, UNKNOWN_KEY)
SKU = f"sku-{P}"
POISON_RESERVATION = f"{P}-poison"  # its status is unknown to the worker: apply_batch raises
MAX_RECORD_BYTES = 16_384
MAX_ITEMS = 3
MAX_ATTRIBUTES = 2

Headers = tuple[tuple[str, bytes | None], ...]
Input = tuple[bytes | None, bytes | None, Headers]  # key, value, headers


class Unset(enum.Enum):
    """A parameter left at "the usual value" (None is a value here: a null key or body)."""

    UNSET = enum.auto()


UNSET = Unset.UNSET


def record(
    name: str,
    body: dict[str, Any] | bytes | Unset | None = UNSET,
    *,
    cart: str | None = None,
    key: bytes | Unset | None = UNSET,
    api_key: bytes | None = KEY.encode(),
    tag: bytes | None = b"tag-1",
    session: bytes | None = b"session-" + P.encode(),
    content_type: bytes | None = b"application/json",
    extra: Headers = (),
) -> Input:
    """An input record named `name`: eventId `<P>-<name>`, cartId and key `cart` (by default
    also `<P>-<name>`); a dict body gets these ids added unless it sets them itself."""
    cart = cart or f"{P}-{name}"
    if isinstance(body, Unset):
        body = items(f"{P}-{name}-r1")
    if isinstance(body, dict):
        # The standard library writes integers of any size (orjson stops at 64 bits).
        body = json.dumps({"eventId": f"{P}-{name}", "cartId": cart, **body}).encode()
    headers = [
        (n, v)
        for n, v in (
            ("rokt-session-id", session),
            ("rokt-tag-id", tag),
            ("content-type", content_type),
            ("rokt-api-key", api_key),
        )
        if v is not None
    ]
    return (cart.encode() if isinstance(key, Unset) else key), body, (*headers, *extra)


def items(*ids: str) -> dict[str, Any]:
    """An `items` list naming these reservations, as cart items i0, i1, ..."""
    return {"items": [{"cartItemId": f"i{n}", "itemReservationId": i} for n, i in enumerate(ids)]}


@dataclass(frozen=True)
class Case:
    """One row of docs/errors.md, as a record that must earn it."""

    name: str
    status: int
    code: str
    input: tuple[bytes | None, bytes | None, Headers]
    readable: bool = True  # the body's eventId is the identity (else <topic>/<part>/<offset>)
    cart: bool = True  # the body's cartId is valid, so the rejection carries it
    value: Any = UNSET  # the echoed `value`, where the test pins it
    dead_letter: bool = False
    partner: str | None = None  # identified before the rejection: its result names it

    @property
    def event_id(self) -> str:
        return f"{P}-{self.name}"


def unreadable(name: str, code: str, value: bytes | None, **kwargs: Any) -> Case:
    return Case(
        name, 400, code, record(name, value, **kwargs), readable=False, cart=False, dead_letter=True
    )


CASES = [
    unreadable("null_value", "missing_body", None),
    unreadable("empty_value", "missing_body", b""),
    # Far beyond the limit: its dead letter is still the original bytes, and publishable.
    unreadable("too_large", "too_large", orjson.dumps({"cartId": "c" * 200_000})),
    unreadable("content_type", "unsupported_content_type", b"{}", content_type=b"text/plain"),
    unreadable("not_utf8", "invalid_utf8", b'{"cartId": "caf\xe9"}'),
    # A header without a value must survive into the dead letter as well.
    unreadable("broken_json", "invalid_json", b'{"cartId": ', extra=(("x-trace", None),)),
    unreadable("deep_nesting", "invalid_json", b"[" * 5000 + b"]" * 5000),
    unreadable("huge_bare_number", "invalid_json", b"9" * 5000),
    unreadable("byte_order_mark", "invalid_json", b'\xef\xbb\xbf{"cartId": "c"}'),
    # Strict JSON (DESIGN.md §7): a repeated key used to make this a whole-cart release.
    unreadable(
        "repeated_key",
        "invalid_json",
        orjson.dumps({"cartId": f"{P}-repeated_key", **items(f"{P}-x")})[:-1] + b',"items":null}',
    ),
    unreadable("nan", "invalid_json", b'{"cartId": "c", "extra": NaN}'),
    unreadable("array", "not_an_object", b"[1, 2]"),
    unreadable("json_null", "not_an_object", b"null"),
    Case(
        "no_cart_id",
        400,
        "missing_field",
        record("no_cart_id", orjson.dumps({"eventId": f"{P}-no_cart_id"})),
        cart=False,
        value="cartId",
    ),
    Case(
        "long_cart_id",
        400,
        "invalid_length",
        record("long_cart_id", {"cartId": "c" * 129}),
        cart=False,
    ),
    Case(
        "numeric_cart_id",
        400,
        "invalid_type",
        record("numeric_cart_id", {"cartId": 42}),
        cart=False,
    ),
    Case(
        "huge_number",
        400,
        "invalid_type",
        record("huge_number", {"cartId": 10**40}),
        cart=False,
        value=str(10**40),
    ),
    Case("null_item", 400, "invalid_type", record("null_item", {"items": [None]})),
    Case(
        "null_attribute",
        400,
        "invalid_type",
        record("null_attribute", {"attributes": {"a": None}}),
    ),
    Case(
        "bad_timestamp",
        400,
        "invalid_value",
        record("bad_timestamp", {"occurredAt": "yesterday"}),
        value="yesterday",
    ),
    Case(
        "no_session",
        400,
        "missing_header",
        record("no_session", session=None),
        value="rokt-session-id",
    ),
    Case("blank_tag", 400, "missing_header", record("blank_tag", tag=b"  "), value="rokt-tag-id"),
    # Header limits (DESIGN.md §7): the oversized or forged value is not copied to the result.
    Case(
        "long_session",
        400,
        "header_too_large",
        record("long_session", session=b"s" * 65_536),
        value="rokt-session-id",
    ),
    Case(
        "long_language",
        400,
        "header_too_large",
        record("long_language", extra=(("accept-language", b"e" * 1_025),)),
        value="accept-language",
    ),
    Case(
        "forged_tag",
        400,
        "invalid_header",
        record("forged_tag", tag=b"tag-1\r\nrokt-partner: someone"),
        value="rokt-tag-id",
    ),
    Case(
        "many_headers",
        400,
        "headers_too_large",
        record("many_headers", extra=tuple((f"x-h{n}", b"v" * 1_000) for n in range(17))),
    ),
    # Reserved identities: the rejection answers under the record's position instead.
    Case(
        "expiry_event_id",
        400,
        "invalid_value",
        record("expiry_event_id", {"eventId": f"expiry:{P}-r1"}),
        readable=False,
        value=f"expiry:{P}-r1",
    ),
    Case(
        "position_event_id",
        400,
        "invalid_value",
        record("position_event_id", {"eventId": "cart.abandoned/0/1"}),
        readable=False,
        value="cart.abandoned/0/1",
    ),
    Case("empty_items", 400, "empty_items", record("empty_items", {"items": []})),
    Case(
        "attributes",
        400,
        "too_many_attributes",
        record("attributes", {"attributes": {"a": "1", "b": "2", "c": "3"}}),
        value=3,
    ),
    Case("no_key", 401, "missing_api_key", record("no_key", api_key=None)),
    Case("blank_key", 401, "missing_api_key", record("blank_key", api_key=b" ")),
    Case(
        "unknown_key", 401, "unknown_api_key", record("unknown_key", api_key=UNKNOWN_KEY.encode())
    ),
    Case("binary_key", 401, "unknown_api_key", record("binary_key", api_key=b"\xff\xfe\x00")),
    Case(
        "suspended",
        403,
        "partner_suspended",
        record("suspended", api_key=SUSPENDED_KEY.encode()),
        partner=f"{P}-suspended",
    ),
    Case(
        "foreign_tag",
        403,
        "tag_not_allowed",
        record("foreign_tag", tag=b"tag-9"),
        value="tag-9",
        partner=f"{P}-active",
    ),
    Case(
        "too_many_items",
        422,
        "too_many_items",
        record("too_many_items", items(*(f"{P}-many-{n}" for n in range(MAX_ITEMS + 1)))),
        value=MAX_ITEMS + 1,
    ),
    Case(
        "duplicate",
        422,
        "duplicate_item",
        record("duplicate", items(f"{P}-dup", f"{P}-dup")),
        value=f"{P}-dup",
    ),
    Case(
        "empty_cart",
        422,
        "cart_not_found",
        record("empty_cart", {"items": None}),
        partner=f"{P}-active",
    ),
    Case(
        "poison",
        500,
        "internal_error",
        record("poison", items(POISON_RESERVATION), key=f"{P}-poison-cart".encode()),
        dead_letter=True,
        partner=f"{P}-active",
    ),
]
# Accepted records around the rejected ones: a null or empty Kafka key is not an error
# (the body's cartId keys the results), and the poison record's partition moves on.
ACCEPTED = {
    f"{P}-null_key": record("null_key", items(f"{P}-ok-1"), key=None),
    f"{P}-empty_key": record("empty_key", items(f"{P}-ok-2"), key=b""),
    f"{P}-after_poison": record(
        "after_poison", items(f"{P}-ok-3"), key=f"{P}-poison-cart".encode()
    ),
}


@dataclass
class Answered:
    """Everything the worker produced for CASES and ACCEPTED, and what it logged."""

    settings: Settings
    positions: list[tuple[int, int]]
    results: list[Published]
    dead_letters: list[Published]
    logs: list[MutableMapping[str, Any]] = field(default_factory=list)
    stdlib_logs: list[str] = field(default_factory=list)
    metric_deltas: dict[str, float] = field(default_factory=dict)

    def expected_event_id(self, index: int) -> str:
        case = CASES[index]
        if case.readable:
            return case.event_id
        partition, offset = self.positions[index]
        return f"{self.settings.input_topic}/{partition}/{offset}"

    def results_of(self, event_id: str) -> list[Published]:
        return [r for r in self.results if r.body["eventId"] == event_id]


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, entry: logging.LogRecord) -> None:
        self.lines.append(self.format(entry))


async def produce_raw(
    settings: Settings,
    records: Sequence[tuple[bytes | None, bytes | None, Headers]],
    partition: int | None = None,
) -> list[tuple[int, int]]:
    """Produce records exactly as given (null values and null header values included), to
    `partition` if given (else the key's)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, linger_ms=5, max_request_size=4_194_304
    )
    await producer.start()
    try:
        futures = [
            await producer.send(
                settings.input_topic, value, key=key, headers=list(headers), partition=partition
            )
            for key, value, headers in records
        ]
        return [(m.partition, m.offset) for m in await asyncio.gather(*futures)]
    finally:
        await producer.stop()


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


WATCHED_METRICS = {
    "dead_letters": ("release_worker_dead_letters_total", {}),
    "rejected_500": ("release_worker_rejections_total", {"status": "500"}),
    "rejected_400": ("release_worker_rejections_total", {"status": "400"}),
}


@pytest.fixture(scope="module")
async def answered(servers: Servers, db: asyncpg.Pool) -> Answered:
    await add_partner(db, f"{P}-active", "Active", ["tag-1"], api_key=KEY)
    await add_partner(db, f"{P}-suspended", "Suspended", api_key=SUSPENDED_KEY, status="suspended")
    await db.execute("INSERT INTO stock (sku, on_hand, reserved) VALUES ($1, 100, 3)", SKU)
    await db.executemany(
        """
        INSERT INTO reservations (reservation_id, partner_id, cart_id, cart_item_id, sku,
                                  quantity, status, expires_at)
        VALUES ($1, $2, $3, $4, $5, 1, $6, now() + interval '1 hour')
        """,
        [
            (POISON_RESERVATION, f"{P}-active", f"{P}-poison", "i0", SKU, "mystery"),
            (f"{P}-ok-1", f"{P}-active", f"{P}-null_key", "i0", SKU, "reserved"),
            (f"{P}-ok-2", f"{P}-active", f"{P}-empty_key", "i0", SKU, "reserved"),
            (f"{P}-ok-3", f"{P}-active", f"{P}-after_poison", "i0", SKU, "reserved"),
        ],
    )
    settings = isolated_settings(
        servers.worker_database_url,
        servers.bootstrap,
        max_record_bytes=MAX_RECORD_BYTES,
        max_items=MAX_ITEMS,
        max_attributes=MAX_ATTRIBUTES,
    )
    before = {k: metric(n, **labels) for k, (n, labels) in WATCHED_METRICS.items()}
    handler = _ListHandler()
    logging.getLogger().addHandler(handler)
    rejected = {c.event_id for c in CASES if c.readable}
    try:
        with capture_logs() as logs:
            async with running_worker(settings):
                positions = await produce_raw(
                    settings, [c.input for c in CASES] + list(ACCEPTED.values())
                )
                unreadable_ids = {
                    f"{settings.input_topic}/{p}/{o}"
                    for (p, o), c in zip(positions, CASES, strict=False)
                    if not c.readable
                }
                wanted = rejected | unreadable_ids | set(ACCEPTED)
                results = await read_topic(
                    servers.bootstrap,
                    settings.results_topic,
                    lambda seen: wanted <= {r.body["eventId"] for r in seen},
                )
                dead_letters = await read_topic(
                    servers.bootstrap,
                    settings.dlq_topic,
                    lambda seen: len(seen) >= sum(c.dead_letter for c in CASES),
                )
    finally:
        logging.getLogger().removeHandler(handler)
    deltas = {k: metric(n, **labels) - before[k] for k, (n, labels) in WATCHED_METRICS.items()}
    return Answered(settings, positions, results, dead_letters, logs, handler.lines, deltas)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c.name for c in CASES])
async def test_each_cause_gets_one_rejection_with_its_status_and_code(
    answered: Answered, index: int
) -> None:
    case = CASES[index]
    event_id = answered.expected_event_id(index)
    results = answered.results_of(event_id)
    assert len(results) == 1, f"{case.name}: expected one answer, got {len(results)}"
    result, body = results[0], results[0].body
    assert body["type"] == "event_rejected"
    assert (body["status"], body["errors"][0]["code"]) == (case.status, case.code)
    assert body["description"] == DESCRIPTIONS[case.status]
    assert len(body["errors"]) == 1
    assert len(body["errors"][0]["message"]) > 10
    if case.value is not UNSET:
        assert body["errors"][0]["value"] == case.value
    key, _, headers = case.input
    cart_id = f"{P}-{case.name}" if case.cart else None
    assert body["cartId"] == cart_id
    # Keyed by cartId once the partner is known, else by the record's own key (finding 5).
    assert result.key == (cart_id.encode() if cart_id and case.partner else key)
    sent = dict(headers)
    copied = {
        n: v
        for n, v in sent.items()
        if n in ("rokt-session-id", "rokt-tag-id") and v and len(v) <= 1_024 and b"\r" not in v
    }
    partner = {"partner-id": case.partner.encode()} if case.partner else {}
    assert result.headers == {"event-id": event_id.encode(), **partner, **copied}


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c.name for c in CASES])
async def test_dead_letters_carry_the_original_bytes_and_the_dlq_headers(
    answered: Answered, index: int
) -> None:
    case = CASES[index]
    partition, offset = answered.positions[index]
    letters = [
        d
        for d in answered.dead_letters
        if d.headers.get("dlq-source-partition") == str(partition).encode()
        and d.headers.get("dlq-source-offset") == str(offset).encode()
    ]
    assert len(letters) == (1 if case.dead_letter else 0)
    if not case.dead_letter:
        return
    letter = letters[0]
    key, value, headers = case.input
    assert (letter.key, letter.value) == (key, value)
    message = answered.results_of(answered.expected_event_id(index))[0].body["errors"][0]
    assert letter.headers == {
        **{n: v for n, v in headers if n != "rokt-api-key"},
        "dlq-status": str(case.status).encode(),
        "dlq-code": case.code.encode(),
        "dlq-error": message["message"].encode(),
        "dlq-source-topic": answered.settings.input_topic.encode(),
        "dlq-source-partition": str(partition).encode(),
        "dlq-source-offset": str(offset).encode(),
        "dlq-attempts": b"5" if case.status == 500 else b"1",  # poison_max_attempts default
        # An authenticated record's dead letter names its partner (dlq redrive acts as it).
        **({"dlq-partner-id": (case.partner or "").encode()} if case.status == 500 else {}),
    }


async def test_null_or_empty_keys_are_accepted_and_the_poisoned_partition_moves_on(
    answered: Answered, db: asyncpg.Pool
) -> None:
    for event_id in ACCEPTED:
        (result,) = answered.results_of(event_id)
        assert (result.body["type"], result.body["outcome"]) == ("item_result", "released")
        assert result.key == event_id.encode()  # the body's cartId, whatever the input key
    poison = next(i for i, c in enumerate(CASES) if c.code == "internal_error")
    after = len(CASES) + list(ACCEPTED).index(f"{P}-after_poison")
    (poison_partition, poison_offset) = answered.positions[poison]
    assert answered.positions[after][0] == poison_partition  # same key, same partition
    assert answered.positions[after][1] > poison_offset
    rows = await db.fetch(
        "SELECT reservation_id, status FROM reservations WHERE sku = $1 ORDER BY 1", SKU
    )
    assert {r[0]: r[1] for r in rows} == {
        POISON_RESERVATION: "mystery",
        f"{P}-ok-1": "released",
        f"{P}-ok-2": "released",
        f"{P}-ok-3": "released",
    }
    assert await db.fetchval("SELECT reserved FROM stock WHERE sku = $1", SKU) == 0


async def test_rejections_are_counted_in_metrics(answered: Answered) -> None:
    assert answered.metric_deltas["dead_letters"] == sum(c.dead_letter for c in CASES)
    assert answered.metric_deltas["rejected_500"] == 1
    assert answered.metric_deltas["rejected_400"] == sum(c.status == 400 for c in CASES)


async def test_no_api_key_appears_in_results_dead_letters_logs_or_metrics(
    answered: Answered,
) -> None:
    outputs: list[bytes] = []
    for published in (*answered.results, *answered.dead_letters):
        outputs.append(published.value or b"")
        outputs.extend(n.encode() + b"=" + v for n, v in published.headers.items() if v)
    outputs.extend(repr(entry).encode() for entry in answered.logs)
    outputs.extend(line.encode() for line in answered.stdlib_logs)
    outputs.append(generate_latest(REGISTRY))
    assert answered.logs, "the worker's logs were not captured"
    assert any(e["event"] == "record_dead_lettered" for e in answered.logs)
    for secret in SECRETS:
        assert not [o for o in outputs if secret.encode() in o], f"{secret} leaked"
    assert not any(
        "rokt-api-key" in published.headers
        for published in (*answered.results, *answered.dead_letters)
    )


async def test_a_persisting_statement_timeout_becomes_504_and_the_partition_moves_on(
    db: asyncpg.Pool, world: World, servers: Servers
) -> None:
    """A statement slow on its own work (here a trigger that sleeps) times out on every
    attempt on one record. (A row lock held elsewhere is a lock wait instead, retried
    until the lock is free: tests/integration/test_busy_rows.py.)"""
    p = world.prefix
    await reserve(db, world, f"{p}-locked", f"{p}-c", "i0", 2)
    await reserve(db, world, f"{p}-free", f"{p}-c", "i0", 3)
    settings = world.settings.model_copy(
        update={"statement_timeout_ms": 300, "lock_timeout_ms": 100, "poison_max_attempts": 2}
    )
    api_key = world.api_key.encode()
    stuck = record("stuck", items(f"{p}-locked"), cart=f"{p}-c", api_key=api_key)
    after = record("after", items(f"{p}-free"), cart=f"{p}-c", api_key=api_key)
    slow = f"slow_{p}"
    await db.execute(
        f"""
        CREATE FUNCTION {slow}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.reservation_id = '{p}-locked' THEN PERFORM pg_sleep(1); END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER {slow} BEFORE UPDATE ON reservations
            FOR EACH ROW EXECUTE FUNCTION {slow}();
        """
    )
    try:
        async with running_worker(settings):
            (position, after_position) = await produce_raw(settings, [stuck, after])
            results = await read_topic(
                servers.bootstrap,
                settings.results_topic,
                lambda seen: {f"{P}-stuck", f"{P}-after"} <= {r.body["eventId"] for r in seen},
            )
            letters = await read_topic(
                servers.bootstrap, settings.dlq_topic, lambda seen: len(seen) >= 1
            )
    finally:
        await db.execute(f"DROP TRIGGER {slow} ON reservations; DROP FUNCTION {slow}();")
    by_event = {r.body["eventId"]: r.body for r in results}
    rejected = by_event[f"{P}-stuck"]
    assert (rejected["status"], rejected["errors"][0]["code"]) == (504, "database_timeout")
    assert rejected["description"] == DESCRIPTIONS[504]
    assert (by_event[f"{P}-after"]["outcome"], after_position[1]) == ("released", position[1] + 1)
    (letter,) = letters
    assert (letter.key, letter.value) == (stuck[0], stuck[1])
    assert letter.headers["dlq-status"] == b"504"
    assert letter.headers["dlq-code"] == b"database_timeout"
    assert letter.headers["dlq-attempts"] == b"2"
    assert "rokt-api-key" not in letter.headers
    statuses = await db.fetch(
        "SELECT reservation_id, status FROM reservations WHERE cart_id = $1", f"{p}-c"
    )
    assert {r[0]: r[1] for r in statuses} == {f"{p}-locked": "reserved", f"{p}-free": "released"}
    assert await i1_violations(db) == 0


async def test_a_suspension_takes_effect_once_the_auth_cache_ttl_has_passed(
    db: asyncpg.Pool, world: World, servers: Servers
) -> None:
    p, ttl = world.prefix, 1.0
    await reserve(db, world, f"{p}-r1", f"{p}-c", "i0", 1)
    await reserve(db, world, f"{p}-r2", f"{p}-c", "i1", 1)
    settings = world.settings.model_copy(update={"auth_cache_ttl_s": ttl})
    api_key = world.api_key.encode()
    before = record("before", items(f"{p}-r1"), cart=f"{p}-c", api_key=api_key)
    after = record(
        "after",
        {"items": [{"cartItemId": "i1", "itemReservationId": f"{p}-r2"}]},
        cart=f"{p}-c",
        api_key=api_key,
    )
    async with running_worker(settings):
        await produce_raw(settings, [before])
        await read_topic(servers.bootstrap, settings.results_topic, lambda seen: len(seen) >= 1)
        await db.execute(
            "UPDATE partners SET status = 'suspended' WHERE partner_id = $1", world.partner_id
        )
        # The documented bound: the cached "active" may be used until the TTL has passed.
        await asyncio.sleep(ttl)
        await produce_raw(settings, [after])
        results = await read_topic(
            servers.bootstrap, settings.results_topic, lambda seen: len(seen) >= 2
        )
    by_event = {r.body["eventId"]: r.body for r in results}
    assert by_event[f"{P}-before"]["outcome"] == "released"
    refused = by_event[f"{P}-after"]
    assert (refused["status"], refused["errors"][0]["code"]) == (403, "partner_suspended")
    assert (
        await db.fetchval("SELECT status FROM reservations WHERE reservation_id = $1", f"{p}-r2")
        == "reserved"
    )


def test_the_documented_table_is_exactly_what_these_tests_produce() -> None:
    """docs/errors.md lists every (status, code) the tests above produce, and no other."""
    table = (Path(__file__).parents[2] / "docs" / "errors.md").read_text()
    documented = {(int(s), c) for s, c in re.findall(r"^\| (\d{3}) \| `([a-z0-9_]+)`", table, re.M)}
    # Two codes come from tests of their own; each must assert exactly that (status, code).
    timeout = test_a_persisting_statement_timeout_becomes_504_and_the_partition_moves_on
    unreadable = test_a_header_name_that_is_not_utf8_does_not_stop_the_worker
    elsewhere: dict[tuple[int, str], Callable[..., Any]] = {
        (504, "database_timeout"): timeout,
        (400, "unreadable_record"): unreadable,
    }
    for (status, code), test in elsewhere.items():
        assertion = f'errors"][0]["code"]) == ({status}, "{code}")'
        assert assertion in inspect.getsource(test), f"{test.__name__} does not assert {code}"
    produced = {(c.status, c.code) for c in CASES} | set(elsewhere)
    assert documented == produced


async def test_a_header_name_that_is_not_utf8_does_not_stop_the_worker(
    world: World, servers: Servers
) -> None:
    after = record("after_bad_header", {"items": None}, api_key=world.api_key.encode())
    async with running_worker(world.settings):
        bad_record = {"key": "c", "value": '{"cartId": "c"}', "headers": [], "bad": True}
        await produce_in_one_batch(servers.bootstrap, world.settings.input_topic, [bad_record])
        await produce_raw(world.settings, [after])
        # Both answers, whichever comes first: the two records are on different partitions
        # (and lanes), so the unreadable one's rejection may follow the other's result.
        results = await read_topic(
            servers.bootstrap,
            world.settings.results_topic,
            lambda seen: (
                len(seen) >= 2 and f"{P}-after_bad_header" in {r.body["eventId"] for r in seen}
            ),
            timeout_s=10,
        )
        dead = await read_topic(
            servers.bootstrap, world.settings.dlq_topic, lambda seen: len(seen) >= 1, timeout_s=10
        )
    assert f"{P}-after_bad_header" in {r.body["eventId"] for r in results}
    [bad] = [r.body for r in results if r.body["eventId"] != f"{P}-after_bad_header"]
    assert (bad["status"], bad["errors"][0]["code"]) == (400, "unreadable_record")
    source = dead[0].headers
    position = [source[f"dlq-source-{n}"].decode() for n in ("topic", "partition", "offset")]
    assert bad["eventId"] == "/".join(position)
    assert dead[0].headers["dlq-code"] == b"unreadable_record"


# --- a long stream of mixed records ---------------------------------------------------

MALFORMED: tuple[tuple[str, Any], ...] = (
    ("broken_json", b'{"cartId": "x", '),
    ("not_utf8", b'{"cartId": "\xff"}'),
    ("array", b"[]"),
    ("missing_cart", {"cartId": None}),
    ("null_item", {"items": [None]}),
    ("duplicate", "duplicate"),
    ("too_many", "too_many"),
    ("unknown_key", "unknown_key"),
    ("no_session", "no_session"),
    ("empty_cart", {"items": None}),
)


def _malformed(name: str, kind: Any, api_key: bytes, rng: random.Random) -> Input:
    key = rng.choice([None, b"", f"{P}-{name}".encode()])
    if kind == "duplicate":
        return record(name, items("x", "x"), key=key, api_key=api_key)
    if kind == "too_many":
        return record(name, items(*(f"m{n}" for n in range(101))), key=key, api_key=api_key)
    if kind == "unknown_key":
        return record(name, key=key, api_key=UNKNOWN_KEY.encode())
    if kind == "no_session":
        return record(name, key=key, session=None, api_key=api_key)
    return record(name, kind, key=key, api_key=api_key)


async def test_a_stream_of_1000_mixed_records_is_answered_record_by_record(
    db: asyncpg.Pool, world: World, servers: Servers
) -> None:
    """Valid releases, replays and malformed records interleaved: each gets its answer,
    each reservation is released exactly once, and the worker stays ready."""
    p = world.prefix
    carts = 200
    for c in range(carts):
        await reserve(db, world, f"{p}-s{c}-a", f"{p}-s{c}", "a", 1)
        await reserve(db, world, f"{p}-s{c}-b", f"{p}-s{c}", "b", 2)
    key = world.api_key.encode()
    rng = random.Random(4)
    per_cart: list[list[Input]] = []
    expected: dict[str, int] = {}  # eventId -> how many results it must get
    for c in range(carts):
        cart = f"{p}-s{c}"
        first = record(
            f"s{c}-e1",
            {"items": [{"cartItemId": "a", "itemReservationId": f"{cart}-a"}]},
            cart=cart,
            api_key=key,
        )
        whole = record(f"s{c}-all", {"items": None}, cart=cart, api_key=key)
        per_cart.append([first, first, whole])  # the second is a replay
        expected[f"{P}-s{c}-e1"] = 2
        expected[f"{P}-s{c}-all"] = 2  # a: already_released, b: released
    malformed = [
        _malformed(f"bad{n}-{name}", kind, key, rng)
        for n in range(400)
        for name, kind in [MALFORMED[n % len(MALFORMED)]]
    ]
    stream = _interleave(per_cart, malformed, rng)
    assert len(stream) >= 1000
    port = free_port()
    settings = world.settings.model_copy(update={"metrics_port": port})
    async with running_worker(settings):
        positions = await produce_raw(settings, stream)
        for (partition, offset), (_, value, _) in zip(positions, stream, strict=True):
            event_id = _stream_event_id(value) or f"{settings.input_topic}/{partition}/{offset}"
            expected.setdefault(event_id, 1)  # a malformed record: one rejection
        total = sum(expected.values())
        results = await read_topic(
            servers.bootstrap,
            settings.results_topic,
            lambda seen: len(seen) >= total,
            timeout_s=120,
        )
        alive = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/healthz")
        ready = await _eventually_ready(f"http://127.0.0.1:{port}/readyz")
    assert alive == (200, "alive\n")
    assert ready == (200, "ready\n")
    got: dict[str, int] = {}
    for r in results:
        got[r.body["eventId"]] = got.get(r.body["eventId"], 0) + 1
    assert got == expected
    # A replay repeats its first result byte for byte, so "released" is counted per event.
    released = {
        (r.body["eventId"], r.body["itemReservationId"])
        for r in results
        if r.body.get("outcome") == "released"
    }
    assert sorted(rid for _, rid in released) == sorted(
        f"{p}-s{c}-{i}" for c in range(carts) for i in "ab"
    )
    rows = await db.fetch(
        "SELECT reservation_id, status, release_event_id FROM reservations WHERE cart_id LIKE $1",
        f"{p}-s%",
    )
    assert {r[0]: (r[1], r[2]) for r in rows} == {
        f"{p}-s{c}-{i}": ("released", f"{P}-s{c}-{'e1' if i == 'a' else 'all'}")
        for c in range(carts)
        for i in "ab"
    }
    assert await db.fetchval("SELECT reserved FROM stock WHERE sku = $1", world.sku) == 0
    assert await i1_violations(db) == 0


def _stream_event_id(value: bytes | None) -> str | None:
    """The eventId a malformed record is answered under, when its body names one."""
    try:
        body = orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        return None
    event_id = body.get("eventId") if isinstance(body, dict) else None
    return event_id if isinstance(event_id, str) else None


def _interleave(groups: Iterable[list[Any]], singles: list[Any], rng: random.Random) -> list[Any]:
    """Shuffle, keeping each group's records in their order."""
    queues = [list(g) for g in groups] + [[s] for s in singles]
    stream: list[Any] = []
    while queues:
        queue = rng.choice(queues)
        stream.append(queue.pop(0))
        if not queue:
            queues.remove(queue)
    return stream


async def _eventually_ready(url: str, attempts: int = 60) -> tuple[int, str]:
    """/readyz, polled: it is honestly "not ready" while the group rebalances."""
    for _ in range(attempts):
        answer = await asyncio.to_thread(_get, url)
        if answer[0] == 200:
            return answer
        await asyncio.sleep(0.5)
    return answer


def _get(url: str) -> tuple[int, str]:
    try:
        with urlopen(url, timeout=5) as response:  # noqa: S310 (a fixed local URL)
            return response.status, response.read().decode()
    except HTTPError as error:
        return error.code, error.read().decode()
