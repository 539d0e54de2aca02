"""The operator commands' own behaviour without servers: help, selection, unreachable
servers (their work against the real servers: tests/integration/test_operator_commands.py)."""

from __future__ import annotations

import socket

import pytest
from typer.testing import CliRunner

from worker.cli.main import app

COMMANDS = [
    ["offsets"],
    ["outbox"],
    ["outbox", "retry"],
    ["outbox", "drop"],
    ["tail"],
    ["inspect", "cart"],
    ["dlq", "list"],
    ["dlq", "show"],
    ["dlq", "redrive"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_operator_command_explains_itself(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    # The summary is a sentence of the command's own, not typer's bare usage line.
    described = result.stdout.split("Usage:", 1)[1].split("\n", 2)[2]
    assert len(described.split("╭", 1)[0].split()) >= 12, result.stdout


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_unreachable_database_is_a_message_and_exit_1_not_a_wait() -> None:
    env = {
        "WORKER_DATABASE_URL": f"postgresql://nobody:s3cret@127.0.0.1:{closed_port()}/shop",
        "WORKER_KAFKA_BOOTSTRAP": f"127.0.0.1:{closed_port()}",
    }
    result = CliRunner().invoke(app, ["outbox"], env=env)
    assert result.exit_code == 1
    assert "could not be reached" in result.stderr
    assert "s3cret" not in result.output


def test_redrive_without_positions_filters_or_all_changes_nothing_and_says_how() -> None:
    result = CliRunner().invoke(app, ["dlq", "redrive"], env={"WORKER_KAFKA_BOOTSTRAP": "x:1"})
    assert result.exit_code == 2
    assert "--all" in result.stdout
