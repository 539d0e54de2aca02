"""`release-worker offsets`: where each input partition stands, in PostgreSQL and in Kafka."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from worker.cli.common import (
    JSON_OPTION_HELP,
    database,
    load_settings,
    print_rows,
    reflowed,
    required,
    run,
)
from worker.config import Settings


@reflowed
def offsets(
    as_json: Annotated[bool, typer.Option("--json", help=JSON_OPTION_HELP)] = False,
) -> None:
    """Per partition of the input topic: the next offset stored in PostgreSQL (what the
    worker applied; the truth), the offset committed to Kafka for the group, the high-water
    mark (the offset the next record will get) and the lag (high-water mark minus the
    PostgreSQL offset: records not applied yet).

    The Kafka offset trails the PostgreSQL one by up to WORKER_COMMIT_INTERVAL_MS and is
    never ahead of it; a new owner of a partition starts from the PostgreSQL offset.
    Changes nothing and joins no group.
    """
    settings = load_settings()
    rows = run(lambda: partition_offsets(settings))
    print_rows(
        rows,
        ["partition", "database", "kafka", "high_water", "lag", "note"],
        as_json,
        title=f"{settings.input_topic} (group {settings.group_id})",
    )


async def partition_offsets(settings: Settings) -> list[dict[str, Any]]:
    from worker import store
    from worker.cli import kafka

    bootstrap = required(settings.kafka_bootstrap, "WORKER_KAFKA_BOOTSTRAP")
    async with database(settings) as pool:
        stored = await store.stored_offsets(pool, settings.group_id, settings.input_topic)
    async with kafka.consumer(bootstrap, group_id=settings.group_id) as client:
        tps = await kafka.partitions(client, settings.input_topic)
        committed = {tp.partition: await client.committed(tp) for tp in tps}
        # The applied offset is at most the high-water mark: fetching from there is cheap.
        marks = await kafka.highwaters(client, tps, near=stored)
    rows = []
    for tp in tps:
        p = tp.partition
        db, committed_p, high = stored.get(p), committed.get(p), marks[p]
        lag = high - (db or 0)
        rows.append(
            {
                "partition": p,
                "database": db,
                "kafka": committed_p,
                "high_water": high,
                "lag": lag,
                "note": _note(db, committed_p, high),
            }
        )
    return rows


def _note(db: int | None, committed: int | None, high: int) -> str:
    if committed is not None and (db is None or committed > db):
        return "Kafka ahead of PostgreSQL: not written by this worker's group?"
    if db is None:
        return "nothing applied yet" if high else "empty"
    if db < high:
        return "behind"
    return "caught up"
