"""CPU accounting of the processes a bench row watches, from /proc: each process's own
(and reaped children's) CPU, a group's between two moments, and PostgreSQL's CPU by kind
of process: the backends that run the statements, autovacuum, the server's other
background processes, and processes that exited in the window.

The bench's `postgres` figure is the whole server's CPU; the split by kind shows how much
of an item's PostgreSQL cost is its statements and how much is the server catching up on
earlier writes (autovacuum of the tables the bench filled, checkpoints)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

# Process titles (`postgres: <title>`) of the server's own processes; any other titled
# child is a backend serving a connection (`postgres: user database host state`).
_BACKGROUND = (
    "checkpointer",
    "background writer",
    "walwriter",
    "wal writer",
    "walsummarizer",
    "wal summarizer",
    "logical replication",
    "io worker",
    "archiver",
    "stats collector",
    "walsender",
    "walreceiver",
    "startup",
)
KINDS = ("backends", "autovacuum", "background", "exited")


def kind_of(title: str) -> str:
    """The kind of a PostgreSQL process from its command line (NULs as spaces)."""
    if not title.startswith("postgres: "):
        return "background"  # the postmaster itself
    name = title.removeprefix("postgres: ")
    if name.startswith("autovacuum"):
        return "autovacuum"
    if name.startswith(_BACKGROUND):
        return "background"
    return "backends"


def process_title(pid: int) -> str | None:
    """The process's command line, NULs as spaces (a PostgreSQL child's title); None if gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def child_pids(pid: int) -> list[int]:
    """The process's children now alive."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class PostgresKinds:
    """CPU seconds of one PostgreSQL server by kind between `start()` and `stop()`.

    Alive processes are counted from their own /proc figures. A process that exits is
    reaped by the postmaster, whose children's CPU then grows by all the process ever
    used: `exited` is that growth less what such processes had used before `start()`
    (mostly autovacuum workers, which exit after each pass, and closed connections)."""

    def __init__(self, postmaster: Callable[[], Sequence[int]]) -> None:
        self._postmaster = postmaster
        self._before: dict[int, tuple[str, float]] = {}
        self._reaped_before = 0.0

    def _now(self) -> tuple[dict[int, tuple[str, float]], float]:
        alive: dict[int, tuple[str, float]] = {}
        reaped = 0.0
        for root in self._postmaster():
            reaped += cpu_seconds(root, reaped=True) - cpu_seconds(root)
            for pid in [root, *child_pids(root)]:
                title = process_title(pid)
                if title is not None:
                    alive[pid] = (kind_of(title), cpu_seconds(pid))
        return alive, reaped

    def start(self) -> None:
        self._before, self._reaped_before = self._now()

    def stop(self) -> dict[str, float]:
        alive, reaped = self._now()
        split = dict.fromkeys(KINDS, 0.0)
        for pid, (kind, seconds) in alive.items():
            earlier = self._before.get(pid)
            split[kind] += seconds - (earlier[1] if earlier and earlier[0] == kind else 0.0)
        gone = sum(s for pid, (_, s) in self._before.items() if pid not in alive)
        split["exited"] = max(0.0, reaped - self._reaped_before - gone)
        return {f"postgres {kind}": round(seconds, 2) for kind, seconds in split.items()}


def parent_pid(pid: int) -> int:
    """The process's parent (a PostgreSQL backend's: the postmaster)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def cpu_seconds(pid: int, reaped: bool = False) -> float:
    """User + system CPU time the process has used so far (with `reaped`, also that of its
    children that have exited and been waited for); 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # utime, stime, cutime, cstime are fields 14-17 of stat, counted after the name's ")".
    ticks = int(fields[11]) + int(fields[12])
    if reaped:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of a process and its descendants, those alive now and those that have
    exited (e.g. PostgreSQL's postmaster, its backends, and closed sessions' backends)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += cpu_seconds(pid, reaped=True)
        todo.extend(children.get(pid, []))
    return total


class CpuSplit:
    """CPU seconds used by each named group of processes between `start()` and `stop()`:
    `trees` count each pid with its descendants, `single` the pid alone."""

    def __init__(
        self,
        trees: Mapping[str, Callable[[], Sequence[int]]],
        single: Mapping[str, Callable[[], Sequence[int]]],
    ) -> None:
        self._trees, self._single = trees, single
        self._before: dict[str, float] = {}
        # A `postgres` tree is also split by kind of process ("postgres backends", ...).
        self._kinds = PostgresKinds(trees["postgres"]) if "postgres" in trees else None

    def _now(self) -> dict[str, float]:
        now = {name: sum(map(tree_cpu_seconds, pids())) for name, pids in self._trees.items()}
        now |= {name: sum(map(cpu_seconds, pids())) for name, pids in self._single.items()}
        return now

    def start(self) -> None:
        self._before = self._now()
        if self._kinds is not None:
            self._kinds.start()

    def stop(self) -> dict[str, float]:
        split = {n: round(v - self._before.get(n, 0.0), 2) for n, v in self._now().items()}
        return split | (self._kinds.stop() if self._kinds is not None else {})
