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

Before any work, `check_tracking` says in seconds, in one line, that the store cannot be used: an
``http(s)://`` server that does not answer (MLflow itself retries for minutes), a SQLite store or folder
that cannot be written. A store that fails later (a server gone mid-run) is one line too, not a traceback.
"""

from __future__ import annotations

import os
import re
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from ctan.errors import CtanError

LOCK_TIMEOUT_S = 600  # longest wait for another job that is creating the store
PROBE_TIMEOUT_S = 10  # longest wait for an MLflow server to answer before any work starts
# Servers that answered in this process: the CLI probes before any work and `init_tracking` checks again
# inside the run; one request to a server that answered a moment ago is enough.
_ANSWERED: set[str] = set()
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


def _uri_setting() -> str:
    """Where the tracking URI in use was set, for the fix in an error message."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return "the environment variable MLFLOW_TRACKING_URI"
    return "mlflow.tracking_uri in the parameters"


def check_tracking(params: dict[str, Any]) -> None:
    """Refuse, in seconds and before any work, a store the job could not log to: an ``http(s)://``
    server that does not answer (MLflow retries a refused connection for ~4 minutes), a SQLite store
    or its folder that cannot be written. Creates nothing."""
    uri = tracking_uri(params)
    db = sqlite_file(uri)
    if db is not None:
        _check_writable(db)
    elif uri.split("://", 1)[0].lower() in ("http", "https") and uri not in _ANSWERED:
        _check_server(uri)
        _ANSWERED.add(uri)


def _check_writable(db: Path) -> None:
    """The SQLite database (if it exists) and the folder that holds it (or would) can be written."""
    fix = f"make it writable, or set {_uri_setting()} to a store in a folder you can write"
    if db.exists():
        if db.is_dir():
            raise CtanError(db, f"is a folder, not an MLflow (SQLite) database; {fix}")
        if not os.access(db, os.R_OK | os.W_OK):
            raise CtanError(db, f"the MLflow store is read-only (training and evaluation write to it); {fix}")
    from ctan.workspace import blocking_parent

    blocked = blocking_parent(db)
    if blocked and blocked[1] == "file":
        raise CtanError(db, f"cannot create the MLflow store's folder: {blocked[0]} is a file; {fix}")
    if blocked:
        raise CtanError(db, f"the MLflow store's folder {blocked[0]} is read-only; {fix}")


def _check_server(uri: str) -> None:
    """One request to the server's ``/health``, no retries: any HTTP answer will do (a proxy may
    answer 404 there); no answer within PROBE_TIMEOUT_S is an error naming the setting to change."""
    from mlflow.tracking._tracking_service.utils import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        http_request(
            get_default_host_creds(uri),
            "/health",
            "GET",
            max_retries=0,
            backoff_factor=0,
            backoff_jitter=0,
            timeout=PROBE_TIMEOUT_S,
            raise_on_status=False,
        )
    except Exception as err:  # noqa: BLE001 - requests/urllib3/MLflow wrap a connection error differently
        raise CtanError(
            uri,
            f"no MLflow server answers there ({_reason(err)}); start it (mlflow server --host HOST "
            f"--port PORT), or point {_uri_setting()} at one that runs (unset MLFLOW_TRACKING_URI to use "
            "the local SQLite store of params.yaml)",
        ) from None


def _reason(err: BaseException) -> str:
    """The cause of a failed request in a few words: 'Connection refused', 'timed out after 10 s'."""
    text = str(err)
    found = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if found:
        return found.group(1).strip()
    if "timed out" in text.lower() or "timeout" in type(err).__name__.lower():
        return f"no answer within {PROBE_TIMEOUT_S} s"
    return (text.strip().splitlines() or [type(err).__name__])[0][:200]


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
    check_tracking(params)
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
            db, f"cannot create the MLflow store's folder: {err.strerror}; set {_uri_setting()}"
        ) from None
    try:  # FileLock retries a lock file it cannot create until LOCK_TIMEOUT_S, then blames "another job"
        with open(f"{db}.lock", "a"):
            pass
    except OSError as err:
        raise CtanError(
            db,
            f"cannot write in the MLflow store's folder {db.parent}: {err.strerror or err}; "
            f"set {_uri_setting()} to a store in a folder you can write",
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
    except ImportError as err:  # a database server's driver (psycopg2, pymysql, ...) is not installed
        raise CtanError(
            tracking_uri(params),
            f"cannot open the MLflow store: it needs the Python module {err.name or err} "
            f"(pip install it), or set {_uri_setting()} to another store",
        ) from None


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
    with _logging_to(mlflow):
        active = mlflow.start_run(**kwargs)
    with _ending(mlflow, active) as run:
        with _logging_to(mlflow):
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
    with _logging_to(mlflow):
        active = mlflow.start_run(run_id=run_id)
    with _ending(mlflow, active) as run:
        yield run


@contextmanager
def _ending(mlflow, active) -> Iterator[Any]:
    """``with active`` (the run ends FINISHED, or FAILED on an error), where a store failing to record
    the end is one line, and never hides the error that ended the run."""
    try:
        yield active
    except BaseException as err:
        try:
            active.__exit__(type(err), err, err.__traceback__)
        except Exception:  # noqa: BLE001, S110 - the store failing too; the job's own error matters
            pass
        raise
    with _logging_to(mlflow):
        active.__exit__(None, None, None)


@contextmanager
def _logging_to(mlflow) -> Iterator[None]:
    """A store that fails while a job logs to it (a server gone, a database locked or read-only, a full
    disk under mlruns/) is one line naming the store, not a traceback; a training job's checkpoint is
    kept, so the same command resumes once the store works again."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except CtanError:
        raise
    except (MlflowException, SQLAlchemyError, sqlite3.Error, OSError) as err:
        problem = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise CtanError(
            mlflow.get_tracking_uri(),
            f"logging to the MLflow store failed: {problem}; fix the store (or {_uri_setting()}) and run "
            "the same command again (training resumes from its last checkpoint)",
        ) from None


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    import math

    import mlflow

    clean = {k.replace("@", "_"): float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}
    if clean:
        with _logging_to(mlflow):
            mlflow.log_metrics(clean, step=step)


def log_params(params: dict[str, Any]) -> None:
    import mlflow

    with _logging_to(mlflow):
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})


def log_artifact(path: str, artifact_path: str | None = None) -> None:
    import mlflow

    with _logging_to(mlflow):
        mlflow.log_artifact(path, artifact_path=artifact_path)
