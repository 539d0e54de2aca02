from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Servers
from tests.faults.harness import Bed, fault_bed

BedFactory = Callable[..., AbstractAsyncContextManager[Bed]]


@pytest.fixture
def bed_factory(servers: Servers, tmp_path: Path) -> BedFactory:
    """`async with bed_factory(partitions=..., **settings) as bed:` on the session's servers."""

    def make(**overrides: Any) -> AbstractAsyncContextManager[Bed]:
        return fault_bed(
            servers.database_url,
            servers.bootstrap,
            tmp_path,
            worker_database_url=servers.worker_database_url,
            **overrides,
        )

    return make


@pytest.fixture
async def bed(bed_factory: BedFactory) -> AsyncIterator[Bed]:
    async with bed_factory() as b:
        yield b
