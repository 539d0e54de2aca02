"""The one home of failure handling: what a failure means, and how it is retried.

Every failure the worker meets is mapped here, and only here, to a `Verdict`
(encode/httpx keeps its `_exceptions.py` the same way: one documented tree, one
place that maps foreign errors into it). The modules act on the verdict:

- `TRANSIENT`: the database or the broker is away, or a race was lost
  (serialisation failure 40001, deadlock 40P01, a terminated session 57P0x, a
  connection that closed, asyncpg's `InternalClientError` after a terminated
  session, our own `TransientError`). Retried with capped exponential backoff
  and jitter for as long as it lasts; never a rejection (G6).
- `LOCK_WAIT`: a row lock held by another transaction outlasted `lock_timeout`
  (55P03, `WORKER_LOCK_TIMEOUT_MS`): a checkout holding a stock row, a zombie
  holding an offset row, DDL. The waiting record and the later records of its
  partition are deferred: its lane offers them again after a backoff, for as long
  as it lasts, while the rest of the batch and the lane's other partitions go
  ahead; never a 504 or a dead letter (DESIGN §7 "A busy row is not poison").
- `STATEMENT_TIMEOUT`: a statement ran past `statement_timeout` on its own work
  (57014). Retried `poison_max_attempts` times on that record alone, then a 504.
- `POISON`: anything else unexpected. Retried like a statement timeout, then a
  500 and a dead letter. For the broker: a refusal that will not go away by
  itself (too large, not authorised, ...); `broker_refusal` names the ones for
  which the outbox parks the message.
- `FATAL`: the database refuses the worker itself (schema not migrated, a table,
  column or grant missing, the login refused). No record is at fault, so none is
  rejected: the error stops the process (non-zero exit) for an operator to fix.

`DATABASE_ERRORS` and `BROKER_ERRORS` are the exceptions a server can raise at
all, for `except` clauses of background passes that outlive any failure of
that server (the next pass tries again).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
from collections.abc import Awaitable, Callable, Collection, Iterator
from typing import Protocol, TypeVar

import asyncpg
import structlog
from aiokafka.errors import (
    CorruptRecordException,
    InvalidTopicError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    KafkaUnavailableError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    TopicAuthorizationFailedError,
)
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_never
from tenacity.wait import wait_exponential_jitter

from worker import metrics
from worker.config import Settings
from worker.errors import SchemaNotReady, TransientError

log = structlog.get_logger("worker.retry")


class Verdict(enum.StrEnum):
    TRANSIENT = "transient"
    LOCK_WAIT = "lock_wait"
    STATEMENT_TIMEOUT = "statement_timeout"
    POISON = "poison"
    FATAL = "fatal"


class _Connection(Protocol):
    def is_closed(self) -> bool: ...


class ConnectionLost(TransientError):
    """A database connection closed under a statement (see `closed_connection_is_transient`)."""


# Everything asyncpg or the network can raise about the database (InternalClientError is
# not an InterfaceError: MagicStack/asyncpg#1069, raised after a terminated session).
DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
    TimeoutError,
)
BROKER_ERRORS: tuple[type[BaseException], ...] = (KafkaError, OSError, TimeoutError)

_TRANSIENT_POSTGRES: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.PostgresConnectionError,  # 08xxx, ConnectionDoesNotExistError among them
    asyncpg.exceptions.SerializationError,  # 40001
    asyncpg.exceptions.DeadlockDetectedError,  # 40P01
    asyncpg.exceptions.OperatorInterventionError,  # 57xxx but 57014 (below): shutdowns, terminate
    asyncpg.exceptions.InsufficientResourcesError,  # 53xxx: too many connections, out of memory
    # A terminated session can leave asyncpg's protocol in a state it reports this way
    # (MagicStack/asyncpg#1069); the pool discards that connection, a retry gets a fresh one.
    asyncpg.exceptions.InternalClientError,
)
_FATAL_POSTGRES: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.SyntaxOrAccessError,  # 42xxx: a table, column or grant is missing
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,  # 28xxx: the login is refused
    asyncpg.exceptions.InvalidCatalogNameError,  # 3D000: the database does not exist
)
# aiokafka marks most passing conditions `retriable`; these three it does not.
_TRANSIENT_KAFKA = (KafkaConnectionError, KafkaTimeoutError, KafkaUnavailableError)

TRANSIENT_OR_LOCK_WAIT = frozenset({Verdict.TRANSIENT, Verdict.LOCK_WAIT})


def classify(error: BaseException) -> Verdict:
    """What `error` means for the work that raised it (see the module's docstring)."""
    if isinstance(error, asyncpg.exceptions.LockNotAvailableError):
        return Verdict.LOCK_WAIT
    if isinstance(error, asyncpg.exceptions.QueryCanceledError):
        return Verdict.STATEMENT_TIMEOUT
    if isinstance(error, (TransientError, *_TRANSIENT_POSTGRES, *_TRANSIENT_KAFKA)):
        return Verdict.TRANSIENT
    if isinstance(error, (SchemaNotReady, *_FATAL_POSTGRES)):
        return Verdict.FATAL
    if isinstance(error, KafkaError):
        return Verdict.TRANSIENT if error.retriable else Verdict.POISON
    if isinstance(error, OSError | TimeoutError):
        return Verdict.TRANSIENT
    return Verdict.POISON


# The broker's refusals of one message that will not go away by itself, and the reason
# the outbox parks such a message under instead of re-sending it forever (DESIGN §7).
# A subset of POISON: any other failure of a send (a closed producer included) leaves the
# row for the next pass. A missing topic is not here: aiokafka reports it as
# `UnknownTopicOrPartitionError` (retriable), as it does a topic it cannot learn about
# while the brokers are away, so such rows wait, and go out once the topic exists.
_BROKER_REFUSALS: tuple[tuple[type[KafkaError], str], ...] = (
    (MessageSizeTooLargeError, "too_large"),
    (RecordListTooLargeError, "too_large"),
    (TopicAuthorizationFailedError, "not_authorized"),
    (InvalidTopicError, "invalid_topic"),
    # e.g. a null key on a compacted topic
    (CorruptRecordException, "invalid_record"),
)
BROKER_REFUSAL_REASONS = tuple(dict.fromkeys(reason for _, reason in _BROKER_REFUSALS))


def broker_refusal(error: BaseException) -> str | None:
    """Why the broker will never take this message (a `BROKER_REFUSAL_REASONS` entry), or
    None when trying again later may succeed."""
    for kind, reason in _BROKER_REFUSALS:
        if isinstance(error, kind):
            return reason
    return None


def cause(error: BaseException) -> str:
    """A short label for metrics and logs (never message text: it may hold data): the
    verdict for anything but an outage, which is named after its error class."""
    verdict = classify(error)
    if verdict is not Verdict.TRANSIENT:
        return verdict.value
    if isinstance(error, ConnectionLost):
        return "connection_closed"
    if type(error) is TransientError:
        return "race"
    return type(error).__name__


@contextlib.contextmanager
def closed_connection_is_transient(conn: _Connection) -> Iterator[None]:
    """Map asyncpg's `InterfaceError` to `ConnectionLost` when the connection is closed.

    asyncpg reports both misuse ("another operation is in progress") and use of a
    connection the server closed ("connection is closed") as a bare `InterfaceError`;
    the connection's own state tells the outage from the bug, not the message text.
    """
    try:
        yield
    except asyncpg.InterfaceError as error:
        if conn.is_closed():
            raise ConnectionLost(f"the database connection closed: {error}") from error
        raise


def transient_retrying(
    settings: Settings,
    on_retry: Callable[[str], None] | None = None,
    *,
    retry_on: Collection[Verdict] = TRANSIENT_OR_LOCK_WAIT,
) -> AsyncRetrying:
    """Retry errors whose verdict is in `retry_on` forever, with capped exponential backoff
    and jitter (G6); any other error is raised at once.

    Each retry is counted (`worker_retries_total{cause}`, lock waits also in
    `worker_lock_waits_total`) and logged. `on_retry(cause)` is called for outages only
    (it marks the database not ready; a lock wait says nothing about readiness).
    """

    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        if error is None:
            return
        label = note_retry(error, attempt=state.attempt_number)
        if on_retry is not None and classify(error) is Verdict.TRANSIENT:
            on_retry(label)

    return AsyncRetrying(
        retry=retry_if_exception(lambda e: classify(e) in retry_on),
        wait=backoff(settings),
        stop=stop_never,
        before_sleep=before_sleep,
        reraise=True,
    )


T = TypeVar("T")


async def retry_transient(
    settings: Settings,
    call: Callable[[], Awaitable[T]],
    on_retry: Callable[[str], None] | None = None,
    *,
    retry_on: Collection[Verdict] = TRANSIENT_OR_LOCK_WAIT,
) -> T:
    """`await call()`, retried exactly as `transient_retrying` retries a block (errors whose
    verdict is in `retry_on`, forever, on the curve of `backoff`, each counted and logged,
    `on_retry` for outages), in a plain loop: tenacity's machinery costs about 270,000
    instructions a use even when the first attempt succeeds, and the processor retries
    twice a batch (6% of the worker's instructions per item in batches of 15 records)."""
    attempt = 1
    while True:
        try:
            return await call()
        except Exception as error:
            verdict = classify(error)
            if verdict not in retry_on:
                raise
            label = note_retry(error, attempt=attempt)
            if on_retry is not None and verdict is Verdict.TRANSIENT:
                on_retry(label)
        await asyncio.sleep(backoff_s(settings, attempt))
        attempt += 1


def backoff(settings: Settings) -> wait_exponential_jitter:
    """The backoff of every retry: from `retry_initial_s`, doubling, capped at `retry_max_s`."""
    return wait_exponential_jitter(
        multiplier=settings.retry_initial_s,
        max=settings.retry_max_s,
        jitter=settings.retry_initial_s,
    )


def backoff_s(settings: Settings, attempt: int) -> float:
    """The wait after failed attempt `attempt` (from 1) on the curve of `backoff`, for a
    retry that is not a loop around one call (a partition its lane holds back)."""
    exponential = settings.retry_initial_s * 2.0 ** min(attempt - 1, 64)
    return min(settings.retry_max_s, exponential + random.uniform(0, settings.retry_initial_s))


def note_retry(error: BaseException, *, attempt: int) -> str:
    """Count and log one retry of `error` (the one place retries are logged); return its
    cause label."""
    verdict, label = classify(error), cause(error)
    metrics.RETRIES.labels(cause=label).inc()
    if verdict is Verdict.LOCK_WAIT:
        metrics.LOCK_WAITS.inc()
        log.warning("lock_wait_retrying", attempt=attempt, error=str(error)[:200])
    elif verdict is Verdict.TRANSIENT:
        log.warning(
            "transient_failure_retrying", cause=label, attempt=attempt, error=str(error)[:200]
        )
    else:
        log.warning("record_failed_retrying", cause=label, attempt=attempt, error=repr(error)[:300])
    return label
