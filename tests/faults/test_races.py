"""Explicit releases, the expiry sweeper of two workers and confirmations race (DESIGN §5)."""

from __future__ import annotations

import asyncio

import pytest

from tests.faults.conftest import BedFactory

pytestmark = pytest.mark.faults


async def test_release_expiry_and_confirmation_racing_on_the_same_reservations(
    bed_factory: BedFactory,
) -> None:
    async with bed_factory(
        expiry_enabled=True, expiry_interval_s=0.2, expiry_batch_size=50, batch_max_records=50
    ) as bed:
        # Half the reservations are overdue: the sweepers race the events for them.
        await bed.seed(carts=1_500, overdue_share=0.5)
        stream = bed.stream()
        for outcomes in stream.expected.values():
            for rid in outcomes:
                outcomes[rid] = None  # any outcome the race allows; `check` verifies it
        await bed.start_worker()
        await bed.start_worker()
        producing = asyncio.create_task(bed.produce(stream.events))
        confirmed: set[str] = set()
        rounds = 0
        while not producing.done() or await bed.applied() < len(stream.events):
            cart = bed.rng.randrange(bed.carts)
            confirmed |= await bed.confirm([bed.rid(cart, i) for i in range(3)])
            rounds += 1
            await asyncio.sleep(0.005)
        await producing
        counts = await bed.check(
            stream,
            f"{rounds} confirmations by SQL ({len(confirmed)} reservations confirmed) racing "
            "explicit releases and two workers' sweepers (interval 0.2s) over 50% overdue "
            "reservations",
            confirmed_by_test=confirmed,
            expiry_possible=True,
        )
        assert counts.expired > 0
        assert counts.confirmed == len(confirmed) > 0
