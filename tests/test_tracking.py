"""MLflow: the store is created once, then many jobs at once each record their run (issue 5, #4)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

from ctan.tracking import init_tracking

JOB = """
import sys
from ctan.tracking import log_metrics, training_run
params = {"mlflow": {"tracking_uri": sys.argv[1], "experiment": "parallel"}}
with training_run(params, f"job{sys.argv[2]}", {"job": sys.argv[2]}):
    log_metrics({"loss": float(sys.argv[2])}, step=1)
"""


def test_eight_jobs_at_once_all_record_their_runs(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    init_tracking({"mlflow": {"tracking_uri": uri, "experiment": "parallel"}})  # Snakemake's onstart
    jobs = [
        subprocess.Popen([sys.executable, "-c", JOB, uri, str(i)], stderr=subprocess.PIPE, text=True)
        for i in range(8)
    ]
    errors = [job.communicate(timeout=300)[1] for job in jobs]
    assert all(job.returncode == 0 for job in jobs), errors
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        runs = db.execute("SELECT status FROM runs").fetchall()
        losses = db.execute("SELECT COUNT(*) FROM metrics WHERE key = 'loss'").fetchone()[0]
    assert [s for (s,) in runs] == ["FINISHED"] * 8 and losses == 8


def test_environment_overrides_the_configured_store(tmp_path: Path, monkeypatch):
    from ctan.tracking import tracking_uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking_uri({"mlflow": {"tracking_uri": "sqlite:///x.db"}}) == "http://mlflow.example:5000"
