"""Settings: documented, defaulted, validated at start-up, and the README table in step."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from worker.cli.main import app
from worker.cli.settings_doc import END, START, embedded_table, settings_table
from worker.config import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_every_setting_has_a_description_and_a_default() -> None:
    for name, info in Settings.model_fields.items():
        assert len(info.description or "") > 10, name
        assert not info.is_required(), name
    Settings()  # the defaults themselves are valid


def test_config_command_prints_the_table_with_every_variable() -> None:
    result = CliRunner().invoke(app, ["config"])
    assert result.exit_code == 0
    assert result.stdout.strip() == settings_table()
    for name in Settings.model_fields:
        assert f"`WORKER_{name.upper()}`" in result.stdout


@pytest.mark.parametrize("document", ["README.md", "docs/operations.md"])
def test_documented_settings_table_matches_the_settings_class(document: str) -> None:
    path = ROOT / document
    text = path.read_text() if path.exists() else ""
    table = embedded_table(text)
    assert table is not None, (
        f"{document} lacks the settings table: put the output of `release-worker config` "
        f"between the lines {START} and {END}"
    )
    assert table == settings_table(), (
        f"The settings table in {document} is out of date: replace what is between "
        f"{START} and {END} with the output of `release-worker config`"
    )


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("WORKER_LANES", "0", "greater than or equal to 1"),
        ("WORKER_BATCH_MAX_RECORDS", "many", "valid integer"),
        ("WORKER_COMPRESSION", "brotli", "'none', 'gzip', 'lz4', 'zstd' or 'snappy'"),
        ("WORKER_EXPIRY_ENABLED", "perhaps", "valid boolean"),
        ("WORKER_KAFKA_BOOTSTRAP", "broker-without-port", "host:port"),
        ("WORKER_DLQ_TOPIC", "cart.abandoned", "must differ from WORKER_INPUT_TOPIC"),
        ("WORKER_RETRY_MAX_S", "0.01", "at least WORKER_RETRY_INITIAL_S"),
        ("WORKER_STALL_TIMEOUT_S", "5", "exceed WORKER_REBALANCE_DRAIN_TIMEOUT_S"),
        ("WORKER_PRODUCER_IDEMPOTENCE", "true", "needs WORKER_PRODUCER_ACKS=all"),
        ("WORKER_LOCK_TIMEOUT_MS", "5000", "below WORKER_STATEMENT_TIMEOUT_MS"),
    ],
)
def test_invalid_setting_stops_start_up_naming_the_variable(
    variable: str, value: str, says: str
) -> None:
    env = {variable: value, "WORKER_PRODUCER_ACKS": "1"}  # 1 is valid, except with idempotence
    result = CliRunner().invoke(app, ["run"], env=env)
    assert result.exit_code == 2
    assert "Invalid configuration" in result.stderr
    line = next(x for x in result.stderr.splitlines() if variable in x)
    assert says in line


def test_invalid_database_url_is_named_without_echoing_its_password() -> None:
    result = CliRunner().invoke(
        app, ["run"], env={"WORKER_DATABASE_URL": "mysql://app:s3cret-pw@db/shop"}
    )
    assert result.exit_code == 2
    assert "WORKER_DATABASE_URL" in result.stderr
    assert "s3cret-pw" not in result.output


@pytest.mark.parametrize("instance", [None, "worker-0"])
async def test_group_instance_id_is_the_consumers_static_membership(instance: str | None) -> None:
    from worker.app import make_consumer

    settings = Settings(kafka_bootstrap="127.0.0.1:9", group_instance_id=instance)
    # aiokafka sends it in JoinGroup/SyncGroup/Heartbeat, and a static member does not send
    # LeaveGroup when it stops (docs/operations.md: Scaling).
    assert make_consumer(settings)._group_instance_id == instance
