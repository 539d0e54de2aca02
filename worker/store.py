"""All SQL of the worker (asyncpg), nothing else.

Statements are set-based: one statement per step for a whole batch, arrays in,
rows out. Locks are taken in one order everywhere: consumer_offsets by
partition, reservations by reservation_id, stock by (sku, location_id).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from itertools import accumulate
from typing import TypeAlias

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy

from worker.auth import Partner
from worker.errors import SchemaNotReady
from worker.records import Headers, OutboxMessage
from worker.release import EventKey, InboxEntry, Reservation, StoredResults, TopicPartition
from worker.retry import closed_connection_is_transient

# The newest migration this code needs; `run` refuses an older schema.
SCHEMA_VERSION = "20261203200000"

# A connection, from a pool or not; `Db` also admits the pool itself (one-statement calls).
Conn: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"
Db: TypeAlias = "Conn | asyncpg.Pool[asyncpg.Record]"

_RESERVATION_COLUMNS = (
    "reservation_id, partner_id, cart_id, cart_item_id, sku, location_id, quantity, status, "
    "release_event_id"
)
_R_COLUMNS = ", ".join("r." + c for c in _RESERVATION_COLUMNS.split(", "))  # alias `r`

# A partition's published watermark as this process knows it (acknowledged up to, or
# None: nothing to claim); folded into the UPDATE that advances its next offset.
PublishedMark = Callable[[TopicPartition], int | None]


def _reservations(rows: Iterable[Iterable[object]]) -> list[Reservation]:
    """Rows of `_RESERVATION_COLUMNS` (the fields, in order) as `Reservation`s, each made
    by `tuple.__new__` straight from the row: one is made per item, and the named tuple's
    own __new__ is a Python function (a frame per call)."""
    new = tuple.__new__
    return [new(Reservation, row) for row in rows]


def _column(values: list[str] | list[int]) -> str:
    """A batch's column as one JSON array, read back by `json_array_elements_text` in SQL.

    asyncpg checks each element of a `text[]` or `int[]` argument against the
    `collections.abc` Iterable and Sized ABCs (a Python-level `__instancecheck__` each,
    about 2,000 instructions per element: more than the rest of its encoding); one JSON
    text is encoded by orjson in C and checked once."""
    return orjson.dumps(values).decode()


def _col(n: int) -> str:
    """SQL for the set of `$n`, a column sent by `_column`. Through an array, not straight
    from `json_array_elements_text`: the planner estimates the unnest of an array it cannot
    see at 10 rows, as it did the `text[]` parameters, where it takes any set-returning
    function at 100 and so hash-joined small batches (2-3 times the CPU per item of
    PostgreSQL at 15 records a batch: docs/benchmark.md, issue 13 step 7)."""
    return f"unnest(ARRAY(SELECT json_array_elements_text(${n}::json)))"


# The statements are made once: asyncpg finds its prepared statement by the text, and a
# text made anew each call is formatted and hashed anew (every batch, whatever its size).
_STORED_RESULTS = f"""
    SELECT i.partner_id, i.event_id, i.cart_id, i.results, i.result_headers FROM inbox i
    JOIN ROWS FROM ({_col(1)},
                    {_col(2)}) AS u(p, e)
      ON i.partner_id = u.p AND i.event_id = u.e
    """
_FIND_RESERVATIONS = f"""
    SELECT DISTINCT ON (r.reservation_id) *
      FROM (SELECT {_R_COLUMNS} FROM reservations r
              JOIN ROWS FROM ({_col(1)},
                              {_col(2)}) AS u(id, partner)
                ON r.reservation_id = u.id AND r.partner_id = u.partner
            UNION ALL
            SELECT {_R_COLUMNS} FROM reservations r
              JOIN ROWS FROM ({_col(3)},
                              {_col(4)}) AS u(partner, cart)
                ON r.partner_id = u.partner AND r.cart_id = u.cart) AS r
     ORDER BY r.reservation_id
    """
_FOREIGN_RESERVATIONS = f"""
    SELECT r.reservation_id FROM reservations r
    JOIN ROWS FROM ({_col(1)},
                    {_col(2)}) AS u(id, partner)
      ON r.reservation_id = u.id AND r.partner_id <> u.partner
    """


class PgTransactions:
    """`release.Transactions` on a pool: each `begin` takes a connection and a transaction."""

    def __init__(
        self, pool: asyncpg.Pool, group_id: str, published: PublishedMark | None = None
    ) -> None:
        self._pool = pool
        self._group_id = group_id
        self._published = published

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[PgReleaseStore]:
        async with self._pool.acquire() as conn:
            with closed_connection_is_transient(conn):
                async with conn.transaction():
                    yield PgReleaseStore(conn, self._group_id, self._published)


class PgReleaseStore:
    """`release.ReleaseStore` on one connection, inside the caller's transaction."""

    def __init__(self, conn: Conn, group_id: str, published: PublishedMark | None = None) -> None:
        self._conn = conn
        self._group_id = group_id
        self._published = published
        # A record's results share one headers tuple, written to the inbox and the outbox:
        # encoded once for both.
        self._encoded: dict[Headers, bytes] = {}

    def _encode(self, headers: Headers) -> bytes:
        encoded = self._encoded.get(headers)
        if encoded is None:
            encoded = self._encoded[headers] = encode_headers(headers)
        return encoded

    async def lock_offsets(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        topics = [t for t, _ in partitions]
        numbers = [p for _, p in partitions]
        lock = """
            SELECT c.topic, c.partition, c.next_offset FROM consumer_offsets c
            JOIN unnest($2::text[], $3::int[]) AS u(t, p) ON c.topic = u.t AND c.partition = u.p
            WHERE c.group_id = $1
            ORDER BY c.topic, c.partition
            FOR UPDATE OF c
            """
        rows = await self._conn.fetch(lock, self._group_id, topics, numbers)
        if len(rows) < len(partitions):
            # A partition's first batch in this group: create its row, then lock them all
            # (so every worker queues on the same row lock). Once per partition, ever; the
            # batches after it lock their rows in one statement.
            await self._conn.execute(
                """
                INSERT INTO consumer_offsets (group_id, topic, partition)
                SELECT $1, t, p FROM unnest($2::text[], $3::int[]) AS u(t, p)
                ON CONFLICT DO NOTHING
                """,
                self._group_id,
                topics,
                numbers,
            )
            rows = await self._conn.fetch(lock, self._group_id, topics, numbers)
        return {(r[0], r[1]): r[2] for r in rows if r[2] is not None}

    async def stored_results(self, keys: Sequence[EventKey]) -> dict[EventKey, StoredResults]:
        rows = await self._conn.fetch(
            _STORED_RESULTS,
            _column([k[0] for k in keys]),
            _column([k[1] for k in keys]),
        )
        return {
            (r[0], r[1]): StoredResults(
                r[2], None if r[3] is None else list(r[3]), r[4] and decode_headers(r[4])
            )
            for r in rows
        }

    async def find_reservations(
        self, explicit: Sequence[tuple[str, str]], carts: Sequence[tuple[str, str]]
    ) -> list[Reservation]:
        # Two index lookups (primary key; partner and cart) joined to the batch's ids. An OR
        # of both conditions in one WHERE made PostgreSQL scan the whole table instead.
        # No lock: `release` claims the rows it moves (a FOR UPDATE here cost a second write
        # of every row, its lock, WAL included).
        # Each branch reads its rows whole; a row named by both (an item and its cart) comes
        # twice and is kept once (joining the ids back to the table read each row twice).
        rows = await self._conn.fetch(
            _FIND_RESERVATIONS,
            _column([e[0] for e in explicit]),
            _column([e[1] for e in explicit]),
            _column([c[0] for c in carts]),
            _column([c[1] for c in carts]),
        )
        return _reservations(rows)

    async def foreign_reservations(self, explicit: Sequence[tuple[str, str]]) -> set[str]:
        rows = await self._conn.fetch(
            _FOREIGN_RESERVATIONS,
            _column([e[0] for e in explicit]),
            _column([e[1] for e in explicit]),
        )
        return {r[0] for r in rows}

    async def release(self, releases: Sequence[tuple[str, str, str]]) -> list[tuple[str, str, int]]:
        rows = await self._conn.fetch(
            _RELEASE,
            _column([r[0] for r in releases]),
            _column([r[1] for r in releases]),
            _column([r[2] for r in releases]),
        )
        return [(r[0], r[1], r[2]) for r in rows]

    async def return_stock(self, deltas: Sequence[tuple[str, str, int]]) -> None:
        await self._conn.execute(
            _RETURN_STOCK,
            _column([d[0] for d in deltas]),
            _column([d[1] for d in deltas]),
            _column([d[2] for d in deltas]),
        )

    async def record_inbox(
        self, entries: Sequence[InboxEntry], next_offsets: dict[TopicPartition, int]
    ) -> set[EventKey]:
        # bytea[] per row does not fit unnest (it would flatten), so all results travel in
        # one flat bytea[] with the number of the entry each belongs to, and are grouped
        # back per entry by that number alone (slicing the array per row would copy it every
        # time; grouping by every column compared the headers' bytes too).
        # A plain INSERT, not ON CONFLICT DO NOTHING: a key taken by a concurrent
        # transaction fails it either way (a replay found no row when the batch read the
        # inbox), and speculative insertion costs an index probe and a WAL record per row.
        # The offsets' UPDATE rides along as a data-modifying CTE (always run to completion,
        # and the statement fails or succeeds as one): its rows are locked since
        # `lock_offsets`, so it waits for nothing and reads them as this transaction left
        # them, and what it sets does not depend on the inbox's rows.
        # The results go as one bytea, each a substring of it (1-based start, length):
        # asyncpg checks each element of a `bytea[]` against two `collections.abc` ABCs
        # (a Python-level `__instancecheck__` each, ~4,000 instructions an item).
        payloads: list[bytes] = []
        owners: list[int] = []
        for n, e in enumerate(entries, start=1):
            payloads.extend(e.results)
            owners.extend([n] * len(e.results))
        lengths = [len(p) for p in payloads]
        starts = list(accumulate(lengths, initial=1))
        starts.pop()
        try:
            await self._conn.execute(
                _RECORD_INBOX,
                _column([e.partner_id for e in entries]),
                _column([e.event_id for e in entries]),
                _column([e.cart_id for e in entries]),
                _column([e.record.topic for e in entries]),
                _column([e.record.partition for e in entries]),
                _column([e.record.offset for e in entries]),
                b"".join(payloads),
                _column(owners),
                [self._encode(e.headers) for e in entries],
                _column(starts),
                _column(lengths),
                *self._advance_arguments(next_offsets),
            )
        except asyncpg.UniqueViolationError:
            return set()  # the transaction is aborted; `apply_batch` retries the batch
        return {(e.partner_id, e.event_id) for e in entries}

    async def enqueue(self, messages: Sequence[OutboxMessage]) -> list[OutboxMessage]:
        return await enqueue(self._conn, messages, self._encoded)

    async def advance_offsets(self, next_offsets: dict[TopicPartition, int]) -> None:
        await self._conn.execute(_ADVANCE_OFFSETS, *self._advance_arguments(next_offsets))

    def _advance_arguments(
        self, next_offsets: dict[TopicPartition, int]
    ) -> tuple[str, list[str], list[int], list[int], list[int | None]]:
        items = sorted(next_offsets.items())
        published = self._published
        return (
            self._group_id,
            [tp[0] for tp, _ in items],
            [tp[1] for tp, _ in items],
            [n for _, n in items],
            [None if published is None else published(tp) for tp, _ in items],
        )


def _stock_returned(deltas: str) -> str:
    """The CTEs `locked` and `returned`: stock's `reserved` less `qty` for each row of the
    FROM item `deltas` (alias `d`: sku, location_id, qty, one row per stock row), for the
    statement that follows them. `locked` locks the rows in (sku, location_id) order (its
    LockRows runs above the sort; the UPDATE's own join order is not guaranteed), then
    `returned` changes only rows already locked; unreferenced, it still runs to completion
    at the end of the statement. FOR NO KEY UPDATE, the lock an UPDATE of a non-key column
    takes anyway: it does not block the checkout's foreign-key checks (FOR KEY SHARE) on a
    hot SKU while the transaction runs."""
    return f"""locked AS (
        SELECT s.sku, s.location_id, d.qty::bigint AS qty FROM stock s
          JOIN {deltas}
            ON s.sku = d.sku AND s.location_id = d.location_id
         ORDER BY s.sku, s.location_id
         FOR NO KEY UPDATE OF s
    ), returned AS (
        UPDATE stock s SET reserved = s.reserved - l.qty
          FROM locked l
         WHERE s.sku = l.sku AND s.location_id = l.location_id
    )"""


# `return_stock` (expiry): the deltas as given, one statement.
_GIVEN_DELTAS = f"ROWS FROM ({_col(1)}, {_col(2)}, {_col(3)}) AS d(sku, location_id, qty)"
_RETURN_STOCK = f"""
    WITH {_stock_returned(_GIVEN_DELTAS)}
    SELECT 1
    """
_MOVED_DELTAS = (
    "(SELECT sku, location_id, sum(quantity) AS qty FROM moved GROUP BY sku, location_id) AS d"
)
# The claim: conditional on `reserved`, so a row confirmed, expired or released since it
# was read is left alone (and missing from the answer). The ids come sorted and drive a
# nested loop over the primary key, so rows are locked in id order; should a plan ever
# differ and two batches deadlock, PostgreSQL detects it and the batch is retried. Scoped by
# partner too: the statement itself cannot touch another partner's reservation.
# The moved rows' quantities go back to stock in the same statement (a round trip less), as
# `return_stock` does: the deltas aggregate `moved`, and `locked` sorts them before it
# locks, so every reservation is claimed before the first stock row is locked, and stock
# rows are locked in (sku, location_id) order: the lock order holds. What goes back is
# what the claim moved; `apply_batch` checks it against its plan and otherwise raises,
# which rolls it back with the claim.
_RELEASE = f"""
    WITH moved AS (
        UPDATE reservations r
           SET status = 'released', released_at = now(), release_event_id = u.event_id
          FROM ROWS FROM ({_col(1)},
                          {_col(2)},
                          {_col(3)}) AS u(id, partner_id, event_id)
         WHERE r.reservation_id = u.id AND r.partner_id = u.partner_id
           AND r.status = 'reserved'
        RETURNING r.sku, r.location_id, r.quantity
    ), {_stock_returned(_MOVED_DELTAS)}
    SELECT sku, location_id, quantity FROM moved
    """


def _advance_offsets(first: int) -> str:
    """The offsets' UPDATE, its parameters (`_advance_arguments`) numbered from `first`.
    The published watermark rides along (NULL: nothing new to claim; GREATEST ignores
    NULLs): a claim is a full prefix, so the greater of two true claims is true."""
    g, t, p, n, w = range(first, first + 5)
    return f"""
        UPDATE consumer_offsets c
           SET next_offset = GREATEST(COALESCE(c.next_offset, 0), u.n),
               published_offset = GREATEST(c.published_offset, u.w), updated_at = now()
          FROM unnest(${t}::text[], ${p}::int[], ${n}::bigint[], ${w}::bigint[]) AS u(t, p, n, w)
         WHERE c.group_id = ${g} AND c.topic = u.t AND c.partition = u.p
        """


_ADVANCE_OFFSETS = _advance_offsets(1)
# The inbox INSERT with the offsets' UPDATE (parameters 12-16) as a data-modifying CTE.
_RECORD_INBOX = f"""
    WITH advanced AS ({_advance_offsets(12)})
    INSERT INTO inbox (partner_id, event_id, cart_id, source_topic, source_partition,
                       source_offset, results, result_headers)
    SELECT u.p, u.e, u.c, u.t, u.part::int, u.o::bigint, coalesce(f.results, '{{}}'), u.h
      FROM ROWS FROM ({_col(1)},
                      {_col(2)},
                      {_col(3)},
                      {_col(4)},
                      {_col(5)},
                      {_col(6)},
                      unnest($9::bytea[]))
           WITH ORDINALITY AS u(p, e, c, t, part, o, h, n)
      LEFT JOIN (SELECT f.owner::bigint AS owner,
                        array_agg(substring($7::bytea FROM f.s::int FOR f.l::int) ORDER BY f.i)
                        AS results
                   FROM ROWS FROM ({_col(8)},
                                   {_col(10)},
                                   {_col(11)})
                        WITH ORDINALITY AS f(owner, s, l, i)
                  GROUP BY f.owner::bigint) AS f
        ON f.owner = u.n
     ORDER BY u.n
    """


def encode_headers(headers: Headers, _b64: Callable[..., bytes] = binascii.b2a_base64) -> bytes:
    # binascii's base64 without a newline is what `base64.b64encode` returns, without its
    # Python-level call (one per header of every record).
    return orjson.dumps(
        [[n, None if v is None else _b64(v, newline=False).decode()] for n, v in headers]
    )


def decode_headers(raw: bytes) -> Headers:
    return tuple((n, None if v is None else base64.b64decode(v)) for n, v in orjson.loads(raw))


async def enqueue(
    conn: Conn, messages: Sequence[OutboxMessage], encoded: dict[Headers, bytes] | None = None
) -> list[OutboxMessage]:
    """Write messages to the outbox in order; return them carrying their ids. `encoded`:
    headers already encoded (and where to keep those encoded here)."""
    # The items of one record share one headers tuple: encode it once.
    encoded = {} if encoded is None else encoded
    headers = []
    for m in messages:
        raw = encoded.get(m.headers)
        if raw is None:
            raw = encoded[m.headers] = encode_headers(m.headers)
        headers.append(raw)
    ids = await conn.fetch(
        """
        INSERT INTO outbox (topic, key, headers, payload)
        SELECT * FROM unnest($1::text[], $2::bytea[], $3::bytea[], $4::bytea[])
        RETURNING id
        """,
        [m.topic for m in messages],
        [m.key for m in messages],
        headers,
        [m.payload for m in messages],
    )
    # INSERT ... SELECT FROM unnest keeps the input order, and RETURNING reports in that order.
    return [
        OutboxMessage(m.topic, m.key, m.payload, m.headers, row[0], m.source_ts_ms)
        for m, row in zip(messages, ids, strict=True)
    ]


async def claim_outbox(conn: Conn, older_than_s: float, limit: int) -> list[OutboxMessage]:
    """Lock leftover outbox rows (skipping rows another worker holds, and parked rows),
    oldest first."""
    rows = await conn.fetch(
        """
        SELECT id, topic, key, headers, payload FROM outbox
        WHERE created_at <= now() - make_interval(secs => $1) AND parked_at IS NULL
        ORDER BY id LIMIT $2
        FOR UPDATE SKIP LOCKED
        """,
        older_than_s,
        limit,
    )
    return [OutboxMessage(r[1], r[2], r[4], decode_headers(r[3]), r[0]) for r in rows]


async def delete_outbox(conn: Db, ids: Sequence[int]) -> None:
    await conn.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])", list(ids))


async def park_outbox(conn: Db, parked: Sequence[tuple[int, str]]) -> None:
    """Mark rows the broker refused for good, with the reason: the relay skips them."""
    await conn.execute(
        """
        UPDATE outbox o SET parked_at = now(), park_reason = u.reason
          FROM unnest($1::bigint[], $2::text[]) AS u(id, reason)
         WHERE o.id = u.id
        """,
        [p[0] for p in parked],
        [p[1] for p in parked],
    )


async def outbox_backlog(conn: Db) -> tuple[int, int]:
    """Rows waiting to be published, and rows parked (the table is shared by all workers)."""
    row = await conn.fetchrow(
        "SELECT count(*) FILTER (WHERE parked_at IS NULL), count(parked_at) FROM outbox"
    )
    assert row is not None
    return int(row[0]), int(row[1])


@dataclass(frozen=True, slots=True)
class ParkedRows:
    """What `doctor` shows of the parked rows: how many, since when, and why."""

    count: int
    oldest: datetime | None
    reasons: dict[str, int]


async def parked_outbox(conn: Db) -> ParkedRows:
    rows = await conn.fetch(
        """
        SELECT park_reason, count(*), min(parked_at) FROM outbox
        WHERE parked_at IS NOT NULL GROUP BY park_reason ORDER BY count(*) DESC
        """
    )
    return ParkedRows(
        sum(r[1] for r in rows),
        min((r[2] for r in rows), default=None),
        {str(r[0]): int(r[1]) for r in rows},
    )


async def find_partners(pool: Db, digests: list[bytes]) -> list[Partner]:
    rows = await pool.fetch(
        """
        SELECT partner_id, api_key_sha256, tag_ids, status FROM partners
        WHERE api_key_sha256 = ANY($1::bytea[])
        """,
        digests,
    )
    return [Partner(r[0], bytes(r[1]), tuple(r[2]), r[3]) for r in rows]


async def stored_offsets(conn: Db, group_id: str, topic: str) -> dict[int, int]:
    rows = await conn.fetch(
        """
        SELECT partition, next_offset FROM consumer_offsets
        WHERE group_id = $1 AND topic = $2 AND next_offset IS NOT NULL
        """,
        group_id,
        topic,
    )
    return {r[0]: r[1] for r in rows}


async def expire_due(conn: Conn, limit: int, now: datetime | None = None) -> list[Reservation]:
    """Move up to `limit` overdue reservations to expired; return them (stock not yet returned).

    SKIP LOCKED lets several workers sweep at once, and leaves rows a release holds alone.
    Must run inside a transaction: on PostgreSQL 16 and later the expiry index is a
    partial BRIN, which the planner does not choose by itself (it counts every row whose
    `expires_at` passed, released ones included, and would read the whole table), so the
    sequential scan is switched off for this transaction.
    """
    await conn.execute("SET LOCAL enable_seqscan = off")
    return _reservations(await conn.fetch(EXPIRE_DUE, limit, now))


# $1 the most rows, $2 the time they must be due by (NULL: now).
EXPIRE_DUE = f"""
    WITH due AS (
        SELECT reservation_id FROM reservations
        WHERE status = 'reserved' AND expires_at <= COALESCE($2, now())
        ORDER BY reservation_id
        LIMIT $1
        FOR UPDATE SKIP LOCKED
    )
    UPDATE reservations r SET status = 'expired', released_at = now()
      FROM due WHERE r.reservation_id = due.reservation_id AND r.status = 'reserved'
    RETURNING {_R_COLUMNS}
"""


async def resummarize_expiry(conn: Db, overlap_s: float, every_s: float, rolling: int) -> int:
    """Re-summarise the expiry index's page ranges whose rows came due since the last call
    (reaching back `overlap_s`), then `rolling` more of the whole table in turn, unless a
    call ended less than `every_s` ago. Return how many ranges: 0 where the expiry index
    is a btree (PostgreSQL 15), -1 when its lock was busy (..._hot_releases.sql)."""
    ranges = await conn.fetchval(
        "SELECT release_worker_resummarize_expiry("
        "make_interval(secs => $1), make_interval(secs => $2), $3)",
        overlap_s,
        every_s,
        rolling,
    )
    return int(ranges)


async def check_schema(conn: Db) -> None:
    """Raise SchemaNotReady unless the migrations this code needs are applied."""
    exists = await conn.fetchval("SELECT to_regclass('public.schema_migrations') IS NOT NULL")
    version = await conn.fetchval("SELECT max(version) FROM schema_migrations") if exists else None
    if version is None:
        raise SchemaNotReady(
            "The database is not migrated. Run `release-worker migrate` (or `make migrate`)."
        )
    if str(version) < SCHEMA_VERSION:
        raise SchemaNotReady(
            f"The database schema is at {version}; this worker needs {SCHEMA_VERSION}. "
            "Run `release-worker migrate`."
        )


# What the worker's login must be allowed, as granted to the `release_worker` role by
# the migrations (..._release_worker_role.sql, ..._inbox_tombstones.sql,
# ..._outbox_parking.sql, ..._published_watermark.sql, ..._hot_releases.sql): (object,
# privilege, column or None).
WORKER_PRIVILEGES: tuple[tuple[str, str, str | None], ...] = (
    ("schema_migrations", "SELECT", None),
    ("partners", "SELECT", None),
    ("reservations", "SELECT", None),
    *(("reservations", "UPDATE", c) for c in ("status", "released_at", "release_event_id")),
    ("stock", "SELECT", None),
    ("stock", "UPDATE", "reserved"),
    *(("inbox", p, None) for p in ("SELECT", "INSERT")),
    ("inbox", "UPDATE", "results"),
    ("inbox", "UPDATE", "result_headers"),
    *(("outbox", p, None) for p in ("SELECT", "INSERT", "DELETE")),
    *(("outbox", "UPDATE", c) for c in ("created_at", "parked_at", "park_reason")),
    ("outbox_id_seq", "USAGE", None),
    *(("consumer_offsets", p, None) for p in ("SELECT", "INSERT")),
    *(("consumer_offsets", "UPDATE", c) for c in ("next_offset", "published_offset", "updated_at")),
    ("release_worker_resummarize_expiry(interval, interval, integer)", "EXECUTE", None),
)


async def missing_privileges(conn: Db) -> tuple[str, bool, list[str]]:
    """The login's name, whether it is a superuser, and which WORKER_PRIVILEGES it lacks
    (as `PRIVILEGE(column) ON object`). Needs a migrated schema."""
    objects, privileges, columns = zip(*WORKER_PRIVILEGES, strict=True)
    rows = await conn.fetch(
        """
        SELECT obj, priv, col FROM unnest($1::text[], $2::text[], $3::text[]) AS w(obj, priv, col)
        WHERE NOT CASE
            WHEN priv = 'USAGE' THEN has_sequence_privilege(obj, priv)
            WHEN priv = 'EXECUTE' THEN has_function_privilege(obj, priv)
            WHEN col IS NULL THEN has_table_privilege(obj, priv)
            ELSE has_column_privilege(obj, col, priv)
        END
        """,
        list(objects),
        list(privileges),
        list(columns),
    )
    who = await conn.fetchrow(
        "SELECT current_user AS name, usesuper FROM pg_user WHERE usename = current_user"
    )
    assert who is not None
    missing = [
        f"{r['priv']}" + (f"({r['col']})" if r["col"] else "") + f" ON {r['obj']}" for r in rows
    ]
    return str(who["name"]), bool(who["usesuper"]), missing


async def prune_inbox(conn: Db, older_than_s: float, limit: int) -> int:
    """Drop the results of up to `limit` inbox rows processed more than `older_than_s` ago,
    keeping each row's key as a tombstone; return how many were pruned. Rows at or above
    their partition's published watermark keep their results (they may be republished)."""
    status = await conn.execute(
        """
        UPDATE inbox SET results = NULL, result_headers = NULL WHERE ctid IN (
            SELECT ctid FROM inbox
            WHERE processed_at < now() - make_interval(secs => $1) AND results IS NOT NULL
              -- Never results not yet acknowledged: they are republished from here.
              AND NOT EXISTS (
                  SELECT 1 FROM consumer_offsets c
                  WHERE c.topic = inbox.source_topic AND c.partition = inbox.source_partition
                    AND inbox.source_offset >= COALESCE(c.published_offset, 0))
            LIMIT $2)
        """,
        older_than_s,
        limit,
    )
    return int(status.rsplit(" ", 1)[-1])


@dataclass(frozen=True, slots=True)
class StoredResult:
    """One result of an inbox row, as its fresh apply published it (key: the cart)."""

    source_offset: int
    key: bytes
    payload: bytes
    headers: Headers


async def publication_state(
    conn: Db, group_id: str, partitions: Sequence[TopicPartition]
) -> dict[TopicPartition, tuple[int, int]]:
    """(published_offset, next_offset) per partition that has applied anything (NULL
    watermark: 0)."""
    rows = await conn.fetch(
        """
        SELECT c.topic, c.partition, COALESCE(c.published_offset, 0), c.next_offset
          FROM consumer_offsets c
          JOIN unnest($2::text[], $3::int[]) AS u(t, p) ON c.topic = u.t AND c.partition = u.p
         WHERE c.group_id = $1 AND c.next_offset IS NOT NULL
        """,
        group_id,
        [tp[0] for tp in partitions],
        [tp[1] for tp in partitions],
    )
    return {(r[0], r[1]): (int(r[2]), int(r[3])) for r in rows}


async def stored_range(
    conn: Db, tp: TopicPartition, start: int, end: int, limit: int
) -> tuple[list[StoredResult], int | None, int]:
    """The results of the inbox rows of `tp` with start <= source_offset < end, in offset
    order, from at most `limit` rows; with the offset to continue from (None: done) and
    how many rows had no results to republish (pruned, or recorded without headers: only
    before the watermark existed, when the outbox carried every result)."""
    rows = await conn.fetch(
        """
        SELECT source_offset, cart_id, results, result_headers FROM inbox
         WHERE source_topic = $1 AND source_partition = $2
           AND source_offset >= $3 AND source_offset < $4
         ORDER BY source_offset
         LIMIT $5
        """,
        tp[0],
        tp[1],
        start,
        end,
        limit,
    )
    results: list[StoredResult] = []
    missing = 0
    decoded: dict[bytes, Headers] = {}
    for offset, cart_id, payloads, raw in rows:
        if payloads is None or raw is None:
            missing += 1
            continue
        headers = decoded.get(raw)
        if headers is None:
            headers = decoded[raw] = decode_headers(raw)
        key = cart_id.encode()
        results.extend(StoredResult(offset, key, p, headers) for p in payloads)
    more = rows[-1][0] + 1 if len(rows) == limit else None
    return results, more, missing


async def store_published(conn: Db, group_id: str, marks: dict[TopicPartition, int]) -> None:
    """Raise the partitions' published watermarks to `marks` (never lower them)."""
    items = sorted(marks.items())
    await conn.execute(
        """
        UPDATE consumer_offsets c
           SET published_offset = GREATEST(c.published_offset, u.w)
          FROM unnest($2::text[], $3::int[], $4::bigint[]) AS u(t, p, w)
         WHERE c.group_id = $1 AND c.topic = u.t AND c.partition = u.p
        """,
        group_id,
        [tp[0] for tp, _ in items],
        [tp[1] for tp, _ in items],
        [w for _, w in items],
    )


async def unpublished_backlog(conn: Db) -> int:
    """Inbox rows at or above their partition's published watermark (results not yet known
    acknowledged; republished by the partition's owner)."""
    value = await conn.fetchval(
        """
        SELECT count(*) FROM consumer_offsets c
          JOIN inbox i ON i.source_topic = c.topic AND i.source_partition = c.partition
                      AND i.source_offset >= COALESCE(c.published_offset, 0)
        """
    )
    return int(value or 0)
