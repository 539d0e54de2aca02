"""Every setting of the worker, read from `WORKER_*` environment variables.

This class is the single source of the README's configuration table
(`release-worker config` prints it; a test checks the README against it).
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Kafka's default `message.max.bytes` (broker) and `max.message.bytes` (topic).
KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1_048_588


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WORKER_", extra="ignore", frozen=True)

    kafka_bootstrap: str | None = Field(
        None,
        description="Kafka bootstrap servers (host:port,...). Unset for `demo`/`bench`: "
        "an embedded broker is started.",
    )
    database_url: str | None = Field(
        None,
        description="PostgreSQL URL (postgresql://user@host:port/db). Unset for `demo`/`bench`: "
        "an embedded PostgreSQL is started.",
    )
    input_topic: str = Field(
        "cart.abandoned", min_length=1, description="Topic of cart-abandon events."
    )
    results_topic: str = Field(
        "cart.release-results", min_length=1, description="Topic of per-item results."
    )
    dlq_topic: str = Field("cart.abandoned.dlq", min_length=1, description="Dead-letter topic.")
    group_id: str = Field("cart-release-worker", min_length=1, description="Kafka consumer group.")
    group_instance_id: str | None = Field(
        None,
        min_length=1,
        max_length=249,
        description="Static group membership (KIP-345): a name unique in the group and stable "
        "across restarts of this worker (e.g. a StatefulSet pod name). A restart within "
        "WORKER_SESSION_TIMEOUT_MS keeps its partitions without a rebalance; a worker that stops "
        "for good does not leave the group, so its partitions wait that long "
        "(docs/operations.md: Static membership). Unset: dynamic membership.",
    )
    metrics_port: int = Field(
        9400, ge=0, le=65535, description="Port of /metrics, /healthz, /readyz (0 = off)."
    )
    metrics_host: str = Field(
        "127.0.0.1",
        min_length=1,
        description="Address the metrics server binds to (0.0.0.0 in a container, so the "
        "probes and Prometheus can reach it).",
    )

    max_record_bytes: int = Field(
        1_048_576, ge=1024, description="Largest accepted record value; larger is a 400."
    )
    max_message_bytes: int = Field(
        KAFKA_DEFAULT_MAX_MESSAGE_BYTES,
        ge=16 * 1024,
        description="Largest message the results and dead-letter topics accept (their "
        "`max.message.bytes`): a dead letter is shrunk to fit, and a message still larger "
        "is parked in the outbox instead of sent.",
    )
    max_items: int = Field(100, ge=1, description="Most items per event; more is a 422.")
    max_attributes: int = Field(50, ge=0, description="Most entries in `attributes`.")

    batch_max_records: int = Field(
        500, ge=1, description="Most records handled in one database transaction."
    )
    lanes: int = Field(
        2,
        ge=1,
        le=64,
        description="Concurrent processing lanes (each its own connection); "
        "a partition always goes to the same lane, so its records stay in order.",
    )
    lane_queue_batches: int = Field(
        4, ge=1, description="Batches queued per lane before its partitions are paused."
    )
    batch_max_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1024,
        description="Most bytes of records (value, key, headers) in one database transaction; "
        "a larger record is a batch of its own.",
    )
    lane_queue_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        description="Bytes of records queued per lane before its partitions are paused. "
        "Records in memory stay below WORKER_LANES × (this + WORKER_BATCH_MAX_BYTES) plus "
        "the fetch buffers, 2 × (WORKER_MAX_RECORD_BYTES + 64 KiB) per assigned partition "
        "(README: Memory).",
    )
    fetch_max_records: int = Field(
        2000, ge=1, description="Most records taken from the consumer per fetch."
    )
    commit_interval_ms: int = Field(
        200, ge=0, description="How often processed offsets are committed to Kafka."
    )
    shutdown_timeout_s: float = Field(
        30.0, gt=0, description="SIGTERM: time to finish in-flight work and publish results."
    )
    rebalance_drain_timeout_s: float = Field(
        20.0, gt=0, description="On revoke: time to finish the revoked partitions' work."
    )
    session_timeout_ms: int = Field(
        10_000,
        ge=1000,
        description="Consumer session timeout: a crashed worker's partitions move after this "
        "long (the embedded broker also delays a group's first join by half of it).",
    )

    db_pool_size: int = Field(4, ge=2, description="Database connections per worker.")
    statement_timeout_ms: int = Field(
        5000, ge=0, description="PostgreSQL statement_timeout for the worker's statements."
    )
    lock_timeout_ms: int = Field(
        1000,
        ge=1,
        description="PostgreSQL lock_timeout: a row lock held elsewhere for longer (a busy stock "
        "row, DDL) is retried with backoff until it is free, never rejected. Keep it below "
        "WORKER_STATEMENT_TIMEOUT_MS, which is then left to statements slow on their own work.",
    )
    poison_max_attempts: int = Field(
        5, ge=1, description="Attempts on one record that fails unexpectedly before a 500/504."
    )
    retry_initial_s: float = Field(0.05, gt=0, description="First backoff of a transient retry.")
    retry_max_s: float = Field(5.0, gt=0, description="Longest backoff of a transient retry.")

    auth_cache_ttl_s: float = Field(
        5.0,
        ge=0,
        description="How long a partner lookup is cached: a suspension or new tag takes "
        "effect within this time.",
    )

    expiry_enabled: bool = Field(True, description="Run the timeout sweeper.")
    expiry_interval_s: float = Field(
        5.0, gt=0, description="Seconds between two sweeps for overdue reservations."
    )
    expiry_batch_size: int = Field(1000, ge=1, description="Reservations expired per sweep pass.")

    inbox_retention_hours: float = Field(
        168.0,
        ge=0,
        description="Inbox rows keep their results (a replay gets them byte for byte) this "
        "long, then only their key, forever: an older replay still changes nothing and is "
        "answered from the reservations. 0 keeps the results forever.",
    )
    inbox_prune_interval_s: float = Field(
        300.0, gt=0, description="Period of the inbox pruning pass."
    )

    outbox_relay_interval_s: float = Field(
        2.0, gt=0, description="Period of the pass that publishes leftover outbox rows."
    )
    outbox_relay_grace_s: float = Field(
        5.0, ge=0, description="Age an outbox row must reach before the periodic pass takes it."
    )
    producer_linger_ms: int = Field(
        5, ge=0, description="How long the producer waits to fill a batch (ms)."
    )
    producer_acks: Literal["all", "1"] = Field(
        "all",
        description="Acknowledgements a produce waits for: `all` (every in-sync replica; "
        "use it with min.insync.replicas >= 2) or `1` (the leader only: faster, can lose results).",
    )
    producer_idempotence: bool = Field(
        False,
        description="Idempotent producer (Apache Kafka only; the embedded broker lacks it).",
    )
    compression: Literal["none", "gzip", "lz4", "zstd", "snappy"] = Field(
        "none", description="Compression of produced results and dead letters."
    )

    stall_timeout_s: float = Field(
        120.0,
        gt=0,
        description="/healthz fails when, for this long and with both servers reachable, "
        "records waited but no batch committed, or the consumer was out of its group, or a "
        "partition got no fetch response. Keep it above WORKER_REBALANCE_DRAIN_TIMEOUT_S.",
    )
    health_loop_block_s: float = Field(
        10.0,
        gt=0,
        description="/healthz fails when the event loop has not run for this long.",
    )
    api_host: str = Field(
        "127.0.0.1",
        min_length=1,
        description="Address `release-worker api` binds to (0.0.0.0 in a container).",
    )
    api_port: int = Field(
        8080, ge=0, le=65535, description="Port of `release-worker api` (0 = any free port)."
    )
    api_timeout_s: float = Field(
        10.0,
        gt=0,
        description="How long one request to `release-worker api` may take, its body, the "
        "partner's lookup and its results included; past it the answer is 504 "
        "results_timeout (a retry with the same Idempotency-Key then gets its results, "
        "releasing nothing twice), or 400 missing_body / 503 database_unavailable if the body "
        "or the lookup took it all.",
    )
    event_loop: Literal["uvloop", "asyncio"] = Field(
        "uvloop",
        description="Event loop of `release-worker run` and `demo`: `uvloop` (libuv's, less "
        "CPU per item when batches are small) or `asyncio` (the standard library's).",
    )
    log_format: Literal["json", "console"] = Field(
        "json", description="`json`: one JSON object per line (production); `console`: readable."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Lowest level logged; `debug` adds one summary per batch."
    )

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap_is_host_port_list(cls, value: str | None) -> str | None:
        if value is None:
            return None
        for server in value.split(","):
            host, _, port = server.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"expected host:port[,host:port...], got {server.strip()!r}")
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url_is_postgres(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("postgres", "postgresql"):
            # The URL may hold a password: the message must not echo it.
            raise ValueError("expected a postgresql://user@host:port/database URL")
        return value

    @field_validator("results_topic", "dlq_topic")
    @classmethod
    def _output_topics_differ(cls, value: str, info: ValidationInfo) -> str:
        # Publishing into the input topic would feed the worker its own output forever.
        taken = {k: v for k, v in info.data.items() if k in ("input_topic", "results_topic")}
        for other, topic in taken.items():
            if topic == value:
                raise ValueError(f"must differ from WORKER_{other.upper()} ({topic!r})")
        return value

    @field_validator("retry_max_s")
    @classmethod
    def _retry_max_not_below_initial(cls, value: float, info: ValidationInfo) -> float:
        initial = info.data.get("retry_initial_s")
        if initial is not None and value < initial:
            raise ValueError(f"must be at least WORKER_RETRY_INITIAL_S ({initial})")
        return value

    @field_validator("lock_timeout_ms")
    @classmethod
    def _lock_timeout_below_statement_timeout(cls, value: int, info: ValidationInfo) -> int:
        # Otherwise a lock wait ends as a statement timeout, which is a 504 after retries.
        statement = info.data.get("statement_timeout_ms")
        if statement and value >= statement:
            raise ValueError(f"must be below WORKER_STATEMENT_TIMEOUT_MS ({statement})")
        return value

    @field_validator("producer_idempotence")
    @classmethod
    def _idempotence_needs_acks_all(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("producer_acks") != "all":
            raise ValueError("needs WORKER_PRODUCER_ACKS=all")
        return value

    @field_validator("stall_timeout_s")
    @classmethod
    def _stall_above_drain(cls, value: float, info: ValidationInfo) -> float:
        # A revoke may legitimately hold the worker for the drain timeout.
        drain = info.data.get("rebalance_drain_timeout_s")
        if drain is not None and value <= drain:
            raise ValueError(f"must exceed WORKER_REBALANCE_DRAIN_TIMEOUT_S ({drain})")
        return value
