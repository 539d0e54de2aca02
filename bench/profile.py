"""Summarise py-spy collapsed stacks: `python -m bench.profile FILE [TOP]`.

Prints where the worker's samples go: by own (self) time and by inclusive time per
function, as shares of all samples. Idle samples (the event loop waiting in
`select`/`epoll`) are shown apart, so what is left is CPU the process spent.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

_IDLE = ("select (selectors.py", "_run_once (asyncio/base_events.py")


def summarise(path: Path, top: int = 25) -> str:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = idle = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [f.rsplit(":", 1)[0] for f in stack.split(";")]
        total += count
        leaf = frames[-1]
        if ".select (selectors.py" in leaf or leaf.startswith("select ("):
            idle += count
            continue
        own[leaf] += count
        for frame in set(frames):
            inclusive[frame] += count
    busy = max(1, total - idle)
    lines = [f"samples: {total}, idle (waiting in select): {100 * idle / max(1, total):.1f}%"]
    lines.append(f"\nself time, % of busy samples ({busy}):")
    lines += [f"  {100 * n / busy:5.1f}%  {name}" for name, n in own.most_common(top)]
    lines.append("\ninclusive time, % of busy samples:")
    lines += [f"  {100 * n / busy:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarise(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 25))
