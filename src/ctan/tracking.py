"""MLflow: one run per training job, evaluation logged to the same run.

Local SQLite store (``sqlite:///mlflow.db``, the default):

- Creating it is serialised by a file lock beside the database (``mlflow.db.lock``): several jobs
  creating a new SQLite database at once race on its schema (shared/notes/pitfalls.md). `ctan
  init-tracking` (Snakemake's `onstart:`) still creates it up front, but any job may do it safely.
- Artifacts go to ``mlruns/`` beside the database, and the experiment records that location *as the
  database path is written*: relative for ``sqlite:///mlflow.db`` (MLflow itself would store an
  absolute path, so a copied or moved checkout would write into the original's ``mlruns/``), absolute
  for ``sqlite:////abs/path/mlflow.db``. A store made with absolute locations under some other
  ``.../mlruns/`` (by an older version, or copied from another checkout) is relocated on first use,
  runs included.

Any other tracking URI (an ``http(s)://`` MLflow server, a database server) keeps the server's default
artifact location.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from ctan.errors import CtanError

LOCK_TIMEOUT_S = 600  # longest wait for another job that is creating the store
# MLflow 3 records what an experiment is in this tag (its UI's experiment-type selector writes the
# same): ours is model training, not GenAI. MLflow 3.17's UI nevertheless opens every experiment on
# the view of its "GenAI | Model training" switch (GenAI's empty Overview by default, remembered per
# browser): a link to the runs carries ``?workflowType=machine_learning`` (docs/pipeline.md).
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def run_name(dataset: str, arch: str, seed: int, task: str | None = None, tuning: bool = False) -> str:
    """``<dataset>/<arch>/seed<k>``, then ``/<task>`` for an STL network (as its model folder) and
    ``/tuning`` for a tuning run."""
    return f"{dataset}/{arch}/seed{seed}" + (f"/{task}" if task else "") + ("/tuning" if tuning else "")


def tracking_uri(params: dict[str, Any]) -> str:
    """MLFLOW_TRACKING_URI wins over params.yaml, so a cluster can point at an MLflow server."""
    return os.environ.get("MLFLOW_TRACKING_URI") or params["mlflow"]["tracking_uri"]


def _connect(params: dict[str, Any]):
    import logging

    import mlflow

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI, which `tracking_uri` reads as the
    # user's override: left set, a second store in the same process (tests, notebooks) would
    # silently reuse the first one. Keep the environment as the user left it.
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri(params))
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
    return mlflow


def sqlite_file(uri: str) -> Path | None:
    """The database file of a local SQLite tracking URI (relative to the working directory when
    written ``sqlite:///name.db``); None for any other store."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    path = uri[len(prefix) :].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def artifact_root(db: Path) -> str:
    """``mlruns`` beside the database, relative exactly when the database path is."""
    return (db.parent / "mlruns").as_posix()


def init_tracking(params: dict[str, Any]) -> str:
    """Create the store and the experiment; safe to call again, and from several jobs at once."""
    uri = tracking_uri(params)
    db = sqlite_file(uri)
    if db is None:
        _create_experiment(params)
        return uri
    names = ["Default", params["mlflow"]["experiment"]]
    if _ready(db, names):  # the usual case: no lock, no waiting behind other jobs' start-up
        return uri
    from filelock import FileLock, Timeout

    try:
        db.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CtanError(
            db, f"cannot create the MLflow store's folder: {err.strerror}; set mlflow.tracking_uri"
        ) from None
    lock = FileLock(f"{db}.lock", timeout=LOCK_TIMEOUT_S)
    try:
        with lock:
            if not _ready(db, names):
                _create_experiment(params, db)
                _relocate_artifacts(db, names)
    except Timeout:
        raise CtanError(
            lock.lock_file, f"waited {LOCK_TIMEOUT_S} s for another job to create the MLflow store"
        ) from None
    return uri


def _create_experiment(params: dict[str, Any], db: Path | None = None) -> None:
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    mlflow = _connect(params)
    name = params["mlflow"]["experiment"]
    try:
        if mlflow.get_experiment_by_name(name) is None:
            try:
                mlflow.create_experiment(name, tags=EXPERIMENT_TAGS)
            except MlflowException:  # another process created it between the check and here
                if mlflow.get_experiment_by_name(name) is None:
                    raise
    except (MlflowException, SQLAlchemyError, sqlite3.Error) as err:
        where = db if db is not None else tracking_uri(params)
        problem = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CtanError(where, f"cannot open the MLflow store: {problem}") from None


def _new_location(location: str | None, experiment_id: int, root: str) -> str | None:
    """Where an experiment's artifacts should move, or None where they stay.

    Only a location MLflow chose itself (a local ``.../mlruns/<id>``) moves; one a user chose is kept.
    """
    wanted = f"{root}/{experiment_id}"
    old = str(location or "").removeprefix("file://")
    if old == wanted or "://" in old or not old.endswith(f"/mlruns/{experiment_id}"):
        return None
    return wanted


def _ready(db: Path, experiments: list[str]) -> bool:
    """The store exists, holds the experiments, and their artifacts are where they belong."""
    if not db.is_file():
        return False
    try:
        with closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=60)) as con:
            marks = ",".join("?" * len(experiments))
            rows = con.execute(
                f"SELECT experiment_id, artifact_location FROM experiments WHERE name IN ({marks})",
                experiments,
            ).fetchall()
    except sqlite3.Error:  # not created yet, being created, or damaged: decided under the lock
        return False
    root = artifact_root(db)
    return len(rows) == len(experiments) and all(_new_location(loc, i, root) is None for i, loc in rows)


def _relocate_artifacts(db: Path, experiments: list[str]) -> None:
    """Point the experiments' (and their runs') artifacts at ``artifact_root(db)/<id>``."""
    root = artifact_root(db)
    with closing(sqlite3.connect(db, timeout=60)) as con, con:
        marks = ",".join("?" * len(experiments))
        rows = con.execute(
            f"SELECT experiment_id, artifact_location FROM experiments WHERE name IN ({marks})", experiments
        ).fetchall()
        for experiment_id, location in rows:
            wanted = _new_location(location, experiment_id, root)
            if wanted is None:
                continue
            con.execute(
                "UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?",
                (wanted, experiment_id),
            )
            for prefix in {str(location), str(location).removeprefix("file://")}:
                con.execute(
                    "UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) "
                    "WHERE experiment_id = ? AND substr(artifact_uri, 1, ?) = ?",
                    (wanted, len(prefix) + 1, experiment_id, len(prefix), prefix),
                )


@contextmanager
def training_run(
    params: dict[str, Any], run_name: str, tags: dict[str, str], run_id: str | None = None
) -> Iterator[Any]:
    """Start (or resume, for a restarted job) the run of one training job."""
    mlflow = _connect(params)
    init_tracking(params)
    experiment = mlflow.get_experiment_by_name(params["mlflow"]["experiment"])
    _tag_experiment(mlflow, experiment)
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


def _tag_experiment(mlflow, experiment) -> None:
    """Give an experiment made before `EXPERIMENT_TAGS` (or by someone else) the tags it lacks."""
    for key, value in EXPERIMENT_TAGS.items():
        if key not in (experiment.tags or {}):
            mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)


@contextmanager
def existing_run(params: dict[str, Any], run_id: str) -> Iterator[Any]:
    """Reopen a finished training run to log its evaluation."""
    mlflow = _connect(params)
    init_tracking(params)
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
