"""Closing the worker's clients at shutdown, shared by the worker (worker/app.py) and the
HTTP front end (worker/api/server.py): bounded, so a server that is away cannot hang it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from aiokafka.errors import KafkaError


async def close_bounded(close: Callable[[], Awaitable[Any]], seconds: float = 5.0) -> None:
    """Close a client without hanging on a broker that is away (it may flush or leave)."""
    with contextlib.suppress(KafkaError, TimeoutError):
        async with asyncio.timeout(seconds):
            await close()


async def close_pool(pool: asyncpg.Pool, seconds: float = 5.0) -> None:
    """Close a pool, terminating its connections if they do not close within `seconds`."""
    try:
        async with asyncio.timeout(seconds):
            await pool.close()
    except TimeoutError:
        pool.terminate()
