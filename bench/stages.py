"""Where a record's time goes in the worker: `python -m bench.stages run` is
`release-worker run` with four wrappers that stamp, per record (unix ms):

- `ts`: the input record's timestamp (the harness sets it when it calls `send`);
- `fetched`: the fetch loop handed it to its lane (`Lane.add`);
- `began` / `done`: its lane's transaction began / returned (`BatchProcessor.process`);
- `published`: `Publisher.publish_fresh` handed its results to the producer (when the
  result's timestamp, the bench's end point, is taken).

So its time splits into fetch (ts → fetched), queue (→ began: the lane's previous
transaction), txn (→ done: its own, holding every record queued when it began) and
publish (→ published). The fetch splits again at the fetch response that brought the
record: a fifth wrapper, on aiokafka's fetcher (`Fetcher._proc_fetch_request`), stamps
each partition's response when its request went out (`requested`) and when the worker's
loop had stored it in the consumer's buffer (`received`). So fetch = to_worker (ts →
received: the harness's linger, the wait for the worker's next fetch, the fetch in flight
and the loop's turn to read the answer) + handover (received → fetched: in aiokafka's
buffer until the fetch loop takes it); `fetch_response_ms` is requested → received,
averaged over records. The stamps, the batches and each transaction's `COMMIT` time are
written at exit to `$BENCH_STAGES_OUT-<pid>.json`; `breakdown` reduces them. A
measurement tool: the wrappers cost a dict entry per record and are not in the worker.
`bench.latency_ab` drives it in the bench's open loop.
"""

from __future__ import annotations

import atexit
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import orjson

# Per record: partition, offset, ts, fetched, began, done, published, requested, received
# (None: not seen; rows of 7 fields have no fetch response stamps).
Row = list[Any]
STAGES = ("fetch", "queue", "txn", "publish")


def install(out: str) -> None:
    """Wrap the worker's hand-over points; write the stamps to `<out>-<pid>.json` at exit."""
    import aiokafka.consumer.fetcher
    import asyncpg.transaction

    from worker import consumer, processor, publisher
    from worker.records import Publication, RawRecord
    from worker.release import BatchReport

    # Per record, when its lane got it and the (requested, received) of its fetch response.
    fetched: dict[tuple[int, int], tuple[float, float | None, float | None]] = {}
    # Per partition, the (requested, received) of the last fetch response that held records.
    responses: dict[tuple[str, int], tuple[float, float]] = {}
    published: dict[tuple[int, int], float] = {}
    rows: list[Row] = []
    batches: list[tuple[float, float, int]] = []
    commits: list[tuple[float, float]] = []

    add = consumer.Lane.add

    def lane_add(self: consumer.Lane, records: Iterable[RawRecord]) -> None:
        records = list(records)
        now = time.time() * 1000
        for r in records:
            # aiokafka holds one response per partition and asks again only once the fetch
            # loop has taken all of it, and the loop hands over right after `getmany`: the
            # partition's last response is the one that brought this record.
            requested, received = responses.get((r.topic, r.partition), (None, None))
            fetched.setdefault((r.partition, r.offset), (now, requested, received))
        add(self, records)

    fetcher_class = aiokafka.consumer.fetcher.Fetcher
    proc_fetch = fetcher_class._proc_fetch_request

    async def timed_proc_fetch(self: Any, assignment: Any, node_id: int, request: Any) -> Any:
        requested = time.time() * 1000
        before = dict(self._records)
        try:
            return await proc_fetch(self, assignment, node_id, request)
        finally:
            received = time.time() * 1000
            for tp, result in self._records.items():
                if before.get(tp) is not result:
                    responses[(tp.topic, tp.partition)] = (requested, received)

    process = processor.BatchProcessor.process

    async def timed_process(
        self: processor.BatchProcessor, records: Sequence[RawRecord]
    ) -> BatchReport:
        began = time.time() * 1000
        report = await process(self, records)
        done = time.time() * 1000
        batches.append((began, done, len(records)))
        for r in records:
            seen, requested, received = fetched.pop((r.partition, r.offset), (None, None, None))
            row = [r.partition, r.offset, r.timestamp_ms, seen, began, done]
            rows.append([*row, None, requested, received])  # published: filled in at exit
        return report

    publish_fresh = publisher.Publisher.publish_fresh

    async def timed_publish_fresh(
        self: publisher.Publisher, publications: Sequence[Publication]
    ) -> None:
        await publish_fresh(self, publications)
        now = time.time() * 1000
        for p in publications:
            for offset in range(p.start, p.end):
                published[(p.partition, offset)] = now

    tx_exit = asyncpg.transaction.Transaction.__aexit__

    async def timed_exit(self: asyncpg.transaction.Transaction, *exc: Any) -> None:
        began = time.time() * 1000
        try:
            await tx_exit(self, *exc)
        finally:
            commits.append((began, time.time() * 1000 - began))

    def dump() -> None:
        for row in rows:
            row[6] = published.get((row[0], row[1]))
        data = {"rows": rows, "batches": batches, "commits": commits}
        Path(f"{out}-{os.getpid()}.json").write_bytes(orjson.dumps(data))

    consumer.Lane.add = lane_add  # type: ignore[method-assign]
    fetcher_class._proc_fetch_request = timed_proc_fetch
    processor.BatchProcessor.process = timed_process  # type: ignore[method-assign]
    publisher.Publisher.publish_fresh = timed_publish_fresh  # type: ignore[method-assign]
    asyncpg.transaction.Transaction.__aexit__ = timed_exit  # type: ignore[method-assign,assignment]
    atexit.register(dump)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def _stages(rows: Sequence[Row]) -> dict[str, float]:
    n = len(rows)
    spans = {
        "fetch": sum(r[3] - r[2] for r in rows),
        "queue": sum(r[4] - r[3] for r in rows),
        "txn": sum(r[5] - r[4] for r in rows),
        "publish": sum(r[6] - r[5] for r in rows),
    }
    means = {stage: round(total / n, 1) for stage, total in spans.items()}
    result: dict[str, float] = {
        "records": n,
        **means,
        "total": round(sum(r[6] - r[2] for r in rows) / n, 1),
    }
    # The fetch's split at its response, over the records whose response was stamped.
    split = [r for r in rows if len(r) > 8 and r[7] is not None and r[8] is not None]
    if split:
        m = len(split)
        result["fetch_to_worker"] = round(sum(r[8] - r[2] for r in split) / m, 1)
        result["fetch_handover"] = round(sum(r[3] - r[8] for r in split) / m, 1)
        result["fetch_response_ms"] = round(sum(r[8] - r[7] for r in split) / m, 1)
    return result


def breakdown(data: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Mean ms per stage of the records stamped in the last `seconds` (by input
    timestamp), of all of them and of the slowest 1% (total at or above the p99); the
    batches' sizes and durations and the COMMITs' durations over the same window."""
    rows = [r for r in data["rows"] if r[3] is not None and r[6] is not None]
    if not rows:
        return {}
    since = max(r[2] for r in rows) - seconds * 1000
    rows = [r for r in rows if r[2] >= since]
    totals = [r[6] - r[2] for r in rows]
    p99 = percentile(totals, 99)
    result: dict[str, Any] = {
        "p50_ms": round(percentile(totals, 50), 1),
        "p99_ms": round(p99, 1),
        "all": _stages(rows),
        "slowest_1pct": _stages([r for r in rows if r[6] - r[2] >= p99]),
    }
    batches = [b for b in data["batches"] if b[0] >= since]
    if batches:
        sizes, spans = [b[2] for b in batches], [b[1] - b[0] for b in batches]
        result["batches"] = {
            "count": len(batches),
            "records_p50": percentile(sizes, 50),
            "records_p99": percentile(sizes, 99),
            "ms_p50": round(percentile(spans, 50), 1),
            "ms_p99": round(percentile(spans, 99), 1),
        }
    commits = [c[1] for c in data.get("commits", []) if c[0] >= since]
    if commits:
        result["commit_ms"] = {
            "p50": round(percentile(commits, 50), 1),
            "p99": round(percentile(commits, 99), 1),
        }
    return result


def main() -> None:
    install(os.environ.get("BENCH_STAGES_OUT", "bench/results/stages"))
    from worker.cli.main import main as worker_main

    worker_main()


if __name__ == "__main__":
    main()
