"""Logging: structlog set-up (JSON in production, console in the demo) and line budgets.

Per-record context is bound once with `structlog.contextvars.bound_contextvars`.
The API key is never bound or logged; a processor drops it if it ever appears.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, MutableMapping
from typing import Any, TextIO

import structlog

_SECRET_KEYS = frozenset({"api_key", "rokt-api-key", "rokt_api_key", "password"})


def _drop_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in _SECRET_KEYS & event.keys():
        event[key] = "[redacted]"
    return event


def configure(log_format: str = "json", level: str = "info", stream: TextIO | None = None) -> None:
    """`stream`: where the lines go (standard output by default; the operator commands
    write theirs to standard error, away from their own output)."""
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _drop_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    # aiokafka logs through the standard library; keep its noise at warning.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.ERROR)


class LineBudget:
    """At most `per_second` lines of one event per second (a fixed one-second window).

    For events a sender can cause in volume: `take()` says whether a line may be
    written, and how many were held back since the last one written (log that number
    with it, so nothing is hidden, only aggregated). Metrics stay exact regardless.
    """

    def __init__(self, per_second: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._per_second = per_second
        self._clock = clock
        self._window = float("-inf")
        self._written = 0
        self._held_back = 0

    def take(self) -> int | None:
        """None: do not write this line. Else write it with this many lines held back."""
        now = self._clock()
        if now - self._window >= 1.0:
            self._window, self._written = now, 0
        if self._written >= self._per_second:
            self._held_back += 1
            return None
        self._written += 1
        held_back, self._held_back = self._held_back, 0
        return held_back
