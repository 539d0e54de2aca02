"""The configuration table of the README, generated from `Settings`.

`release-worker config` prints it; the README (and docs/operations.md) hold a copy
between the markers below, and a unit test fails when the copy drifts.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from annotated_types import Ge, Gt, Le, Lt, MinLen
from pydantic.fields import FieldInfo

from worker.config import Settings

START = "<!-- settings-table:start -->"
END = "<!-- settings-table:end -->"

_TYPE_NAMES = {bool: "`true` / `false`", int: "integer", float: "number", str: "text"}
_BOUNDS = ((Ge, "ge", "≥"), (Gt, "gt", ">"), (Le, "le", "≤"), (Lt, "lt", "<"))


def settings_table() -> str:
    lines = [
        "| Variable | Default | Allowed | Description |",
        "|---|---|---|---|",
    ]
    for name, info in Settings.model_fields.items():
        cells = (f"`WORKER_{name.upper()}`", _default(info), _allowed(info), info.description)
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def embedded_table(document: str) -> str | None:
    """The table between the markers of a document, or None if the markers are missing."""
    start, end = document.find(START), document.find(END)
    if start < 0 or end < start:
        return None
    return document[start + len(START) : end].strip()


def _default(info: FieldInfo) -> str:
    value = info.default
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def _allowed(info: FieldInfo) -> str:
    annotation: Any = info.annotation
    if typing.get_origin(annotation) is typing.Literal:
        return ", ".join(f"`{choice}`" for choice in typing.get_args(annotation))
    if isinstance(annotation, types.UnionType):  # `str | None`: unset is the other choice
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    text = _TYPE_NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))
    bounds = [
        f"{symbol} {getattr(m, attribute)}"
        for m in info.metadata
        for kind, attribute, symbol in _BOUNDS
        if isinstance(m, kind)
    ]
    if any(isinstance(m, MinLen) for m in info.metadata):
        bounds.append("not empty")
    return text + (" " + ", ".join(bounds) if bounds else "")


def _cell(text: str | None) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ")
