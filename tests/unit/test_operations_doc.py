"""docs/operations.md lists every log event the code emits (the metrics are checked
against a live /metrics in tests/integration/test_ops.py)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LEVELS = {"debug", "info", "warning", "error", "exception", "critical"}


def emitted_events() -> set[str]:
    """First arguments of `log.<level>("event", ...)` calls in worker/."""
    events = set()
    for path in (ROOT / "worker").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in LEVELS
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "log"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                events.add(node.args[0].value)
    return events


def test_every_log_event_is_documented() -> None:
    doc = (ROOT / "docs" / "operations.md").read_text()
    events = emitted_events()
    assert {"worker_started", "record_rejected", "batch_applied"} <= events
    missing = sorted(e for e in events if f"`{e}`" not in doc)
    assert not missing, f"log events missing from docs/operations.md (Logs): {missing}"
