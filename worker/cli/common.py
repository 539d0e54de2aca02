"""What the operator commands share: settings, bounded connections, tables or JSON lines.

An operator command must answer, not wait: unlike the worker, which waits out an outage,
these connect with a bounded timeout and say which server could not be reached.
"""

from __future__ import annotations

import asyncio
import getpass
import inspect
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, TextIO, TypeVar, cast

import asyncpg
import orjson
import typer
from pydantic import ValidationError

from worker.config import Settings

T = TypeVar("T")

CONNECT_TIMEOUT_S = 10.0

JSON_OPTION_HELP = "Print JSON lines (one object a line) instead of a table."


F = TypeVar("F", bound=Callable[..., Any])


def reflowed(command: F) -> F:
    """Join the lines of each paragraph of the command's docstring: typer keeps the line
    breaks of every paragraph but the first, which makes `--help` ragged."""
    command.__doc__ = reflow(command.__doc__ or "")
    return command


def reflow(text: str) -> str:
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


def load_settings(**overrides: object) -> Settings:
    """The settings from WORKER_*; an invalid one exits 2 naming the variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        lines = []
        for e in error.errors():
            name = "WORKER_" + "_".join(str(p) for p in e["loc"]).upper()
            # A database URL may carry a password: never echo it.
            got = "" if "DATABASE_URL" in name else f" (got {e.get('input')!r})"
            lines.append(f"  {name}: {e['msg']}{got}")
        typer.echo("Invalid configuration:\n" + "\n".join(lines), err=True)
        raise typer.Exit(2) from None


def required(value: str | None, variable: str) -> str:
    if not value:
        typer.echo(f"{variable} must be set for this command.", err=True)
        raise typer.Exit(2)
    return value


def run(work: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run an async command body; a server that cannot be reached is a message and exit 1."""
    from aiokafka.errors import KafkaError

    try:
        return asyncio.run(work())
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        typer.echo(f"error: PostgreSQL: {_reason(error)}", err=True)
    except KafkaError as error:
        typer.echo(f"error: Kafka: {_reason(error)}", err=True)
    except (OSError, TimeoutError) as error:
        typer.echo(f"error: a server could not be reached: {_reason(error)}", err=True)
    raise typer.Exit(1)


def _reason(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text.splitlines()[0][:300]


@asynccontextmanager
async def database(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    """A small pool on WORKER_DATABASE_URL (the worker's own login and grants)."""
    url = required(settings.database_url, "WORKER_DATABASE_URL")
    pool = await asyncpg.create_pool(
        url,
        min_size=1,
        max_size=2,
        timeout=CONNECT_TIMEOUT_S,
        server_settings={
            "statement_timeout": str(settings.statement_timeout_ms),
            "lock_timeout": str(settings.lock_timeout_ms),
            "application_name": "release-worker-cli",
        },
    )
    try:
        yield pool
    finally:
        await pool.close()


def audit_logging(settings: Settings) -> None:
    """Log lines (JSON by default, WORKER_LOG_FORMAT) to standard error: the commands that
    change something log who ran them, when and what, away from their own output."""
    from worker import logs

    logs.configure(settings.log_format, settings.log_level, stream=cast(TextIO, _Stderr()))


class _Stderr:
    """Whatever `sys.stderr` is when a line is written (a test runner swaps it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def operator() -> str:
    """Who runs the command (the OS user), for the audit log lines."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container with an arbitrary uid)
        return "unknown"


def parse_time(text: str) -> datetime:
    """An ISO 8601 time (`2026-12-03T07:00:00Z`, or without zone: UTC)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not an ISO 8601 time, e.g. 2026-12-03T07:00:00Z"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value


def print_rows(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    as_json: bool,
    title: str | None = None,
    empty: str = "(none)",
) -> None:
    """Rows as JSON lines (every key of each row) or as a rich table of `columns`."""
    if as_json:
        for row in rows:
            typer.echo(orjson.dumps({k: jsonable(v) for k, v in row.items()}, default=str).decode())
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not rows:
        console.print(f"{title + ': ' if title else ''}{empty}")
        return
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    console.print(table)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    return str(jsonable(value))
