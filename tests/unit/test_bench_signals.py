"""A bench stopped by SIGTERM or SIGINT stops its child processes (a SIGTERM left the
workers it started running)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# The shape of the bench's runs (bench/run.py): children started under
# `stopped_by_signals`, stopped in a `finally`.
HARNESS = """
import asyncio, sys
from pathlib import Path
from bench.observe import Processes, stopped_by_signals

async def main() -> None:
    async with stopped_by_signals():
        sleeper = ["timeit", "-n", "1", "-r", "1", "import time; time.sleep(600)"]
        procs = Processes(sleeper, {}, Path(sys.argv[1]))
        procs.start()
        try:
            print(procs.procs[0].pid, flush=True)
            await asyncio.sleep(600)
        finally:
            await procs.stop(timeout_s=30)

asyncio.run(main())
"""


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_bench_stopped_by_a_signal_stops_its_children(tmp_path: Path, sig: int) -> None:
    harness = subprocess.Popen(
        [sys.executable, "-c", HARNESS, str(tmp_path / "children.log")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    child = None
    try:
        assert harness.stdout is not None
        child = int(harness.stdout.readline())
        harness.send_signal(sig)
        harness.wait(timeout=60)
        assert not _running(child), "the bench's child outlived it"
    finally:
        if harness.poll() is None:
            harness.kill()
        if child is not None and _running(child):
            subprocess.run(["kill", "-KILL", str(child)], check=False)
