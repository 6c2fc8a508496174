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


def test_tuning_jobs_lie_on_the_critical_path(tmp_path):
    """A final training job waits for its network's tuning job (STL: per task)."""
    _bench(tmp_path, "download/a.tsv", 1, 1, 1000)
    _bench(tmp_path, "preprocess/a.tsv", 4, 4, 1004)
    _bench(tmp_path, "tune/a/hps.tsv", 20, 20, 1024)
    _bench(tmp_path, "tune/a/stl/t1.tsv", 30, 30, 1034)
    _bench(tmp_path, "tune/a/stl/t2.tsv", 6, 6, 1040)
    _bench(tmp_path, "train/a/hps/seed0.tsv", 10, 10, 1034)
    _bench(tmp_path, "train/a/stl/seed0/t1.tsv", 5, 5, 1039)
    _bench(tmp_path, "train/a/stl/seed0/t2.tsv", 12, 12, 1052)
    _bench(tmp_path, "evaluate/a/hps/seed0.tsv", 2, 2, 1036)
    _bench(tmp_path, "evaluate/a/stl/seed0.tsv", 3, 3, 1055)
    jobs = workflow_wall.read_jobs(tmp_path)
    # download 1 + preprocess 4 + STL t1's chain (tune 30 + train 5, longer than t2's 6 + 12) + evaluate 3
    assert workflow_wall.critical_path(jobs) == 43
    assert "| tune | 3 | 56 | 56 |" in workflow_wall.report(jobs, cores=2)


def test_cpu_seconds_come_from_the_job_log_where_it_has_them(tmp_path):
    """Snakemake samples cpu_time every 30 s after a job's first 30 s; the job's own line is exact."""
    bench = tmp_path / "benchmarks"
    _bench(bench, "train/a/hps/seed0.tsv", 41, 15, 1041)
    _bench(bench, "train/a/ctan/seed0.tsv", 10, 9, 1051)
    log = tmp_path / "train" / "a" / "hps" / "seed0.log"
    log.parent.mkdir(parents=True)
    log.write_text(
        "SLURM_JOB_ID=none host=x\nepoch 1/1 ...\n"
        "ctan train: 40.9 s wall, 40.2 s CPU (user 38.5, system 1.7), peak memory 613 MiB\n"
    )
    jobs = {j.key[1]: j for j in workflow_wall.read_jobs(bench)}
    assert jobs["hps"].cpu_seconds == 40.2 and jobs["hps"].cpu_from_log
    assert jobs["ctan"].cpu_seconds == 9 and not jobs["ctan"].cpu_from_log
    assert "1 of 2 jobs' CPU s from their logs" in workflow_wall.report(list(jobs.values()), cores=2)


def test_every_workflow_command_prints_its_cost(tmp_path, capsys, monkeypatch):
    """The line `benchmarks/workflow_wall.py` reads is the one `ctan` prints (one format, one parser)."""
    from ctan import cli
    from ctan.jobcost import logged_cpu_seconds

    monkeypatch.setattr(cli, "_cmd_summarize", lambda args: sum(i * i for i in range(200_000)) * 0)
    assert cli.main(["summarize", "--output", str(tmp_path / "s.csv")]) == 0
    err = capsys.readouterr().err
    assert err.startswith("ctan summarize: ") and err.count("\n") == 1
    log = tmp_path / "job.log"
    log.write_text("some progress output\n" + err)
    cpu = float(err.split(" s CPU")[0].rsplit(", ", 1)[1])  # the process's CPU so far (here: pytest's)
    assert cpu > 0 and logged_cpu_seconds(log) == cpu
    assert logged_cpu_seconds(tmp_path / "absent.log") is None
