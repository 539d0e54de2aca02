"""worker/retry.py: every failure the worker meets maps to one verdict, in one place."""

from __future__ import annotations

import asyncpg
import pytest
from aiokafka.errors import (
    CorruptRecordException,
    InvalidTopicError,
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
    ProducerClosed,
    RecordListTooLargeError,
    RequestTimedOutError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)

from worker.config import Settings
from worker.errors import SchemaNotReady, TransientError
from worker.retry import (
    ConnectionLost,
    Verdict,
    broker_refusal,
    cause,
    classify,
    closed_connection_is_transient,
    retry_transient,
    transient_retrying,
)

pg = asyncpg.exceptions

VERDICTS: list[tuple[BaseException, Verdict]] = [
    # The database or the broker is away, or a race was lost: retried for as long as it lasts.
    (pg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
     Verdict.TRANSIENT),
    (pg.ConnectionFailureError("08006"), Verdict.TRANSIENT),
    (pg.SerializationError("could not serialize access"), Verdict.TRANSIENT),
    (pg.DeadlockDetectedError("deadlock detected"), Verdict.TRANSIENT),
    (pg.AdminShutdownError("terminating connection due to administrator command"),
     Verdict.TRANSIENT),
    (pg.CrashShutdownError("57P02"), Verdict.TRANSIENT),
    (pg.CannotConnectNowError("the database system is starting up"), Verdict.TRANSIENT),
    (pg.TooManyConnectionsError("too many clients"), Verdict.TRANSIENT),
    (pg.InternalClientError("after a terminated session (asyncpg#1069)"), Verdict.TRANSIENT),
    (pg.OutdatedSchemaCacheError("cached statement plan is invalid"), Verdict.TRANSIENT),
    (ConnectionLost("the database connection closed"), Verdict.TRANSIENT),
    (TransientError("a concurrent transaction recorded the same event"), Verdict.TRANSIENT),
    (ConnectionRefusedError(111, "Connection refused"), Verdict.TRANSIENT),
    (ConnectionResetError(104, "Connection reset by peer"), Verdict.TRANSIENT),
    (OSError(113, "No route to host"), Verdict.TRANSIENT),
    (TimeoutError(), Verdict.TRANSIENT),
    (KafkaConnectionError("broker away"), Verdict.TRANSIENT),
    (KafkaTimeoutError(), Verdict.TRANSIENT),
    (NotLeaderForPartitionError(), Verdict.TRANSIENT),
    # A row lock held elsewhere outlasted lock_timeout: retried, never rejected.
    (pg.LockNotAvailableError("canceling statement due to lock timeout"), Verdict.LOCK_WAIT),
    # A statement slow on its own work: bounded retries, then a 504.
    (pg.QueryCanceledError("canceling statement due to statement timeout"),
     Verdict.STATEMENT_TIMEOUT),
    # Unexpected: bounded retries, then a 500 and a dead letter.
    (ValueError("reservation r1 has an unknown status 'mystery'"), Verdict.POISON),
    (KeyError("k"), Verdict.POISON),
    (pg.UniqueViolationError("duplicate key"), Verdict.POISON),
    (pg.CheckViolationError("new row violates check constraint"), Verdict.POISON),
    (pg.DataError("invalid input"), Verdict.POISON),
    (asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
     Verdict.POISON),
    (MessageSizeTooLargeError(), Verdict.POISON),
    (TopicAuthorizationFailedError(), Verdict.POISON),
    # The database refuses the worker itself: no record is at fault.
    (SchemaNotReady("not migrated"), Verdict.FATAL),
    (pg.UndefinedTableError('relation "inbox" does not exist'), Verdict.FATAL),
    (pg.InsufficientPrivilegeError("permission denied for table stock"), Verdict.FATAL),
    (pg.InvalidPasswordError("password authentication failed"), Verdict.FATAL),
    (pg.InvalidCatalogNameError('database "x" does not exist'), Verdict.FATAL),
]  # fmt: skip


@pytest.mark.parametrize(
    ("error", "verdict"), VERDICTS, ids=[type(e).__name__ for e, _ in VERDICTS]
)
def test_each_failure_maps_to_its_verdict(error: BaseException, verdict: Verdict) -> None:
    assert classify(error) is verdict


# What the outbox parks a message for (never re-sent), and what leaves it waiting.
REFUSALS: list[tuple[BaseException, str | None]] = [
    (MessageSizeTooLargeError(), "too_large"),
    (RecordListTooLargeError(), "too_large"),
    (TopicAuthorizationFailedError("results"), "not_authorized"),
    (InvalidTopicError(), "invalid_topic"),
    (CorruptRecordException(), "invalid_record"),
    # Outages, and a topic aiokafka cannot tell from brokers that are away: the row waits.
    (KafkaConnectionError("broker away"), None),
    (KafkaTimeoutError(), None),
    (RequestTimedOutError(), None),
    (NotLeaderForPartitionError(), None),
    (UnknownTopicOrPartitionError(), None),
    # Poison for the worker, but nothing the message did: the row waits for the next pass.
    (ProducerClosed(), None),
    (OSError(113, "No route to host"), None),
]


@pytest.mark.parametrize(("error", "reason"), REFUSALS, ids=[type(e).__name__ for e, _ in REFUSALS])
def test_only_a_refusal_of_the_message_itself_parks_it(
    error: BaseException, reason: str | None
) -> None:
    assert broker_refusal(error) == reason
    if reason is not None:
        assert classify(error) is Verdict.POISON


def test_causes_name_outages_by_class_and_everything_else_by_verdict() -> None:
    assert cause(pg.SerializationError("x")) == "SerializationError"
    assert cause(ConnectionLost("x")) == "connection_closed"
    assert cause(TransientError("x")) == "race"
    assert cause(pg.LockNotAvailableError("x")) == "lock_wait"
    assert cause(pg.QueryCanceledError("x")) == "statement_timeout"
    assert cause(ValueError("secret cart data")) == "poison"


class _Connection:
    def __init__(self, closed: bool) -> None:
        self.closed = closed

    def is_closed(self) -> bool:
        return self.closed


@pytest.mark.parametrize(
    ("closed", "raised"), [(True, ConnectionLost), (False, asyncpg.InterfaceError)]
)
def test_an_interface_error_is_an_outage_only_when_the_connection_closed(
    closed: bool, raised: type[BaseException]
) -> None:
    with pytest.raises(raised), closed_connection_is_transient(_Connection(closed)):
        raise asyncpg.InterfaceError("connection is closed")


async def test_the_policy_retries_its_verdicts_and_raises_anything_else_at_once() -> None:
    settings = Settings(retry_initial_s=0.001, retry_max_s=0.001)
    failures: list[BaseException] = [pg.DeadlockDetectedError("x"), pg.LockNotAvailableError("x")]
    attempts = 0
    async for attempt in transient_retrying(settings):
        with attempt:
            attempts += 1
            if failures:
                raise failures.pop(0)
    assert attempts == 3
    outages: list[str] = []

    async def outage_then_lock_wait() -> None:
        async for attempt in transient_retrying(
            settings, outages.append, retry_on={Verdict.TRANSIENT}
        ):
            with attempt:
                if not outages:
                    raise ConnectionRefusedError(111, "refused")
                raise pg.LockNotAvailableError("x")

    with pytest.raises(pg.LockNotAvailableError):
        await outage_then_lock_wait()
    assert outages == ["ConnectionRefusedError"]


async def test_the_plain_loop_retries_as_the_policy_does() -> None:
    settings = Settings(retry_initial_s=0.001, retry_max_s=0.001)
    failures: list[BaseException] = [pg.DeadlockDetectedError("x"), pg.LockNotAvailableError("x")]
    attempts = 0

    async def flaky() -> str:
        nonlocal attempts
        attempts += 1
        if failures:
            raise failures.pop(0)
        return "done"

    assert await retry_transient(settings, flaky) == "done"
    assert attempts == 3
    outages: list[str] = []

    async def outage_then_lock_wait() -> None:
        if not outages:
            raise ConnectionRefusedError(111, "refused")
        raise pg.LockNotAvailableError("x")

    with pytest.raises(pg.LockNotAvailableError):
        await retry_transient(
            settings, outage_then_lock_wait, outages.append, retry_on={Verdict.TRANSIENT}
        )
    assert outages == ["ConnectionRefusedError"]
