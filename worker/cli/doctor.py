"""`release-worker doctor`: check what the worker needs before (or while) it runs.

Each check says what it found and, when something is wrong, how to fix it. Nothing
is changed on the servers: topics are only listed, and the consumer group check
joins a throwaway group (`<group>-doctor-<random>`, no offsets committed) so the
real group is not rebalanced.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import asyncpg
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import for_code

from worker import store
from worker.config import Settings
from worker.errors import SchemaNotReady
from worker.redaction import redact_text, redact_url
from worker.retry import BROKER_ERRORS, DATABASE_ERRORS

MIN_POSTGRES = 14
# ValueError: a URL asyncpg cannot parse (a bad port, say).
_CONNECT_ERRORS: tuple[type[BaseException], ...] = (ValueError, *DATABASE_ERRORS)
CONNECT_TIMEOUT_S = 10.0
GROUP_JOIN_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    # Works, but wants an operator (shown with `!` and its fix; the exit code stays 0, so
    # a deployment gate does not stop a worker that can run).
    attention: bool = False


async def run_checks(settings: Settings) -> list[Check]:
    database = await check_database(settings)
    kafka = await check_kafka(settings)
    return database + kafka


def render(checks: list[Check]) -> str:
    lines = []
    for c in checks:
        mark = "✗" if not c.ok else "!" if c.attention else "✓"
        lines.append(f"{mark} {c.name}: {c.detail}")
        if (not c.ok or c.attention) and c.fix:
            lines.append(f"    fix: {c.fix}")
    problems = sum(not c.ok for c in checks)
    attention = sum(c.ok and c.attention for c in checks)
    lines.append("")
    lines.append(
        f"All {len(checks)} checks passed"
        + (f"; {attention} need(s) attention." if attention else ".")
        if not problems
        else f"{problems} problem(s) found; the worker will not run properly until fixed."
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------- PostgreSQL


async def check_database(settings: Settings) -> list[Check]:
    if not settings.database_url:
        return [
            Check(
                "PostgreSQL",
                False,
                "WORKER_DATABASE_URL is not set",
                "set it to postgresql://USER:PASSWORD@HOST:PORT/DATABASE",
            )
        ]
    where = redact_url(settings.database_url)
    try:
        conn = await asyncpg.connect(settings.database_url, timeout=CONNECT_TIMEOUT_S)
    except _CONNECT_ERRORS as e:
        return [
            Check(
                "PostgreSQL",
                False,
                f"cannot connect to {where}: {redact_text(_reason(e), settings.database_url)}",
                "check WORKER_DATABASE_URL, that PostgreSQL is running and reachable from here, "
                "and that pg_hba.conf and the credentials let this user in",
            )
        ]
    try:
        version = conn.get_server_version()
        reachable = Check(
            "PostgreSQL",
            version.major >= MIN_POSTGRES,
            f"version {version.major}.{version.minor} at {where}",
            f"upgrade to PostgreSQL {MIN_POSTGRES} or later",
        )
        try:
            await store.check_schema(conn)
        except asyncpg.InsufficientPrivilegeError as error:
            login = urlsplit(settings.database_url).username or "this login"
            return [reachable, _no_grants(login, f"may not read the schema version: {error}")]
        except SchemaNotReady as error:
            schema = Check(
                "schema",
                False,
                str(error).split(". Run", 1)[0],
                "run `release-worker migrate` with the same WORKER_DATABASE_URL",
            )
            return [reachable, schema]
        schema = Check("schema", True, f"migrated (version {store.SCHEMA_VERSION} or later)")
        try:
            privileges = await _privileges(conn)
        except asyncpg.PostgresError as error:
            privileges = Check(
                "database privileges",
                False,
                f"could not be checked: {redact_text(_reason(error), settings.database_url)}",
                "run `release-worker migrate`; the privilege check follows the migrations",
            )
        if not privileges.ok:
            return [reachable, schema, privileges]
        return [reachable, schema, privileges, await _unpublished(conn), await _parked(conn)]
    finally:
        await conn.close()


async def _unpublished(conn: asyncpg.Connection) -> Check:
    """Fresh results not yet known acknowledged (inbox rows at or above their partition's
    published watermark); their partition's owner republishes them."""
    rows = await store.unpublished_backlog(conn)
    return Check(
        "unpublished results",
        True,
        f"{rows} inbox row(s) above their partition's published watermark"
        + (" (republished by each partition's owner)" if rows else ""),
    )


async def _parked(conn: asyncpg.Connection) -> Check:
    """Outbox rows the broker refused for good (publisher.py parks them)."""
    parked = await store.parked_outbox(conn)
    if not parked.count:
        return Check("outbox", True, "no parked rows")
    assert parked.oldest is not None
    reasons = ", ".join(f"{reason} ×{n}" for reason, n in parked.reasons.items())
    return Check(
        "outbox",
        True,
        f"{parked.count} row(s) parked: the broker refused them for good ({reasons}); "
        f"the oldest since {parked.oldest:%Y-%m-%d %H:%M:%S %Z}",
        "fix the cause (the topic's max.message.bytes, the worker's Write ACL), then list "
        "them with `release-worker outbox` and re-send (`outbox retry ID...`) or drop "
        "(`outbox drop ID... --yes`) them; see docs/operations.md, 'Parked outbox rows'",
        attention=True,
    )


def _no_grants(login: str, what: str) -> Check:
    return Check(
        "database privileges",
        False,
        f"login {login!r} {what}",
        f"as the schema owner: GRANT release_worker TO {login} (the role comes with the "
        "migrations)",
    )


async def _privileges(conn: asyncpg.Connection) -> Check:
    login, superuser, missing = await store.missing_privileges(conn)
    if missing:
        return _no_grants(login, f"may not: {', '.join(missing)}")
    if superuser:
        return Check(
            "database privileges",
            True,
            f"login {login!r} is a superuser: it works, but run the worker as a login granted "
            "only `release_worker` (docs/operations.md, PostgreSQL)",
        )
    return Check("database privileges", True, f"login {login!r} has what the worker needs")


# ---------------------------------------------------------------------- Kafka


@asynccontextmanager
async def _admin(bootstrap: str) -> AsyncIterator[AIOKafkaAdminClient]:
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=int(CONNECT_TIMEOUT_S * 1000)
    )
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            await admin.start()
        yield admin
    finally:
        await admin.close()


async def check_kafka(settings: Settings) -> list[Check]:
    bootstrap = settings.kafka_bootstrap
    if not bootstrap:
        return [
            Check(
                "Kafka",
                False,
                "WORKER_KAFKA_BOOTSTRAP is not set",
                "set it to the brokers' host:port list",
            )
        ]
    try:
        async with _admin(bootstrap) as admin, asyncio.timeout(CONNECT_TIMEOUT_S):
            cluster = await admin.describe_cluster()
            topics = {t["topic"]: t for t in await admin.describe_topics()}
            outputs = [t for t in (settings.results_topic, settings.dlq_topic) if t in topics]
            limits = await _message_limits(admin, outputs)
    except BROKER_ERRORS as error:
        return [
            Check(
                "Kafka",
                False,
                f"cannot reach {bootstrap}: {_reason(error)}",
                "check WORKER_KAFKA_BOOTSTRAP and that the brokers are running and reachable "
                "from here (their advertised listeners too)",
            )
        ]
    brokers = len(cluster.get("brokers", []))
    checks = [Check("Kafka", True, f"{brokers} broker(s) reachable through {bootstrap}")]
    wanted = (
        ("input topic", settings.input_topic, "WORKER_INPUT_TOPIC"),
        ("results topic", settings.results_topic, "WORKER_RESULTS_TOPIC"),
        ("dead-letter topic", settings.dlq_topic, "WORKER_DLQ_TOPIC"),
    )
    checks += [
        _topic_check(label, name, variable, topics.get(name), bootstrap)
        for label, name, variable in wanted
    ]
    checks.append(_message_size_check(settings.max_message_bytes, limits))
    if settings.input_topic in topics:
        checks.append(await check_group(settings, bootstrap))
    else:
        checks.append(
            Check(
                "consumer group",
                False,
                f"not tried: the input topic {settings.input_topic!r} is missing",
                "create the input topic first",
            )
        )
    return checks


async def _message_limits(admin: AIOKafkaAdminClient, topics: list[str]) -> dict[str, int | str]:
    """Each topic's `max.message.bytes` as the broker reports it, or why it could not be
    read; a topic it reports none for (Tansu, for a topic created without one) is left out."""
    if not topics:
        return {}
    try:
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, t) for t in topics]
        )
    except BROKER_ERRORS as error:
        return dict.fromkeys(topics, _reason(error))
    limits: dict[str, int | str] = {}
    for response in responses:
        for error_code, _, _, name, entries, *_ in response.resources:
            if error_code:
                limits[name] = for_code(error_code).__name__
            for entry in entries:
                if entry[0] == "max.message.bytes" and entry[1] is not None:
                    limits[name] = int(entry[1])
    return limits


def _message_size_check(setting: int, limits: dict[str, int | str]) -> Check:
    """WORKER_MAX_MESSAGE_BYTES must not exceed what the results and DLQ topics accept: a
    dead letter shrunk to the setting would still be refused, and parked."""
    smaller = {t: v for t, v in limits.items() if isinstance(v, int) and v < setting}
    unread = {t: v for t, v in limits.items() if isinstance(v, str)}
    if smaller:
        least = min(smaller.values())
        topics = ", ".join(f"{t!r} accepts {v}" for t, v in sorted(smaller.items()))
        return Check(
            "message size",
            False,
            f"WORKER_MAX_MESSAGE_BYTES is {setting}, but {topics} bytes (max.message.bytes): "
            "larger results and dead letters would be refused and parked",
            f"set WORKER_MAX_MESSAGE_BYTES={least}, or raise the topics' max.message.bytes",
        )
    known = ", ".join(f"{t!r} {v}" for t, v in sorted(limits.items()) if isinstance(v, int))
    detail = f"WORKER_MAX_MESSAGE_BYTES {setting} fits " + (
        f"the topics' max.message.bytes ({known})" if known else "(no topic limit reported)"
    )
    if unread:
        detail += f"; not readable for {', '.join(sorted(unread))} ({next(iter(unread.values()))})"
    return Check("message size", True, detail)


def _topic_check(
    label: str, name: str, variable: str, found: dict[str, Any] | None, bootstrap: str
) -> Check:
    if found is None:
        return Check(
            label,
            False,
            f"{name!r} does not exist",
            f"create it, e.g. `kafka-topics.sh --bootstrap-server {bootstrap} --create "
            f"--topic {name} --partitions 12 --replication-factor 3 --config "
            "min.insync.replicas=2` (see docs/operations.md), or set "
            f"{variable} to the existing topic",
        )
    if found.get("error_code"):
        error = for_code(found["error_code"])
        return Check(
            label,
            False,
            f"{name!r}: {error.__name__}",
            "check the worker's ACLs on this topic (Describe, Read or Write)",
        )
    partitions = found.get("partitions", [])
    replicas = min((len(p.get("replicas", [])) for p in partitions), default=0)
    return Check(
        label,
        True,
        f"{name!r}: {len(partitions)} partition(s), replication factor {replicas}",
    )


async def check_group(settings: Settings, bootstrap: str) -> Check:
    """Join a throwaway group on the input topic; describe the real group on the side."""
    probe_group = f"{settings.group_id}-doctor-{uuid.uuid4().hex[:8]}"
    joined = _Joined()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=probe_group,
        client_id="cart-release-worker-doctor",
        enable_auto_commit=False,
        session_timeout_ms=6000,
        heartbeat_interval_ms=2000,
    )
    consumer.subscribe([settings.input_topic], listener=joined)
    try:
        async with asyncio.timeout(GROUP_JOIN_TIMEOUT_S):
            await consumer.start()
            await joined.event.wait()
        assigned = len(consumer.assignment())
    except BROKER_ERRORS as error:
        return Check(
            "consumer group",
            False,
            f"could not join a group on {settings.input_topic!r}: {_reason(error)}",
            "check the group coordinator (the __consumer_offsets topic must be healthy) and "
            f"the ACLs: the worker needs Read on group {settings.group_id!r} and on the input "
            f"topic (doctor joins {settings.group_id}-doctor-*)",
        )
    finally:
        await consumer.stop()
    return Check(
        "consumer group",
        True,
        f"joinable (a probe group got {assigned} partition(s)); "
        f"{await _describe_group(bootstrap, settings.group_id)}",
    )


class _Joined(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self) -> None:
        self.event = asyncio.Event()

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        pass

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.event.set()


async def _describe_group(bootstrap: str, group_id: str) -> str:
    """`group 'x': Stable, 3 member(s)`, or why it could not be told (not a failure)."""
    try:
        async with _admin(bootstrap) as admin, asyncio.timeout(CONNECT_TIMEOUT_S):
            responses = await admin.describe_consumer_groups([group_id])
    except BROKER_ERRORS as error:
        return f"group {group_id!r} could not be described ({_reason(error)})"
    for response in responses:
        for group in response.groups:
            error_code, _, state, _, _, members, *_ = group
            if error_code:
                return f"group {group_id!r}: {for_code(error_code).__name__}"
            return f"group {group_id!r}: {state or 'unknown state'}, {len(members)} member(s)"
    return f"group {group_id!r}: not described"


def _reason(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text.splitlines()[0][:200]
