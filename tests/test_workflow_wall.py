"""benchmarks/workflow_wall.py on hand-made Snakemake benchmark files."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("workflow_wall", REPO / "benchmarks" / "workflow_wall.py")
workflow_wall = sys.modules["workflow_wall"] = importlib.util.module_from_spec(spec)  # dataclasses need it
spec.loader.exec_module(workflow_wall)

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def _bench(root: Path, rel: str, seconds: float, cpu: float, end: float) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + f"{seconds}\t0:00:00\t1\t1\t1\t1\t0\t0\t90\t{cpu}\n")
    os.utime(path, (end, end))


def test_wall_cpu_bound_and_critical_path(tmp_path):
    _bench(tmp_path, "download/a.tsv", 1, 1, 1000)
    _bench(tmp_path, "preprocess/a.tsv", 4, 6, 1004)
    _bench(tmp_path, "train/a/hps/seed0.tsv", 10, 10, 1014)
    _bench(tmp_path, "train/a/stl/seed0/t1.tsv", 5, 5, 1009)
    _bench(tmp_path, "train/a/stl/seed0/t2.tsv", 12, 12, 1016)
    _bench(tmp_path, "evaluate/a/hps/seed0.tsv", 2, 2, 1016)
    _bench(tmp_path, "evaluate/a/stl/seed0.tsv", 3, 3, 1019)
    _bench(tmp_path, "summarize.tsv", 1, 1, 1020)
    jobs = workflow_wall.read_jobs(tmp_path)
    assert len(jobs) == 8
    # download 1 + preprocess 4 + slowest STL task 12 + its evaluate 3, then summarize 1
    assert workflow_wall.critical_path(jobs) == 21
    text = workflow_wall.report(jobs, cores=2)
    assert "wall time (first start to last end): 21 s" in text
    assert "CPU lower bound (CPU s / 2 cores): 20 s" in text
