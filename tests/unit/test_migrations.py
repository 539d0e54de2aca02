"""The code's schema version and the migration files stay in step."""

from __future__ import annotations

import re

from worker.migrate import MIGRATIONS, dbmate_url, latest_migration, migration_files
from worker.store import SCHEMA_VERSION


def test_schema_version_is_the_newest_migration() -> None:
    assert latest_migration() == SCHEMA_VERSION, (
        "a migration was added: update worker.store.SCHEMA_VERSION so that `run` "
        "refuses databases without it"
    )


def test_every_migration_has_an_up_and_a_down_section() -> None:
    files = migration_files()
    assert files
    for name in files:
        assert re.fullmatch(r"\d{14}_[a-z0-9_]+\.sql", name), name
        text = (MIGRATIONS / name).read_text()
        assert "-- migrate:up" in text, name
        assert "-- migrate:down" in text, name


def test_dbmate_url_accepts_tcp_and_socket_urls() -> None:
    assert (
        dbmate_url("postgresql://postgres@127.0.0.1:5433/db")
        == "postgres://postgres@127.0.0.1:5433/db?sslmode=disable"
    )
    assert (
        dbmate_url("postgresql://postgres:@/postgres?host=/tmp/dir")
        == "postgres://postgres:@/postgres?socket=%2Ftmp%2Fdir&sslmode=disable"
    )
