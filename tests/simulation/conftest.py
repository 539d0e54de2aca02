"""Reports how much the simulation explored, whatever pytest's verbosity."""

from __future__ import annotations

import pytest

from tests.simulation.test_simulation import TALLY


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TALLY:
        return
    faults = {k: v for k, v in TALLY.items() if not k.startswith(("records ", "examples", "steps"))}
    records = {k.removeprefix("records "): v for k, v in TALLY.items() if k.startswith("records ")}
    terminalreporter.write_sep("-", "deterministic simulation")
    terminalreporter.write_line(
        f"simulation: {TALLY['examples']} examples, {TALLY['steps']} steps, "
        f"{sum(faults.values())} faults and events injected, {sum(records.values())} records"
    )
    terminalreporter.write_line(
        "  faults: " + ", ".join(f"{k} {v}" for k, v in sorted(faults.items()))
    )
    terminalreporter.write_line(
        "  records: " + ", ".join(f"{k} {v}" for k, v in sorted(records.items()))
    )
