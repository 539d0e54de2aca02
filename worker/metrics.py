"""Prometheus series of the worker (all prefixed `release_worker_`, no per-cart labels).

Labels are bounded sets only: a result, an HTTP-like status, an item outcome, a
retry cause (a short name of the error class), a park reason
(`retry.BROKER_REFUSAL_REASONS`) or a partition number. Labelled series whose
values are known in advance are created at import (park reasons by
`publisher`, which knows them), so dashboards and alerts see a 0 instead of a
missing series before the first occurrence.
`docs/operations.md` lists every series; a test checks they are all exported.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

from worker.contract import DESCRIPTIONS, Outcome

# `*_created` timestamps double the series for little use; Prometheus does not need them.
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream


class RunHistogram(Histogram):
    """A histogram that also takes one value observed several times over in one call: the
    results of one record (or of records stamped in the same millisecond) acknowledged
    together share their latency, and each `observe` takes two locks."""

    def observe_times(self, amount: float, times: int) -> None:
        """What `times` calls of `observe(amount)` would record (no exemplar)."""
        self._raise_if_not_observable()  # type: ignore[no-untyped-call]  # untyped upstream
        self._sum.inc(amount * times)
        for i, bound in enumerate(self._upper_bounds):
            if amount <= bound:
                self._buckets[i].inc(times)
                break


RECORDS = Counter(
    "release_worker_records_total",
    "Input records handled, by result (processed, replayed, rejected, skipped).",
    ["result"],
)
REJECTIONS = Counter(
    "release_worker_rejections_total", "event_rejected results, by HTTP-like status.", ["status"]
)
DEAD_LETTERS = Counter("release_worker_dead_letters_total", "Records sent to the DLQ topic.")
ITEMS = Counter("release_worker_items_total", "item_result records, by outcome.", ["outcome"])
RELEASED_QUANTITY = Counter(
    "release_worker_released_quantity_total", "Units returned to stock by releases and expiry."
)
CROSS_PARTNER = Counter(
    "release_worker_cross_partner_attempts_total",
    "Items naming another partner's reservation (reported as not_found).",
)
EXPIRED = Counter("release_worker_expiry_releases_total", "Reservations released by the sweeper.")
RETRIES = Counter("release_worker_retries_total", "Retried attempts, by cause.", ["cause"])
LOCK_WAITS = Counter(
    "release_worker_lock_waits_total",
    "Statements that waited for a row lock longer than WORKER_LOCK_TIMEOUT_MS (retried).",
)
TASK_FAILURES = Counter(
    "release_worker_task_failures_total",
    "Supervised tasks that ended unexpectedly (then restarted, or the worker stopped).",
    ["task"],
)
BATCH_SIZE = Histogram(
    "release_worker_batch_records",
    "Records per database transaction.",
    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2000),
)
BATCH_SECONDS = Histogram(
    "release_worker_batch_duration_seconds",
    "Duration of one batch transaction, retries included.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
LATENCY = RunHistogram(
    "release_worker_record_latency_seconds",
    "From the input record's timestamp to its results being acknowledged by the broker.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
LAG = Gauge(
    "release_worker_consumer_lag",
    "Records behind, per assigned partition: the fetch high-water mark minus the committed offset.",
    ["partition"],
)
COMMITTED = Gauge(
    "release_worker_committed_offset", "Offset committed to Kafka, per partition.", ["partition"]
)
RECORD_BYTES = Gauge(
    "release_worker_buffered_record_bytes",
    "Bytes of records the lanes hold, queued or being applied; bounded by WORKER_LANES x "
    "(WORKER_LANE_QUEUE_BYTES + WORKER_BATCH_MAX_BYTES) plus one fetch.",
)
OUTBOX_BACKLOG = Gauge(
    "release_worker_outbox_backlog",
    "Outbox rows waiting to be acknowledged by the broker, parked rows not included "
    "(the table is shared by all workers).",
)
UNPUBLISHED_BACKLOG = Gauge(
    "release_worker_unpublished_inbox_rows",
    "Inbox rows at or above their partition's published watermark: fresh results not yet "
    "known acknowledged, republished from the inbox by the partition's owner (all workers).",
)
OUTBOX_PARKED = Gauge(
    "release_worker_outbox_parked_rows",
    "Outbox rows parked because the broker refused them for good (too large, not "
    "authorised, invalid topic); never re-sent. `release-worker doctor` lists them.",
)
PARKED = Counter(
    "release_worker_outbox_parked_total",
    "Outbox rows this worker parked, by reason.",
    ["reason"],
)
READY = Gauge("release_worker_ready", "1 when the database and broker are connected and joined.")
ASSIGNED = Gauge("release_worker_assigned_partitions", "Partitions assigned to this worker.")
STALLED = Gauge(
    "release_worker_stalled_seconds",
    "How long the worker has been stuck: lag without progress, not in its group, or not "
    "fetching. /healthz fails above WORKER_STALL_TIMEOUT_S.",
)
LOOP_DELAY = Gauge(
    "release_worker_event_loop_delay_seconds",
    "How late the event loop ran the last health tick (a blocked loop shows here first).",
)

RECORD_RESULTS = ("processed", "replayed", "rejected", "skipped")
# Causes that need no error to exist first; outage causes are named after the error class.
RETRY_CAUSES = ("race", "poison", "statement_timeout", "lock_wait", "connection_closed")

for _result in RECORD_RESULTS:
    RECORDS.labels(result=_result)
for _status in DESCRIPTIONS:
    REJECTIONS.labels(status=str(_status))
for _outcome in Outcome:
    ITEMS.labels(outcome=_outcome.value)
for _cause in RETRY_CAUSES:
    RETRIES.labels(cause=_cause)
