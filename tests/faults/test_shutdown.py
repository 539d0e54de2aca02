"""SIGTERM in the middle of a batch (G5), and a second signal that exits at once."""

from __future__ import annotations

import signal

import pytest

from tests.faults.conftest import BedFactory
from worker.embedded import free_port

pytestmark = pytest.mark.faults


async def test_sigterm_mid_batch_exits_0_in_time_and_a_second_signal_exits_at_once(
    bed_factory: BedFactory,
) -> None:
    async with bed_factory(shutdown_timeout_s=20, batch_max_records=300) as bed:
        await bed.seed(carts=2_000)
        stream = bed.stream()
        await bed.produce(stream.events)

        first = await bed.start_worker()
        await bed.wait_applied(1)
        open_tx = await bed.wait_worker_transaction()
        before = await bed.applied()
        code, seconds = await first.terminate(25)
        after = await bed.applied()
        assert code == 0, first.tail()
        assert seconds < 20
        assert await bed.outbox_left() == 0, "G5: the outbox is published before exit"

        second = await bed.start_worker()
        await bed.wait_applied(after + 1)
        await bed.wait_worker_transaction()
        await second.signal(signal.SIGTERM)
        await second.signal(signal.SIGINT)
        code2, seconds2 = await second.wait(5)
        # Two pending signals are delivered in signal-number order, not sending order:
        # whichever came second makes the worker exit at once with 128 + its number.
        assert code2 in (128 + signal.SIGINT, 128 + signal.SIGTERM), second.tail()
        assert second.log_lines("second_signal_exiting_now") == 1

        await bed.start_worker()
        await bed.check(
            stream,
            f"SIGTERM while {len(open_tx)} worker transaction(s) were open at {before} applied "
            f"records: exit {code} after {seconds:.2f}s with {after} applied and the outbox "
            f"empty; then SIGTERM+SIGINT mid-batch: exit {code2} after {seconds2:.2f}s",
        )


async def test_sigterm_while_the_database_is_awaited_at_start_exits_0(
    bed_factory: BedFactory,
) -> None:
    async with bed_factory() as bed:
        nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
        worker = await bed.start_worker(database_url=nowhere)
        await bed.wait_log(worker, "transient_failure_retrying")
        code, seconds = await worker.terminate(10)
        print(
            f"\n[fault] SIGTERM while the database was unreachable at start: exit {code} "
            f"after {seconds:.2f}s"
        )
        assert code == 0, worker.tail()
