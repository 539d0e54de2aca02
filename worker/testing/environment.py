"""Settings as WORKER_* environment variables, for starting `release-worker` processes."""

from __future__ import annotations

from typing import Any

from worker.config import Settings


def settings_env(settings: Settings, **overrides: Any) -> dict[str, str]:
    """The WORKER_* variables that make a `release-worker` process use these settings,
    with `overrides` (field names of `Settings`) in place of theirs. Unset ones are left out."""
    env = {}
    for name, value in (settings.model_dump() | overrides).items():
        if value is None:
            continue
        text = str(value).lower() if isinstance(value, bool) else str(value)
        env[f"WORKER_{name.upper()}"] = text
    return env
