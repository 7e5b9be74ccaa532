"""`python -m bench --profile`: sample the broker with py-spy while wrk loads it.

Writes collapsed stacks (`profile.txt`, for flame-graph tools) and prints where the time
goes: the functions most often on top of the stack (self time) and on it at all (total).
"""

from __future__ import annotations

import shutil
import sys
from collections import Counter
from pathlib import Path

from bench.processes import Supervisor


def find_py_spy() -> str | None:
    """py-spy beside this Python (the venv's), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def start(supervisor: Supervisor, py_spy: str, pid: int, seconds: float, out: Path) -> None:
    """Start sampling `pid` for `seconds` (py-spy stops by itself) into collapsed stacks."""
    argv = [
        py_spy,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(seconds))),
        "--rate",
        "250",
        "--format",
        "raw",
        "--nonblocking",
        "--output",
        str(out),
    ]
    supervisor.start("py-spy", argv, log=out.with_suffix(".log"))


def wait(supervisor: Supervisor, seconds: float) -> None:
    """Wait for py-spy to finish writing (it was told how long to sample)."""
    supervisor.wait_for("py-spy", seconds + 30)


def summarise(collapsed: str, top: int = 25) -> list[str]:
    """Self and total shares per function from py-spy's collapsed (raw) output."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";")]
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    if samples == 0:
        return ["no samples"]
    lines = [f"{samples} samples", "", "self %  function"]
    lines += [f"{100 * n / samples:5.1f}  {name}" for name, n in own.most_common(top)]
    lines += ["", "total %  function"]
    lines += [f"{100 * n / samples:5.1f}  {name}" for name, n in total.most_common(top)]
    return lines


def _short(frame: str) -> str:
    """`func (path/to/module.py:12)` → `func (module.py)`: lines vary, functions do not."""
    name, _, where = frame.partition(" (")
    module = where.rsplit("/", 1)[-1].split(":", 1)[0].rstrip(")")
    return f"{name} ({module})" if module else name
