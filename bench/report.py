"""Figures of a bench run: the measurement record, the table, the JSON and the plots."""

from __future__ import annotations

import bisect
import itertools
import math
import platform
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

from bench.cpu import KINDS


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted values; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Measurement:
    """One system on one scenario, in one mode (backlog = everything waiting at start)."""

    system: str
    scenario: str
    mode: str
    records: int
    items: int
    seconds: float
    processes: int = 1
    offered_rate: float | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)  # to the result's timestamp
    read_latency_ms: dict[str, float] = field(default_factory=dict)  # to our read of it
    peak_rss_mb: float | None = None
    cpu_s: float | None = None  # CPU time of the system's processes, start-up included
    # CPU seconds by process group (system, postgres, broker, harness) during the steady
    # part of the run (bench/run.py: after start-up), and the items completed in it.
    cpu_split_s: dict[str, float] = field(default_factory=dict)
    cpu_items: int | None = None  # None: all `items`
    drain_s: float | None = None
    checks: dict[str, Any] = field(default_factory=dict)
    throughput_series: list[tuple[float, float]] = field(default_factory=list)  # (s, items/s)
    latency_series: list[tuple[float, float, float]] = field(default_factory=list)  # p50, p99
    memory_series: list[tuple[float, float]] = field(default_factory=list)  # (s, MiB)
    # The scale scenario: one entry per step (`scale_figures`), and (s since the stream
    # started, records answered/s, records waiting) every 0.25 s.
    steps: list[dict[str, Any]] = field(default_factory=list)
    scale_series: list[tuple[float, float, float]] = field(default_factory=list)

    @property
    def records_per_s(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_us_per_item(self) -> float | None:
        """CPU the system under test spent per item (start-up included, so an upper bound)."""
        return None if self.cpu_s is None or not self.items else 1e6 * self.cpu_s / self.items

    @property
    def cpu_us_per_item_by_process(self) -> dict[str, float]:
        """CPU per item of each process group over the steady window (`cpu_split_s`)."""
        cpu_items = self.cpu_items or self.items
        if not cpu_items:
            return {}
        return {name: round(1e6 * s / cpu_items, 1) for name, s in self.cpu_split_s.items()}

    @property
    def correct(self) -> bool:
        return all(v is True for k, v in self.checks.items() if k.startswith("ok_"))

    @property
    def label(self) -> str:
        return self.system if self.processes == 1 else f"{self.system} ×{self.processes}"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            records_per_s=round(self.records_per_s, 1),
            items_per_s=round(self.items_per_s, 1),
            cpu_us_per_item_by_process=self.cpu_us_per_item_by_process,
            cpu_us_per_item=None
            if self.cpu_us_per_item is None
            else round(self.cpu_us_per_item, 1),
            correct=self.correct,
        )
        return data


def scale_figures(
    sent_ms: Sequence[int],
    answered_ms: Sequence[int],
    changes: Sequence[tuple[int, int]],
    stream_end_ms: int,
    tick_ms: int = 250,
) -> tuple[list[dict[str, Any]], list[tuple[float, float, float]]]:
    """Per step of a scale run: the longest time with no record answered and the most
    records waiting (produced, not yet answered), from the records' send times and the
    times their last result was published. `changes` holds (unix ms, processes) for each
    step's start; the last step lasts until the stream ended and every record was answered.
    Also the series for the plot, one point per `tick_ms`."""
    sent, answered = sorted(sent_ms), sorted(answered_ms)
    if not sent or not answered or not changes:
        return [], []
    start = changes[0][0]
    end = max(stream_end_ms, answered[-1])
    bounds = [c for c, _ in changes[1:]] + [end]
    # Each gap between two answers (the stream's start counts as one) goes to every step
    # it overlaps: a pause across a step change shows in both.
    moments = [start, *(a for a in answered if a >= start)]
    gaps = list(itertools.pairwise(moments))

    def waiting(t: int) -> int:
        return bisect.bisect_right(sent, t) - bisect.bisect_right(answered, t)

    steps = []
    for (begin, processes), finish in zip(changes, bounds, strict=True):
        longest = max((b - a for a, b in gaps if b > begin and a < finish), default=0)
        peak = max(waiting(t) for t in range(begin, finish + 1, tick_ms))
        steps.append(
            {
                "processes": processes,
                "seconds": round((finish - begin) / 1000, 1),
                "answered": bisect.bisect_left(answered, finish)
                - bisect.bisect_left(answered, begin),
                "longest_gap_ms": longest,
                "peak_waiting": peak,
            }
        )
    series = [
        (
            round((t - start) / 1000, 2),
            (bisect.bisect_right(answered, t) - bisect.bisect_right(answered, t - tick_ms))
            * 1000
            / tick_ms,
            float(waiting(t)),
        )
        for t in range(start, end + 1, tick_ms)
    ]
    return steps, series


def latency_figures(samples_ms: Sequence[float]) -> dict[str, float]:
    return {f"p{q}": round(percentile(samples_ms, q), 1) for q in (50, 95, 99)} | {
        "max": round(max(samples_ms), 1) if samples_ms else math.nan
    }


def baseline(measurements: Sequence[Measurement], system: str) -> Measurement | None:
    return next(
        (
            m
            for m in measurements
            if m.system == system and m.scenario == "steady" and m.offered_rate is None
        ),
        None,
    )


BASELINES = ("naive", "db_limit/pgbench", "db_limit/asyncpg", "kafka_pipe")


def ratios(m: Measurement, measurements: Sequence[Measurement]) -> dict[str, float]:
    """items/s of a worker run over each steady baseline's."""
    if not m.system.startswith("worker") or m.offered_rate is not None:
        return {}  # an open-loop run goes as fast as it is offered: no ratio to a maximum
    found = {}
    for name in BASELINES:
        base = baseline(measurements, name)
        if base is not None and base.items_per_s > 0:
            found[name] = round(m.items_per_s / base.items_per_s, 3)
    return found


def sustained(measurements: Sequence[Measurement], target_ms: float) -> dict[str, Any]:
    """The HTTP path's highest offered rate answered correctly, with every answer a 200
    and p99 within `target_ms`; and the lowest rate above it that was not."""
    rows = [m for m in measurements if m.system == "api+worker" and m.offered_rate]
    passed = [m.offered_rate or 0 for m in rows if m.correct and m.checks["within_p99_target"]]
    best = max(passed, default=None)
    failed = [
        m.offered_rate or 0
        for m in rows
        if not m.checks["within_p99_target"] and (best is None or (m.offered_rate or 0) > best)
    ]
    return {
        "p99_target_ms": target_ms,
        "rate": None if best is None else round(best, 1),
        "lowest_failing_rate": round(min(failed), 1) if failed else None,
    }


def postgres_kinds_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """For each backlog and db_limit row, PostgreSQL's CPU per item by kind of process
    (`bench.cpu.PostgresKinds`): the statements' backends against the server's catching up."""
    lines = []
    for m in rows:
        by = m.get("cpu_us_per_item_by_process", {})
        if "postgres backends" not in by or not (
            m["mode"] == "backlog" or m["system"].startswith("db_limit")
        ):
            continue
        system = m["system"] if m.get("processes", 1) == 1 else f"{m['system']} ×{m['processes']}"
        parts = " · ".join(f"{kind} {by[f'postgres {kind}']:,.0f}" for kind in KINDS)
        lines.append(
            f"{m['scenario']} · {system} · {m['mode']}: {by.get('postgres', 0):,.0f} = {parts}"
        )
    if lines:
        lines.insert(0, "PostgreSQL CPU µs/item by process (backends run the statements):")
    return lines


def sustained_line(found: dict[str, Any]) -> str:
    target = f"p99 ≤ {found['p99_target_ms']:,.0f} ms"
    if found["rate"] is None:
        return f"The api sustained no rate tried with {target} and every answer a 200."
    above = found["lowest_failing_rate"]
    return (
        f"Highest rate the api sustained with {target} and every answer a 200: "
        f"{found['rate']:,.0f} req/s"
        + ("" if above is None else f" ({above:,.0f} req/s did not)")
        + "."
    )


def _ms(value: float | None) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:,.0f}"


def cpu_split_text(system: str, by_process: Mapping[str, float]) -> str:
    """`system · postgres · broker · harness` CPU µs per item, `—` where not measured."""
    if not by_process:
        return "—"
    return " · ".join(_ms(by_process.get(k)) for k in (system, "postgres", "broker", "harness"))


def table(measurements: Sequence[Measurement]) -> Table:
    t = Table(title="cart-release-worker bench", header_style="bold")
    for name, justify in (
        ("scenario", "left"),
        ("system", "left"),
        ("mode", "left"),
        ("records", "right"),
        ("records/s", "right"),
        ("items/s", "right"),
        ("p50 ms", "right"),
        ("p95 ms", "right"),
        ("p99 ms", "right"),
        ("peak RSS MiB", "right"),
        ("CPU µs/item: system · postgres · broker · harness", "right"),
        ("× naive", "right"),
        ("% pgbench", "right"),
        ("% asyncpg", "right"),
        ("% pipe", "right"),
        ("correct", "center"),
    ):
        t.add_column(name, justify=justify)  # type: ignore[arg-type]
    for m in measurements:
        r = ratios(m, measurements)
        t.add_row(
            m.scenario,
            m.label,
            m.mode,
            f"{m.records:,}",
            f"{m.records_per_s:,.0f}",
            f"{m.items_per_s:,.0f}",
            _ms(m.latency_ms.get("p50")),
            _ms(m.latency_ms.get("p95")),
            _ms(m.latency_ms.get("p99")),
            "—" if m.peak_rss_mb is None else f"{m.peak_rss_mb:,.0f}",
            cpu_split_text(m.system, m.cpu_us_per_item_by_process),
            f"{r['naive']:.1f}×" if "naive" in r else "",
            f"{100 * r['db_limit/pgbench']:.0f}%" if "db_limit/pgbench" in r else "",
            f"{100 * r['db_limit/asyncpg']:.0f}%" if "db_limit/asyncpg" in r else "",
            f"{100 * r['kafka_pipe']:.0f}%" if "kafka_pipe" in r else "",
            "[green]yes[/]" if m.correct else "[red]NO[/]",
        )
    return t


def python_speed_ms() -> float:
    """This machine's speed for pure Python, to compare runs across machines: the best of 5
    `sum(range(10**6))`, in ms (lower is faster). Machines of one kind differ: 20261203T143147Z
    and 20261203T172603Z, both `AMD EPYC`, gave `kafka_pipe` 107,914 and 55,633 items/s."""
    import timeit

    return round(min(timeit.repeat("sum(range(10**6))", number=5, repeat=5)) / 5 * 1000, 1)


def machine() -> dict[str, Any]:
    import os

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = next(
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal:")
        )
    except (OSError, StopIteration):
        mem_kb = 0
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        # Other work on the machine skews every figure: the load when the report was written.
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def write(
    measurements: Sequence[Measurement],
    out_dir: Path,
    stamp: str,
    meta: dict[str, Any],
    console: Console,
) -> Path:
    """Write `<stamp>.json`, `latest.json` and the PNG plots; return the JSON path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    document = {
        **meta,
        "machine": machine(),
        "measurements": [m.to_json() | {"ratios": ratios(m, measurements)} for m in measurements],
    }
    raw = orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
    path = out_dir / f"{stamp}.json"
    path.write_bytes(raw)
    (out_dir / "latest.json").write_bytes(raw)
    plot(measurements, out_dir, console)
    return path


def plot(measurements: Sequence[Measurement], out_dir: Path, console: Console) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        console.print("[yellow]matplotlib is not installed (pip install '.[bench]'): no plots[/]")
        return

    def figure(name: str, title: str, ylabel: str, lines: list[tuple[str, list[Any]]]) -> None:
        lines = [(label, series) for label, series in lines if series]
        if not lines:
            return
        fig, ax = plt.subplots(figsize=(10, 5))
        for label, series in lines:
            ax.plot([p[0] for p in series], [p[1] for p in series], label=label)
        ax.set_title(title)
        ax.set_xlabel("seconds since the first result")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=90)
        plt.close(fig)

    backlog = [m for m in measurements if m.throughput_series and m.mode == "backlog"]
    figure(
        "throughput.png",
        "Throughput over time (backlog runs)",
        "items/s",
        [(f"{m.scenario}: {m.label}", m.throughput_series) for m in backlog],
    )
    timed = [m for m in measurements if m.latency_series]
    latency_lines: list[tuple[str, list[Any]]] = []
    for m in timed:
        name = f"{m.label} {m.mode}"
        latency_lines.append((f"{name}: p50", m.latency_series))
        latency_lines.append((f"{name}: p99", [(t, p99) for t, _, p99 in m.latency_series]))
    figure("latency.png", "Record→result latency over time", "ms", latency_lines)
    for m in measurements:
        if m.scale_series:
            _scale_plot(plt, m, out_dir / "scale.png")
    figure(
        "memory.png",
        "Worker resident memory over time",
        "MiB (all worker processes)",
        [
            (f"{m.scenario} {m.mode}: {m.label}", m.memory_series)
            for m in measurements
            if m.memory_series and m.system.startswith("worker")
        ],
    )


def _scale_plot(plt: Any, m: Measurement, path: Path) -> None:
    """Records answered per second and records waiting through the scale steps."""
    fig, answered = plt.subplots(figsize=(10, 5))
    t = [p[0] for p in m.scale_series]
    answered.plot(t, [p[1] for p in m.scale_series], label="records answered/s", lw=1)
    answered.set_xlabel("seconds since the stream started")
    answered.set_ylabel("records answered/s")
    waiting = answered.twinx()
    waiting.plot(t, [p[2] for p in m.scale_series], color="tab:red", label="records waiting")
    waiting.set_ylabel("records waiting (produced, not answered)")
    at = 0.0
    for step in m.steps:
        answered.axvline(at, color="grey", ls=":")
        answered.annotate(
            f"{step['processes']} proc.", (at, 0), xytext=(3, 3), textcoords="offset points"
        )
        at += step["seconds"]
    answered.set_title(f"Scale steps: {m.mode}")
    fig.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown(document: dict[str, Any]) -> str:
    """The figures of a results JSON as a Markdown table (for docs/benchmark.md)."""

    def ms(v: Any) -> str:
        return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:,.0f}"

    lines = [
        "| scenario | system | mode | records | records/s | items/s | p50 ms | p95 ms | p99 ms "
        "| peak RSS MiB | CPU µs/item (system · postgres · broker · harness) | × naive "
        "| % db_limit pgbench | % db_limit asyncpg | % kafka_pipe | correct |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|---|--:|--:|--:|--:|:-:|",
    ]
    for m in document["measurements"]:
        r, lat, by = (
            m.get("ratios", {}),
            m.get("latency_ms", {}),
            m.get("cpu_us_per_item_by_process", {}),
        )
        system = m["system"] if m.get("processes", 1) == 1 else f"{m['system']} ×{m['processes']}"
        naive = f"{r['naive']:.1f}×" if "naive" in r else ""
        cpu = cpu_split_text(m["system"], by)
        lines.append(
            f"| {m['scenario']} | {system} | {m['mode']} | {m['records']:,} "
            f"| {m['records_per_s']:,.0f} | {m['items_per_s']:,.0f} "
            f"| {ms(lat.get('p50'))} | {ms(lat.get('p95'))} | {ms(lat.get('p99'))} "
            f"| {ms(m.get('peak_rss_mb'))} | {cpu} "
            f"| {naive} | "
            + " | ".join(
                f"{100 * r[k]:.0f}%" if k in r else ""
                for k in ("db_limit/pgbench", "db_limit/asyncpg", "kafka_pipe")
            )
            + f" | {'yes' if m['correct'] else 'NO'} |"
        )
    if document.get("api_sustained", {}).get("rate") is not None:
        lines += ["", sustained_line(document["api_sustained"])]
    if kinds := postgres_kinds_lines(document["measurements"]):
        lines += ["", *(f"- {line}" if n else line for n, line in enumerate(kinds))]
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    print(markdown(orjson.loads(Path(sys.argv[1]).read_bytes())))
