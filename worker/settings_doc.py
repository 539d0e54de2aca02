"""The configuration table of the README, generated from `Settings`."""

from __future__ import annotations

from worker.config import Settings


def settings_table() -> str:
    lines = ["| Variable | Default | Description |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = "(unset)" if field.default is None else f"`{field.default}`"
        lines.append(f"| `WORKER_{name.upper()}` | {default} | {field.description} |")
    return "\n".join(lines)
