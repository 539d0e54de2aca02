"""Requests in flight, each completed by its own results (partner + eventId).

Every `api` process reads the whole results topic and offers each result here. A result
is matched by its headers alone (`partner-id`, `event-id`): one dict lookup, and the
payload is parsed only for a result somebody waits for. Nothing is kept for results
nobody waits for, and at most `limit` events are waited for at once.

Several requests with the same key (concurrent retries with one Idempotency-Key) share
one pending entry: they get the same answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson

from worker.contract import EVENT_ID_HEADER, PARTNER_ID_HEADER, RESULT_COUNT_HEADER

# (partner-id, event-id) as the result headers carry them.
WaitKey = tuple[bytes, bytes]


@dataclass(frozen=True, slots=True)
class Released:
    """The event's item results, by itemReservationId."""

    items: dict[str, dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Refused:
    """The event's `event_rejected`: its status and the page's error body."""

    status: int
    body: dict[str, Any]


Answer = Released | Refused


class TooManyWaiters(Exception):
    """The process already waits for `limit` events; the request is refused (503)."""


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[Answer]
    expected: int | None  # items the request named; None: a whole cart (the header says)
    items: dict[str, dict[str, Any]] = field(default_factory=dict)
    waiters: int = 0


class Waiters:
    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._pending: dict[WaitKey, _Pending] = {}
        self.matched = 0  # results that completed or fed a waiter
        self.ignored = 0  # results nobody here waits for
        self.malformed = 0  # awaited keys whose value was not a result

    def __len__(self) -> int:
        return len(self._pending)

    @contextmanager
    def waiting(self, key: WaitKey, expected: int | None) -> Iterator[asyncio.Future[Answer]]:
        """Register before the record is produced; the entry goes when the last waiter of
        the key leaves, answered or not (a late result then finds nobody and is dropped)."""
        pending = self._pending.get(key)
        if pending is None:
            if len(self._pending) >= self._limit:
                raise TooManyWaiters
            future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
            pending = self._pending[key] = _Pending(future, expected)
        pending.waiters += 1
        try:
            yield pending.future
        finally:
            pending.waiters -= 1
            if pending.waiters == 0:
                del self._pending[key]

    def offer(self, headers: Any, value: bytes | None) -> None:
        """One consumed result: its headers as (name, value) pairs, and its value."""
        if not self._pending:
            self.ignored += 1
            return
        partner = event = count = None
        for name, header in headers:
            if name == PARTNER_ID_HEADER:
                partner = header
            elif name == EVENT_ID_HEADER:
                event = header
            elif name == RESULT_COUNT_HEADER:
                count = header
        # Rejections without a partner (400 before authentication, 401) are not matched:
        # the api authenticates first, so its records are not rejected so early.
        pending = self._pending.get((partner, event)) if partner and event else None
        if pending is None or pending.future.done() or not value:
            self.ignored += 1
            return
        self.matched += 1
        try:
            result = orjson.loads(value)
            if result["type"] == "event_rejected":
                body = {"description": result["description"], "errors": result["errors"]}
                pending.future.set_result(Refused(int(result["status"]), body))
                return
            pending.items[str(result["itemReservationId"])] = result
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            # Not a result the worker wrote (another producer on the topic): the reader
            # goes on, and this request ends as a 504 if its own results never come.
            self.malformed += 1
            return
        expected = int(count) if count and count.isdigit() else pending.expected
        if expected is not None and len(pending.items) >= expected:
            pending.future.set_result(Released(pending.items))
