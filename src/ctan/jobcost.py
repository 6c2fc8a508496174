"""What one `ctan` command cost: the line each workflow job ends its log with, and its reader.

Snakemake's `benchmark:` files sample a job's CPU time (psutil) once a second for the first 30 seconds
and every 30 seconds after that, so a job's CPU time after its last sample is lost: an OpenKBP demo
training job recorded 15 CPU seconds for 36 s of wall time; alone it uses 40. The process itself
knows exactly (getrusage, its own and its waited-for children's, e.g. DataLoader workers), so every
workflow command prints it, and `benchmarks/workflow_wall.py` takes a job's CPU seconds from there.
"""

from __future__ import annotations

import re
import resource
import time
from pathlib import Path

_LINE = re.compile(r"^ctan (?P<command>[\w-]+): (?P<wall>[\d.]+) s wall, (?P<cpu>[\d.]+) s CPU\b", re.M)


def usage_line(command: str, started: float) -> str:
    """``started``: `time.perf_counter()` when the command began (interpreter start-up is not in the
    wall time, but is in the CPU time)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    user, system = own.ru_utime + children.ru_utime, own.ru_stime + children.ru_stime
    peak_mib = max(own.ru_maxrss, children.ru_maxrss) / 1024  # Linux: KiB
    return (
        f"ctan {command}: {time.perf_counter() - started:.1f} s wall, {user + system:.1f} s CPU "
        f"(user {user:.1f}, system {system:.1f}), peak memory {peak_mib:.0f} MiB"
    )


def logged_cpu_seconds(log: Path) -> float | None:
    """CPU seconds of the `ctan` commands a job log records (summed; a job may run several), or None
    where the log has no such line (absent, older, or the job failed)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    found = [float(m["cpu"]) for m in _LINE.finditer(text)]
    return sum(found) if found else None
