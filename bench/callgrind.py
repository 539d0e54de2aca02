"""Counting a measurement's instructions with callgrind, shared by the drivers
(`bench.callgrind_driver`, `bench.worker_driver`, `bench.publish_cpu`).

A driver runs itself again as a child under valgrind with instrumentation off
(`count`); the child switches it on around the measured part only (`toggle`) and prints
its figures as one JSON line last, with the `items` it measured. Instructions are
repeatable under load, unlike CPU times."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from worker.cli.main import event_loop_factory

T = TypeVar("T")


def toggle(on: bool) -> None:
    """Switch callgrind's instrumentation of this process; `callgrind_control` answers once
    callgrind has read the command (it polls while this process sleeps)."""
    command = ["callgrind_control", "-i", "on" if on else "off", str(os.getpid())]
    subprocess.run(command, check=True, capture_output=True, timeout=120)


def count(module: str, arguments: Sequence[str], keep: Path | None = None) -> dict[str, float]:
    """Run `python -m module --inner *arguments` under callgrind; return the figures its
    last output line holds, with `instructions_per_item` added and the child's own CPU
    (`worker_cpu_us_per_item`, meaningless under valgrind) left out. `keep`: a copy of
    callgrind's output file."""
    with tempfile.TemporaryDirectory(prefix="callgrind-out-") as out:
        output = Path(out) / "callgrind.out"
        command = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={output}",
            sys.executable,
            "-m",
            module,
            "--inner",
            *arguments,
        ]
        child = subprocess.run(command, capture_output=True, text=True, check=False)
        if child.returncode != 0:
            raise RuntimeError(f"callgrind run failed:\n{child.stderr[-3000:]}")
        figures: dict[str, float] = json.loads(child.stdout.strip().splitlines()[-1])
        totals = re.search(r"^totals: (\d+)", output.read_text(), re.MULTILINE)
        assert totals is not None, "no totals in the callgrind output"
        if keep is not None:
            keep.write_bytes(output.read_bytes())
    figures.pop("worker_cpu_us_per_item", None)
    figures["instructions_per_item"] = round(int(totals[1]) / figures["items"])
    return figures


def run_on(measuring: Coroutine[Any, Any, T], loop: str) -> T:
    """Run a measurement on the event loop `loop` names (`uvloop` or `asyncio`), as
    `release-worker run` does with WORKER_EVENT_LOOP."""
    with asyncio.Runner(loop_factory=event_loop_factory(loop)) as runner:
        return runner.run(measuring)
