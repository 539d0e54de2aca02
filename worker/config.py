"""Every setting of the worker, read from `WORKER_*` environment variables.

This class is the single source of the README's configuration table
(`release-worker config` prints it; a test checks the README against it).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


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
    input_topic: str = Field("cart.abandoned", description="Topic of cart-abandon events.")
    results_topic: str = Field("cart.release-results", description="Topic of per-item results.")
    dlq_topic: str = Field("cart.abandoned.dlq", description="Dead-letter topic.")
    group_id: str = Field("cart-release-worker", description="Kafka consumer group.")
    metrics_port: int = Field(
        9400, ge=0, le=65535, description="Port of /metrics, /healthz, /readyz (0 = off)."
    )
    metrics_host: str = Field("127.0.0.1", description="Address the metrics server binds to.")

    max_record_bytes: int = Field(
        1_048_576, ge=1024, description="Largest accepted record value; larger is a 400."
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
    fetch_max_records: int = Field(2000, ge=1, description="Most records per fetch.")
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
    expiry_interval_s: float = Field(5.0, gt=0, description="Sweeper period.")
    expiry_batch_size: int = Field(1000, ge=1, description="Reservations expired per sweep pass.")

    outbox_relay_interval_s: float = Field(
        2.0, gt=0, description="Period of the pass that publishes leftover outbox rows."
    )
    outbox_relay_grace_s: float = Field(
        5.0, ge=0, description="Age an outbox row must reach before the periodic pass takes it."
    )
    producer_linger_ms: int = Field(5, ge=0, description="Producer linger.")
    producer_acks: Literal["all", "1"] = Field("all", description="Producer acks.")
    producer_idempotence: bool = Field(
        False,
        description="Idempotent producer (Apache Kafka only; the embedded broker lacks it).",
    )
    compression: Literal["none", "gzip", "lz4", "zstd", "snappy"] = Field(
        "none", description="Compression of produced records."
    )

    stall_timeout_s: float = Field(
        120.0,
        gt=0,
        description="/healthz fails when lag exists but no offset advanced for this long.",
    )
    log_format: Literal["json", "console"] = Field("json", description="Log rendering.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level."
    )
