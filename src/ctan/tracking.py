"""MLflow: one run per training job, evaluation logged to the same run.

The SQLite store is created once (`ctan init-tracking`, Snakemake's `onstart:`) because several jobs
creating a new SQLite database at once race on its schema (shared/notes/pitfalls.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def tracking_uri(params: dict[str, Any]) -> str:
    """MLFLOW_TRACKING_URI wins over params.yaml, so a cluster can point at an MLflow server."""
    return os.environ.get("MLFLOW_TRACKING_URI") or params["mlflow"]["tracking_uri"]


def _connect(params: dict[str, Any]):
    import logging

    import mlflow

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(tracking_uri(params))
    return mlflow


def init_tracking(params: dict[str, Any]) -> str:
    """Create the store and the experiment; safe to call again."""
    mlflow = _connect(params)
    name = params["mlflow"]["experiment"]
    if mlflow.get_experiment_by_name(name) is None:
        try:
            mlflow.create_experiment(name)
        except Exception:  # another process created it between the check and here
            if mlflow.get_experiment_by_name(name) is None:
                raise
    return tracking_uri(params)


@contextmanager
def training_run(
    params: dict[str, Any], run_name: str, tags: dict[str, str], run_id: str | None = None
) -> Iterator[Any]:
    """Start (or resume, for a restarted job) the run of one training job."""
    mlflow = _connect(params)
    init_tracking(params)
    experiment = mlflow.get_experiment_by_name(params["mlflow"]["experiment"])
    if run_id is not None:
        try:
            mlflow.get_run(run_id)
        except Exception:
            run_id = None
    kwargs = (
        {"run_id": run_id} if run_id else {"experiment_id": experiment.experiment_id, "run_name": run_name}
    )
    with mlflow.start_run(**kwargs) as run:
        mlflow.set_tags(tags)
        yield run


@contextmanager
def existing_run(params: dict[str, Any], run_id: str) -> Iterator[Any]:
    """Reopen a finished training run to log its evaluation."""
    mlflow = _connect(params)
    with mlflow.start_run(run_id=run_id) as run:
        yield run


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    import math

    import mlflow

    clean = {k.replace("@", "_"): float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}
    if clean:
        mlflow.log_metrics(clean, step=step)


def log_params(params: dict[str, Any]) -> None:
    import mlflow

    mlflow.log_params({k: str(v)[:500] for k, v in params.items()})


def log_artifact(path: str, artifact_path: str | None = None) -> None:
    import mlflow

    mlflow.log_artifact(path, artifact_path=artifact_path)
