"""Shared machinery of the fault tests.

- `WorkerProcess`: the worker as a real subprocess (`python -m worker run`, WORKER_* env),
  killed with SIGKILL or stopped with SIGTERM by its own process id;
- `Bed`: one test's private world (partner, SKUs, topics, consumer group), a seeded stream of
  cart events whose outcomes are known in advance, and the waits a fault test needs;
- `Bed.check`: the checker of I1-I3, "every input record got all its results", "duplicates
  are byte-identical" and the expected outcomes, which also pins per-cart order (G4).

The stream: every cart has three reservations. Event A releases item 0, event B (later in
the same partition: same key) releases all three, so B must report item 0 as
`already_released`; some carts get a whole-cart event C after B (all `already_released`),
and some A events are replayed at the end with the same eventId (their results must be
published again, the stored bytes, and stock must not move).

Workers connect as the least-privilege login (`release_worker`'s grants, as in
production); the test's own pool is the owner. Every bed's randomness (reservations,
stream order, kill moments) comes from one seed, printed as `[fault] seed: N`; set
`FAULT_SEED=N` to run a failing test again with the same choices. Worker logs are
scanned for the bed's API keys when the bed closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.support import Published, isolated_settings, produce
from worker.config import Settings
from worker.operator_store import add_partner
from worker.testing.environment import settings_env
from worker.testing.scenario import Event, abandon_event
from worker.testing.store import i1_violations, seed_reservations, seed_stock
from worker.testing.topic_reader import reading
from worker.testing.topics import ensure_topics

ROOT = Path(__file__).resolve().parents[2]
ITEMS_PER_CART = 3
ResultKey = tuple[str, str]  # (eventId, itemReservationId)
APPLICATION_NAME = "cart-release-worker"
_FINAL_STATUS = {
    "released": "released",
    "already_released": "released",
    "expired": "expired",
    "confirmed": "confirmed",
}


def worker_env(settings: Settings) -> dict[str, str]:
    """The process environment that makes `python -m worker run` use these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
    return env | settings_env(settings)


class WorkerProcess:
    """One `python -m worker run` subprocess, its output in a log file."""

    def __init__(self, name: str, settings: Settings, log_dir: Path) -> None:
        self.name = name
        self.settings = settings
        self.log_path = log_dir / f"{name}.log"
        self._proc: asyncio.subprocess.Process | None = None
        self.signalled = False  # killed or signalled by the test: any exit is expected

    async def start(self) -> WorkerProcess:
        with self.log_path.open("ab") as log:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "worker",
                "run",
                env=worker_env(self.settings),
                cwd=ROOT,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )
        return self

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def kill(self) -> None:
        """SIGKILL: no clean-up of any kind runs in the worker."""
        assert self._proc is not None
        self.signalled = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._proc.pid, signal.SIGKILL)
        code = await asyncio.wait_for(self._proc.wait(), 10)
        assert code == -signal.SIGKILL, f"{self.name} was not killed by SIGKILL: exit {code}"

    async def signal(self, signum: int = signal.SIGTERM) -> None:
        assert self._proc is not None
        self.signalled = True
        os.kill(self._proc.pid, signum)

    async def wait(self, timeout_s: float) -> tuple[int | None, float]:
        """Exit code (None if still running after the timeout) and the seconds waited."""
        assert self._proc is not None
        started = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._proc.wait(), timeout_s)
        return self._proc.returncode, time.monotonic() - started

    async def terminate(self, timeout_s: float) -> tuple[int | None, float]:
        await self.signal(signal.SIGTERM)
        return await self.wait(timeout_s)

    def log_lines(self, event: str) -> int:
        """How many log lines name this event."""
        if not self.log_path.exists():
            return 0
        needle = f'"event": "{event}"'.encode()
        return self.log_path.read_bytes().count(needle)

    def assignments(self) -> list[list[str]]:
        """The partitions of every `partitions_assigned` this worker logged, in order."""
        if not self.log_path.exists():
            return []
        found = []
        for line in self.log_path.read_bytes().splitlines():
            if b'"partitions_assigned"' in line:
                found.append(orjson.loads(line)["partitions"])
        return found

    def tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Stream:
    """Events to produce, and what each must yield: eventId -> {reservationId: outcome}.

    An outcome of None means "any outcome the racing parties allow" (see `Bed.check`).
    """

    events: list[Event] = field(default_factory=list)
    expected: dict[str, dict[str, str | None]] = field(default_factory=dict)
    replays: int = 0
    replayed: Counter[str] = field(default_factory=Counter)  # eventId -> times sent again
    whole_cart: int = 0


@dataclass
class Counts:
    records: int
    results: int
    distinct: int
    replays: int
    replayed_results: int
    duplicates: int
    released: int
    expired: int
    confirmed: int
    returned_quantity: int
    outcomes: dict[str, int]

    def line(self) -> str:
        return (
            f"records={self.records} results={self.results} distinct={self.distinct} "
            f"replays={self.replays} (their {self.replayed_results} results all published "
            f"again, byte-identical) other_duplicates={self.duplicates} (all byte-identical) "
            f"released={self.released} "
            f"expired={self.expired} confirmed={self.confirmed} "
            f"returned_quantity={self.returned_quantity} outcomes={dict(self.outcomes)} "
            "I1_violations=0 I2_violations=0 I3_unpublished=0 missing_results=0"
        )


class Bed:
    """One fault test's private partner, SKUs, reservations, topics, group and workers."""

    def __init__(
        self, pool: asyncpg.Pool, settings: Settings, log_dir: Path, partitions: int
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.log_dir = log_dir
        self.partitions = partitions
        self.prefix = settings.group_id.removeprefix("group-") + "-"
        self.partner_id = f"{self.prefix}partner"
        self.skus = [f"{self.prefix}sku-{n}" for n in range(16)]
        self.api_key = ""
        self.workers: list[WorkerProcess] = []
        self.produced: dict[int, int] = {}  # partition -> next offset after the last record
        self.carts = 0
        self.initial_on_hand = 0
        given = os.environ.get("FAULT_SEED")
        self.seed_value = int(given) if given else uuid.uuid4().int % 2**63
        self.rng = random.Random(self.seed_value)
        print(f"\n[fault] seed: {self.seed_value} (FAULT_SEED={self.seed_value} repeats it)")
        self.secrets: list[str] = []  # never to appear in a worker's log

    @property
    def bootstrap(self) -> str:
        assert self.settings.kafka_bootstrap
        return self.settings.kafka_bootstrap

    # ------------------------------------------------------------------ set-up

    async def seed(self, carts: int, overdue_share: float = 0.0) -> None:
        self.carts = carts
        self.api_key = await add_partner(self.pool, self.partner_id, "Fault test", ["tag-1"])
        self.secrets.append(self.api_key)
        async with self.pool.acquire() as conn, conn.transaction():
            await seed_stock(conn, self.skus)
            await seed_reservations(
                conn,
                self.partner_id,
                carts,
                ITEMS_PER_CART,
                self.skus,
                prefix=self.prefix,
                overdue_share=overdue_share,
                rng=self.rng,
            )
        self.initial_on_hand = await self._on_hand()

    def rid(self, cart: int, item: int) -> str:
        return f"{self.prefix}res-{self.partner_id}-{cart}-{item}"

    def cart_id(self, cart: int) -> str:
        return f"{self.prefix}cart-{self.partner_id}-{cart}"

    def stream(self, *, replay_share: float = 0.02, whole_cart_share: float = 0.01) -> Stream:
        """Two events per cart (A then B), some whole-cart events, some replays of A."""
        s = Stream()
        phases: list[list[Event]] = [[], [], []]
        for c in range(self.carts):
            items = [(f"item-{i}", self.rid(c, i)) for i in range(ITEMS_PER_CART)]
            a, b = f"{self.prefix}a-{c}", f"{self.prefix}b-{c}"
            phases[0].append(abandon_event(self.cart_id(c), items[:1], self.api_key, event_id=a))
            phases[1].append(abandon_event(self.cart_id(c), items, self.api_key, event_id=b))
            s.expected[a] = {items[0][1]: "released"}
            s.expected[b] = {items[0][1]: "already_released"}
            s.expected[b].update({r: "released" for _, r in items[1:]})
            if self.rng.random() < whole_cart_share:
                w = f"{self.prefix}w-{c}"
                phases[2].append(abandon_event(self.cart_id(c), None, self.api_key, event_id=w))
                s.expected[w] = dict.fromkeys((r for _, r in items), "already_released")
                s.whole_cart += 1
            if self.rng.random() < replay_share:
                # Same eventId and body: the stored results again, no stock change (G2, G3).
                phases[2].append(
                    abandon_event(self.cart_id(c), items[:1], self.api_key, event_id=a)
                )
                s.replays += 1
                s.replayed[a] += 1
        for phase in phases:
            self.rng.shuffle(phase)
            s.events.extend(phase)
        return s

    async def produce(self, events: list[Event]) -> None:
        for partition, offset in await produce(self.settings, events):
            self.produced[partition] = max(self.produced.get(partition, 0), offset + 1)

    async def produce_paced(self, events: list[Event], seconds: float, chunks: int = 20) -> None:
        """Produce in chunks spread over `seconds`: a stream that lasts through the faults."""
        size = -(-len(events) // chunks)
        for n in range(0, len(events), size):
            await self.produce(events[n : n + size])
            await asyncio.sleep(seconds / chunks)

    async def wait_log(self, worker: WorkerProcess, event: str, count: int = 1) -> None:
        deadline = time.monotonic() + 60
        while worker.log_lines(event) < count:
            self._assert_workers_alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"{worker.name} did not log {event} within 60s")
            await asyncio.sleep(0.1)

    def spawn(self, **overrides: Any) -> WorkerProcess:
        settings = self.settings.model_copy(update=overrides) if overrides else self.settings
        worker = WorkerProcess(f"worker-{len(self.workers) + 1}", settings, self.log_dir)
        self.workers.append(worker)
        return worker

    async def start_worker(self, **overrides: Any) -> WorkerProcess:
        return await self.spawn(**overrides).start()

    # ------------------------------------------------------------------ observing

    async def applied(self) -> int:
        """Records applied so far (committed to the database), over all partitions."""
        value = await self.pool.fetchval(
            "SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets "
            "WHERE group_id = $1 AND topic = $2",
            self.settings.group_id,
            self.settings.input_topic,
        )
        return int(value)

    async def wait_applied(self, at_least: int, timeout_s: float = 60) -> int:
        deadline = time.monotonic() + timeout_s
        while (done := await self.applied()) < at_least:
            self._assert_workers_alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"only {done} of {at_least} records applied in {timeout_s}s")
            await asyncio.sleep(0.05)
        return done

    async def outbox_left(self) -> int:
        value = await self.pool.fetchval(
            "SELECT count(*) FROM outbox WHERE topic = ANY($1::text[])",
            [self.settings.results_topic, self.settings.dlq_topic],
        )
        return int(value)

    async def unpublished_left(self) -> int:
        """Inbox rows of our input topic at or above their partition's published watermark:
        fresh results not yet known acknowledged (they have no outbox rows)."""
        value = await self.pool.fetchval(
            """
            SELECT count(*) FROM consumer_offsets c
              JOIN inbox i ON i.source_topic = c.topic AND i.source_partition = c.partition
                          AND i.source_offset >= COALESCE(c.published_offset, 0)
             WHERE c.group_id = $1 AND c.topic = $2
            """,
            self.settings.group_id,
            self.settings.input_topic,
        )
        return int(value)

    async def wait_drained(self, timeout_s: float = 90) -> None:
        """Every produced record applied, every outbox row of ours acknowledged, and every
        partition's published watermark past its inbox rows."""
        total = sum(self.produced.values())
        deadline = time.monotonic() + timeout_s
        while True:
            applied, left = await self.applied(), await self.outbox_left()
            unpublished = await self.unpublished_left()
            if applied >= total and left == 0 and unpublished == 0:
                return
            self._assert_workers_alive()
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"not drained after {timeout_s}s: applied {applied}/{total}, "
                    f"outbox rows left {left}, inbox rows above the watermark {unpublished}"
                    f"\n{self.tails()}"
                )
            await asyncio.sleep(0.1)

    def _assert_workers_alive(self) -> None:
        for w in self.workers:
            if not (w.running or w.signalled):
                raise AssertionError(f"{w.name} exited unasked:\n{w.tail()}")

    async def worker_transactions(self) -> list[int]:
        """Backend pids of the workers' connections that are inside a transaction now."""
        rows = await self.pool.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1 "
            "AND xact_start IS NOT NULL AND state <> 'idle'",
            APPLICATION_NAME,
        )
        return [int(r[0]) for r in rows]

    async def wait_worker_transaction(self, timeout_s: float = 30, at_least: int = 1) -> list[int]:
        deadline = time.monotonic() + timeout_s
        while len(pids := await self.worker_transactions()) < at_least:
            self._assert_workers_alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"no worker transaction seen within {timeout_s}s")
            await asyncio.sleep(0.005)
        return pids

    async def terminate_worker_transactions(self, timeout_s: float = 30) -> list[str]:
        """pg_terminate_backend on every worker connection inside a transaction with an xid,
        chosen and killed in one statement; returns the ids of the transactions hit (see
        `transaction_statuses`: a kill that landed inside its transaction aborted it)."""
        deadline = time.monotonic() + timeout_s
        while True:
            rows = await self.pool.fetch(
                f"SELECT {_XID8} AS xid, pg_terminate_backend(pid) AS hit "
                "FROM pg_stat_activity WHERE application_name = $1 AND backend_xid IS NOT NULL",
                APPLICATION_NAME,
            )
            if hit := [str(r["xid"]) for r in rows if r["hit"]]:
                return hit
            self._assert_workers_alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"no worker transaction to terminate within {timeout_s}s")
            await asyncio.sleep(0.005)

    async def transaction_statuses(self, xids: list[str], timeout_s: float = 30) -> list[str]:
        """`pg_xact_status` of each transaction once none is in progress any more:
        committed or aborted."""
        deadline = time.monotonic() + timeout_s
        while True:
            rows = await self.pool.fetch(
                "SELECT pg_xact_status(x::xid8) FROM unnest($1::text[]) AS x", xids
            )
            statuses = [str(r[0]) for r in rows]
            if "in progress" not in statuses or time.monotonic() > deadline:
                return statuses
            await asyncio.sleep(0.02)

    async def confirm(self, reservation_ids: list[str]) -> set[str]:
        """What the checkout does on purchase, as the reservation service would: lock the
        reservations, then their stock rows, in the fixed order; `reserved` and `on_hand`
        both drop by the quantity (I1 holds). Returns the ids actually confirmed."""
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT reservation_id, sku, location_id, quantity FROM reservations "
                "WHERE reservation_id = ANY($1::text[]) AND status = 'reserved' "
                "ORDER BY reservation_id FOR UPDATE",
                reservation_ids,
            )
            if not rows:
                return set()
            await conn.execute(
                "UPDATE reservations SET status = 'confirmed' WHERE reservation_id = ANY($1)",
                [r[0] for r in rows],
            )
            held: Counter[tuple[str, str]] = Counter()
            for r in rows:
                held[(r[1], r[2])] += r[3]
            keys = sorted(held)
            skus, locations = [k[0] for k in keys], [k[1] for k in keys]
            await conn.execute(
                "SELECT 1 FROM stock s JOIN unnest($1::text[], $2::text[]) AS u(sku, loc) "
                "ON s.sku = u.sku AND s.location_id = u.loc "
                "ORDER BY s.sku, s.location_id FOR UPDATE OF s",
                skus,
                locations,
            )
            await conn.execute(
                "UPDATE stock s SET reserved = s.reserved - u.q, on_hand = s.on_hand - u.q "
                "FROM unnest($1::text[], $2::text[], $3::bigint[]) AS u(sku, loc, q) "
                "WHERE s.sku = u.sku AND s.location_id = u.loc",
                skus,
                locations,
                [held[k] for k in keys],
            )
        return {r[0] for r in rows}

    async def kafka_committed(self) -> int:
        """Sum of the group's offsets committed to Kafka (not to the database)."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=self.settings.group_id,
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            total = 0
            for p in range(self.partitions):
                offset = await consumer.committed(TopicPartition(self.settings.input_topic, p))
                total += offset or 0
            return total
        finally:
            await consumer.stop()

    def leaked_secrets(self) -> list[str]:
        """Worker logs that contain one of the bed's secrets (an API key)."""
        return [
            f"{w.name} logged secret #{n}"
            for w in self.workers
            if w.log_path.exists()
            for n, secret in enumerate(self.secrets)
            if secret.encode() in w.log_path.read_bytes()
        ]

    def tails(self) -> str:
        return "\n".join(f"--- {w.name} ({w.log_path}):\n{w.tail()}" for w in self.workers)

    async def _on_hand(self) -> int:
        value = await self.pool.fetchval(
            "SELECT coalesce(sum(on_hand), 0) FROM stock WHERE sku = ANY($1::text[])", self.skus
        )
        return int(value)

    # ------------------------------------------------------------------ checking

    async def read_results(self, want: set[ResultKey], timeout_s: float = 60) -> list[Published]:
        """The whole results topic, read until every wanted key was seen and the end reached."""
        topic = self.settings.results_topic
        async with reading(self.bootstrap, topic, self.partitions) as reader:
            seen: list[Published] = []
            keys: set[ResultKey] = set()
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                records = await reader.batch(timeout_ms=300, max_records=20_000)
                for m in records:
                    p = Published(m.topic, m.partition, m.offset, m.key, m.value, {})
                    seen.append(p)
                    keys.add(_key(p.body))
                if not records and want <= keys and await reader.at_end():
                    return seen
            missing = len(want - keys)
            raise AssertionError(f"{missing} expected results not published in {timeout_s}s")

    async def check(
        self,
        stream: Stream,
        injected: str,
        *,
        confirmed_by_test: set[str] | None = None,
        expiry_possible: bool = False,
    ) -> Counts:
        """Drain, then verify everything the fault must not break; print the counts."""
        await self.wait_drained()
        rows = await self.pool.fetch(
            "SELECT reservation_id, quantity, status, release_event_id FROM reservations "
            "WHERE partner_id = $1",
            self.partner_id,
        )
        reservations = {r[0]: (int(r[1]), str(r[2]), r[3]) for r in rows}
        want: set[ResultKey] = {(e, r) for e, items in stream.expected.items() for r in items}
        if expiry_possible:
            want |= {
                (f"expiry:{r}", r) for r, (_, st, _) in reservations.items() if st == "expired"
            }
        published = await self.read_results(want)
        by_key: dict[ResultKey, set[bytes]] = defaultdict(set)
        copies: Counter[ResultKey] = Counter()
        bodies: dict[ResultKey, dict[str, Any]] = {}
        rejected = []
        for p in published:
            body = p.body
            if body["type"] != "item_result":
                rejected.append(body)
                continue
            key = _key(body)
            by_key[key].add(p.value or b"")
            copies[key] += 1
            bodies[key] = body
        # G6: an outage is never a reason to reject or dead-letter a record.
        assert not rejected, f"records rejected: {rejected[:3]}"
        # Every input record got all its results, and nothing else was reported.
        assert set(bodies) >= want, f"missing results: {sorted(want - set(bodies))[:5]}"
        unexpected = set(bodies) - want
        assert not unexpected, f"results nobody asked for: {sorted(unexpected)[:5]}"
        # G2: a duplicate is the same bytes.
        differing = {k: v for k, v in by_key.items() if len(v) > 1}
        assert not differing, f"duplicates that differ: {list(differing.items())[:2]}"
        # G2: every replayed record published its results again (the same bytes, above):
        # an event sent 1 + n times has each of its results at least 1 + n times.
        sent = {(e, r): 1 + n for e, n in stream.replayed.items() for r in stream.expected[e]}
        unreplayed = {k: (copies[k], n) for k, n in sent.items() if copies[k] < n}
        assert not unreplayed, f"replays without their results (published, sent): {unreplayed}"
        replayed_results = sum(n - 1 for n in sent.values())
        # Expected outcomes (pins G4: B is applied after A of the same cart).
        wrong = [
            (e, r, bodies[(e, r)]["outcome"], o)
            for e, items in stream.expected.items()
            for r, o in items.items()
            if o is not None and bodies[(e, r)]["outcome"] != o
        ]
        assert not wrong, f"{len(wrong)} wrong outcomes, e.g. {wrong[:5]}"
        # Whatever raced, a reported outcome agrees with where the reservation ended up.
        disagree = [
            (k, b["outcome"], reservations[k[1]][1])
            for k, b in bodies.items()
            if _FINAL_STATUS.get(b["outcome"], "?") != reservations[k[1]][1]
        ]
        assert not disagree, f"outcomes contradict the database: {disagree[:5]}"
        confirmed = confirmed_by_test or set()
        returned = self._check_i2_i3(reservations, bodies, confirmed)
        # I1, for every stock row of the database (other tests' rows included).
        assert await i1_violations(self.pool) == 0, "I1 violated"
        # The worker never changes on_hand; only the test's confirmations do.
        confirmed_qty = sum(reservations[r][0] for r in confirmed)
        assert await self._on_hand() == self.initial_on_hand - confirmed_qty
        assert await self.outbox_left() == 0
        assert await self.unpublished_left() == 0
        statuses = Counter(st for _, st, _ in reservations.values())
        counts = Counts(
            records=len(stream.events),
            results=sum(1 for p in published if p.body["type"] == "item_result"),
            distinct=len(bodies),
            replays=stream.replays,
            replayed_results=replayed_results,
            duplicates=len(published) - len(bodies) - replayed_results,
            released=statuses["released"],
            expired=statuses["expired"],
            confirmed=statuses["confirmed"],
            returned_quantity=returned,
            outcomes=dict(Counter(b["outcome"] for b in bodies.values())),
        )
        print(
            f"\n[fault] seed: {self.seed_value}\n[fault] injected: {injected}\n"
            f"[fault] verified: {counts.line()}"
        )
        return counts

    def _check_i2_i3(
        self,
        reservations: dict[str, tuple[int, str, str | None]],
        bodies: dict[ResultKey, dict[str, Any]],
        confirmed: set[str],
    ) -> int:
        """I2 (left `reserved` at most once, never a confirmed one) and I3 (every committed
        release published); returns the quantity returned to stock."""
        returns: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for (event_id, rid), body in bodies.items():
            if body["quantity"] > 0:
                returns[rid].append((event_id, body["quantity"]))
        returned = 0
        for rid, (quantity, status, release_event) in reservations.items():
            got = returns.get(rid, [])
            assert len(got) <= 1, f"I2: {rid} returned to stock {len(got)} times: {got}"
            if status == "released":
                assert got == [(release_event, quantity)], f"I3: {rid} released, results {got}"
            elif status == "expired":
                assert got == [(f"expiry:{rid}", quantity)], f"I3: {rid} expired, results {got}"
            else:
                assert not got, f"I2: {rid} is {status} but a result returned stock: {got}"
                assert status == "confirmed" or rid not in confirmed
            assert rid not in confirmed or status == "confirmed", f"I2: {rid} confirmed lost"
            returned += sum(q for _, q in got)
        return returned


# pg_stat_activity.backend_xid is a 32-bit xid; pg_xact_status wants the xid8 (epoch and
# xid), taken here from the current snapshot's epoch (wraparound aside).
_XID8 = (
    "((pg_snapshot_xmax(pg_current_snapshot())::text::bigint >> 32) * 4294967296"
    " + backend_xid::text::bigint)::text"
)


def _key(body: dict[str, Any]) -> ResultKey:
    return (str(body.get("eventId")), str(body.get("itemReservationId")))


@contextlib.asynccontextmanager
async def fault_bed(
    database_url: str,
    bootstrap: str,
    log_dir: Path,
    *,
    worker_database_url: str,
    partitions: int = 6,
    **overrides: Any,
) -> AsyncIterator[Bed]:
    """A private bed; every worker still running at the end is killed by its pid.

    `database_url` (the owner) is the test's pool; workers connect with
    `worker_database_url`, the least-privilege login."""
    values: dict[str, Any] = {"log_format": "json", "commit_interval_ms": 200}
    values.update(overrides)
    settings = isolated_settings(worker_database_url, bootstrap, **values)
    await ensure_topics(settings, partitions)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    bed = Bed(pool, settings, log_dir, partitions)
    try:
        yield bed
        leaked = bed.leaked_secrets()
        assert not leaked, f"API keys in worker logs: {leaked}"
    except BaseException:
        print(f"\n[fault] seed: {bed.seed_value}\n[fault] worker logs:\n{bed.tails()}")
        raise
    finally:
        for w in bed.workers:
            if w.running:
                await w.kill()
        await pool.close()
