"""The bench names a PostgreSQL process's kind from its title."""

from __future__ import annotations

from typing import Any

import pytest

from bench.cpu import kind_of
from bench.report import postgres_kinds_lines


@pytest.mark.parametrize(
    ("title", "kind"),
    [
        ("postgres: postgres postgres 127.0.0.1(51234) idle", "backends"),
        ("postgres: release_worker postgres [local] UPDATE", "backends"),
        ("postgres: autovacuum worker postgres", "autovacuum"),
        ("postgres: autovacuum launcher", "autovacuum"),
        ("postgres: checkpointer", "background"),
        ("postgres: background writer", "background"),
        ("postgres: walwriter", "background"),
        ("postgres: io worker 2", "background"),
        ("postgres: logical replication launcher", "background"),
        ("/opt/pg/bin/postgres -D /tmp/pgdata -h 127.0.0.1", "background"),
    ],
)
def test_a_process_title_names_its_kind(title: str, kind: str) -> None:
    assert kind_of(title) == kind


def test_backlog_and_db_limit_rows_list_postgres_cpu_by_kind() -> None:
    kinds = {"postgres backends": 30.0, "postgres autovacuum": 12.0}
    kinds |= {"postgres background": 6.0, "postgres exited": 2.0}
    row: dict[str, Any] = {"scenario": "steady", "processes": 1}
    row["cpu_us_per_item_by_process"] = kinds
    rows: list[dict[str, Any]] = [
        row | {"system": "worker", "mode": "backlog"},
        row | {"system": "db_limit/pgbench", "mode": "8 connections"},
        row | {"system": "worker", "mode": "open loop 1,000 rec/s"},
        {"scenario": "steady", "system": "worker", "mode": "backlog"},  # measured before
    ]
    rows[0]["cpu_us_per_item_by_process"] = kinds | {"postgres": 50.0}
    assert postgres_kinds_lines(rows) == [
        "PostgreSQL CPU µs/item by process (backends run the statements):",
        "steady · worker · backlog: 50 = backends 30 · autovacuum 12 · background 6 · exited 2",
        "steady · db_limit/pgbench · 8 connections: 0 = backends 30 · autovacuum 12 · "
        "background 6 · exited 2",
    ]
