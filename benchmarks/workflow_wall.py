"""How well a finished workflow run used its cores: wall time against two lower bounds.

    python benchmarks/workflow_wall.py --cores 2            # reads logs/benchmarks/**.tsv

Every rule writes a Snakemake `benchmark:` file, logs/benchmarks/<stage>/<dataset>/...tsv (summarize:
logs/benchmarks/summarize.tsv), with the job's wall seconds (`s`). A job ends when its file is written,
so it ran from mtime - s to mtime; the run's wall time is the last end minus the first start.

A job's CPU seconds come from its log, logs/<stage>/<dataset>/....log, where every `ctan` command
prints them (`ctan.jobcost`). Snakemake's own `cpu_time` is a sample (every second for 30 s, then
every 30 s) that loses what a longer job used after its last sample (an OpenKBP demo training job:
15 of its 40 CPU s); it is used only for a job whose log has no such line, and the report says for
how many.

Lower bounds on the wall time:

- CPU bound: all jobs' CPU seconds / cores (no schedule can beat it on those cores);
- critical path: the longest chain of jobs that must run one after another: per dataset download ->
  preprocess -> the network's tuning job (where `tuning.lr` has several values) -> the slowest train
  (for STL the slowest of its per-task tune + train chains) + its evaluate, then summarize after every
  dataset.

Wall time well above both means idle cores (jobs waited on each other or on the scheduler).
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from ctan.jobcost import logged_cpu_seconds


@dataclass(frozen=True)
class Job:
    stage: str  # download | preprocess | train | evaluate | summarize
    key: tuple[str, ...]  # the path under the stage, without .tsv: (dataset, arch, seed[, task])
    seconds: float
    cpu_seconds: float
    end: float
    cpu_from_log: bool = False  # else Snakemake's sampled cpu_time, a lower bound

    @property
    def start(self) -> float:
        return self.end - self.seconds


def read_jobs(root: Path, logs: Path | None = None) -> list[Job]:
    """``root``: the benchmark folder; ``logs``: the log folder (default: its parent)."""
    logs = root.parent if logs is None else logs
    jobs = []
    for path in sorted(root.rglob("*.tsv")):
        rel = path.relative_to(root).with_suffix("").parts
        with path.open() as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        if not rows:
            continue
        row = rows[-1]  # a repeated benchmark (`repeat(...)`) has several rows; the file ends with the last
        cpu = row.get("cpu_time", "")
        logged = logged_cpu_seconds(logs.joinpath(*path.relative_to(root).parts).with_suffix(".log"))
        jobs.append(
            Job(
                stage=rel[0],
                key=tuple(rel[1:]),
                seconds=float(row["s"]),
                cpu_seconds=logged if logged is not None else float(cpu) if cpu not in ("", "NA") else 0.0,
                end=path.stat().st_mtime,
                cpu_from_log=logged is not None,
            )
        )
    return jobs


def critical_path(jobs: list[Job]) -> float:
    """Longest dependent chain: download -> preprocess -> tune -> train -> evaluate per dataset, then
    summarize. Tuning files are tune/<dataset>/<arch>.tsv and, for STL, tune/<dataset>/stl/<task>.tsv."""
    by_stage: dict[str, dict[tuple[str, ...], float]] = defaultdict(dict)
    for job in jobs:
        by_stage[job.stage][job.key] = job.seconds
    datasets = {key[0] for stage, keys in by_stage.items() if stage != "summarize" for key in keys}
    longest = 0.0
    for ds in datasets:
        before = by_stage["download"].get((ds,), 0.0) + by_stage["preprocess"].get((ds,), 0.0)
        train: dict[tuple[str, ...], float] = defaultdict(float)
        for key, s in by_stage["train"].items():
            if key[0] == ds:  # (ds, arch, seed) or, for STL, (ds, stl, seed, task): the slowest task counts
                tuned = by_stage["tune"].get(key[:2] + key[3:], 0.0)  # (ds, arch) or (ds, stl, task)
                train[key[:3]] = max(train[key[:3]], tuned + s)
        models = set(train) | {k for k in by_stage["evaluate"] if k[0] == ds}
        after = max((train.get(k, 0.0) + by_stage["evaluate"].get(k, 0.0) for k in models), default=0.0)
        longest = max(longest, before + after)
    return longest + sum(by_stage["summarize"].values())


def report(jobs: list[Job], cores: int) -> str:
    if not jobs:
        return "no benchmark files"
    wall = max(j.end for j in jobs) - min(j.start for j in jobs)
    cpu = sum(j.cpu_seconds for j in jobs)
    path = critical_path(jobs)
    bound = max(cpu / cores, path)
    lines = ["| stage | jobs | wall s (sum) | CPU s (sum) |", "|---|---|---|---|"]
    for stage in ("download", "preprocess", "tune", "train", "evaluate", "summarize"):
        of = [j for j in jobs if j.stage == stage]
        if of:
            seconds, cpu_seconds = sum(j.seconds for j in of), sum(j.cpu_seconds for j in of)
            lines.append(f"| {stage} | {len(of)} | {seconds:.0f} | {cpu_seconds:.0f} |")
    lines += [
        "",
        f"wall time (first start to last end): {wall:.0f} s",
        f"CPU lower bound (CPU s / {cores} cores): {cpu / cores:.0f} s "
        f"({sum(j.cpu_from_log for j in jobs)} of {len(jobs)} jobs' CPU s from their logs, the rest "
        "from Snakemake's sampled cpu_time, which undercounts jobs over 30 s)",
        f"critical path: {path:.0f} s",
        f"wall / max(lower bounds): {wall / bound:.2f}" if bound > 0 else "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--benchmarks", type=Path, default=Path("logs/benchmarks"))
    ap.add_argument("--logs", type=Path, help="the jobs' log folder (default: the parent of --benchmarks)")
    ap.add_argument("--cores", type=int, default=2, help="the --cores the workflow ran with")
    args = ap.parse_args()
    print(report(read_jobs(args.benchmarks, args.logs), args.cores))


if __name__ == "__main__":
    main()
