"""MLflow store: safe to create from parallel jobs, artifacts inside the workspace, one-line errors."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from ctan import tracking
from ctan.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_tracking_uri_in_env(monkeypatch):
    """MLflow exports the URI it is given to MLFLOW_TRACKING_URI (which wins over params.yaml): undo it."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unset")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")


def _params(uri: str) -> dict:
    return {"mlflow": {"tracking_uri": uri, "experiment": "test"}}


def _locations(db: Path) -> tuple[list, list]:
    with sqlite3.connect(db) as con:
        experiments = con.execute("SELECT name, artifact_location FROM experiments ORDER BY name").fetchall()
        runs = con.execute("SELECT artifact_uri FROM runs").fetchall()
    return experiments, [r[0] for r in runs]


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def _init_in(workspace: str, barrier, results) -> None:
    os.chdir(workspace)
    barrier.wait()
    try:
        tracking.init_tracking(_params("sqlite:///mlflow.db"))
        results.put("ok")
    except BaseException as err:  # noqa: BLE001 - reported to the parent
        results.put(f"{type(err).__name__}: {str(err)[:200]}")


def test_parallel_jobs_create_a_fresh_store_safely(tmp_path, monkeypatch):
    """Four jobs at once on a new SQLite store, without `ctan init-tracking` first: none crashes."""
    pytest.importorskip("mlflow")
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401 - imported once; the forked jobs start at once

    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    jobs = [ctx.Process(target=_init_in, args=(str(tmp_path), barrier, results)) for _ in range(4)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(120)
    assert [job.exitcode for job in jobs] == [0] * 4
    assert sorted(results.get(timeout=5) for _ in jobs) == ["ok"] * 4
    experiments, _ = _locations(tmp_path / "mlflow.db")
    assert experiments == [("Default", "mlruns/0"), ("test", "mlruns/1")]


def test_unusable_store_is_one_line(tmp_path, capsys, monkeypatch):
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"not a database, " * 200)
    override = tmp_path / "override.yaml"
    override.write_text(f"mlflow:\n  tracking_uri: sqlite:///{db}\n  experiment: test\n")
    code = main(["init-tracking", "--params", str(REPO / "params.yaml"), "--params", str(override)])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"ctan: error: {db}: cannot open the MLflow store")


def test_a_held_lock_times_out_with_one_line(tmp_path, monkeypatch):
    from filelock import FileLock

    monkeypatch.setattr(tracking, "LOCK_TIMEOUT_S", 0.2)
    db = tmp_path / "mlflow.db"
    with FileLock(f"{db}.lock"), pytest.raises(tracking.CtanError, match="another job") as err:
        tracking.init_tracking(_params(f"sqlite:///{db}"))
    assert err.value.path == f"{db}.lock"


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """An initialised store (creating one runs MLflow's migrations: seconds), copied by the tests below.

    Its locations are absolute, under the template's own mlruns/: "another checkout" for the tests.
    """
    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
        tracking.init_tracking(_params(f"sqlite:///{db}"))
    assert _locations(db)[0] == [("Default", f"{db.parent}/mlruns/0"), ("test", f"{db.parent}/mlruns/1")]
    return db


def _seed(template: Path, workspace: Path, run: bool = False) -> str | None:
    """Copy the template store into a workspace; optionally add a run the way MLflow alone would."""
    workspace.mkdir(parents=True, exist_ok=True)
    shutil.copy(template, workspace / "mlflow.db")
    if not run:
        return None
    import mlflow

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", "unset")
        mlflow.set_tracking_uri(f"sqlite:///{workspace / 'mlflow.db'}")
        with mlflow.start_run(experiment_id="1") as active:
            return active.info.run_id


def test_absolute_store_keeps_artifacts_beside_it(tmp_path, monkeypatch, template):
    """An absolute database path: artifacts beside it, whatever the working directory."""
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    store = tmp_path / "store"
    _seed(template, store)
    params = _params(f"sqlite:///{store / 'mlflow.db'}")
    (tmp_path / "a.txt").write_text("x")
    with tracking.training_run(params, "r", {}) as run:
        tracking.log_artifact(str(tmp_path / "a.txt"))
    assert _files(store / "mlruns") == {f"1/{run.info.run_id}/artifacts/a.txt"}
    assert not any(elsewhere.iterdir()) and not (template.parent / "mlruns").exists()


def test_store_copied_from_elsewhere_is_relocated(tmp_path, template):
    """Locations pointing into another checkout's mlruns/ (as MLflow writes them) move, runs included."""
    copy = tmp_path / "copy"
    run_id = _seed(template, copy, run=True)
    assert _locations(copy / "mlflow.db")[1] == [f"{template.parent}/mlruns/1/{run_id}/artifacts"]
    tracking.init_tracking(_params(f"sqlite:///{copy / 'mlflow.db'}"))
    experiments, runs = _locations(copy / "mlflow.db")
    assert experiments == [("Default", f"{copy}/mlruns/0"), ("test", f"{copy}/mlruns/1")]
    assert runs == [f"{copy}/mlruns/1/{run_id}/artifacts"]


SCRIPT = """
import sys
from pathlib import Path
from ctan import tracking
params = {"mlflow": {"tracking_uri": "sqlite:///mlflow.db", "experiment": "test"}}
Path("a.txt").write_text("x")
with tracking.existing_run(params, sys.argv[1]):
    tracking.log_artifact("a.txt", artifact_path="evaluation")
with tracking.training_run(params, "r", {}) as run:
    tracking.log_artifact("a.txt")
print(run.info.run_id)
"""


def test_a_copied_workspace_is_independent(tmp_path, template):
    """The default store, ``sqlite:///mlflow.db``: a copied checkout logs into its own mlruns/.

    The store records relative locations, so the copy's runs, old and new, write beside the copy's
    database and nothing is written into the checkout it was copied from.
    """
    original, copy = tmp_path / "original", tmp_path / "copy"
    old_run = _seed(template, original, run=True)
    shutil.copytree(original, copy)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(REPO / "src")
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, old_run], cwd=copy, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    new_run = done.stdout.split()[-1]
    assert _files(copy / "mlruns") == {
        f"1/{old_run}/artifacts/evaluation/a.txt",
        f"1/{new_run}/artifacts/a.txt",
    }
    assert _files(original) == {"mlflow.db"} and not (template.parent / "mlruns").exists()
    experiments, runs = _locations(copy / "mlflow.db")
    assert experiments == [("Default", "mlruns/0"), ("test", "mlruns/1")]
    assert sorted(runs) == sorted(f"mlruns/1/{r}/artifacts" for r in (old_run, new_run))


def _experiment_tags(db: Path) -> dict[str, str]:
    with sqlite3.connect(db) as con:
        rows = con.execute(
            "SELECT key, value FROM experiment_tags JOIN experiments USING (experiment_id)"
            " WHERE name = 'test'"
        ).fetchall()
    return dict(rows)


def test_experiment_opens_on_its_runs_and_runs_have_readable_names(tmp_path, template, monkeypatch):
    """MLflow 3's UI opens an untagged experiment on its empty GenAI views: ours is a model-training
    one, also when the store was made before the tag existed; runs are named <dataset>/<arch>/seed<k>."""
    workspace = tmp_path / "ws"
    _seed(template, workspace)
    with sqlite3.connect(workspace / "mlflow.db") as con:
        con.execute("DELETE FROM experiment_tags")  # as a store made before the tag
    monkeypatch.chdir(workspace)
    params = _params("sqlite:///mlflow.db")
    name = tracking.run_name("openkbp_demo", "stl", 0, task="dose")
    assert name == "openkbp_demo/stl/seed0/dose"
    assert tracking.run_name("ham10000_demo", "ctan", 2) == "ham10000_demo/ctan/seed2"
    with tracking.training_run(params, name, {"dataset": "openkbp_demo"}) as run:
        run_id = run.info.run_id
    assert _experiment_tags(workspace / "mlflow.db") == {"mlflow.experimentKind": "custom_model_development"}
    import mlflow

    assert mlflow.get_run(run_id).info.run_name == "openkbp_demo/stl/seed0/dose"


def test_a_new_store_tags_its_experiment(tmp_path, template):
    assert _experiment_tags(template) == {"mlflow.experimentKind": "custom_model_development"}


# ----------------------------------------------------------------------------------------------------
# A store the job cannot log to: one line, in seconds, before any work (nothing made in the workspace).


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _workspace_args(tmp_path: Path) -> list[str]:
    """`ctan train` of the demo HAM10000 in a workspace under tmp_path (nothing downloaded there)."""
    override = tmp_path / "override.yaml"
    folders = {k: str(tmp_path / "ws" / k) for k in ("raw", "preprocessed", "models", "results")}
    override.write_text(f"paths: {folders}\nmlflow: {{experiment: test}}\n")
    params = ["--params", str(REPO / "params.yaml"), "--params", str(override)]
    return ["train", *params, "--dataset", "ham10000_demo", "--arch", "hps", "--seed", "0"]


def _one_line(capsys) -> str:
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ctan: error: "), lines
    return lines[0]


def test_an_mlflow_server_that_does_not_answer_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """MLFLOW_TRACKING_URI at a server that is down: MLflow retried for 4 min 14 s (measured), after the
    model folder was made and the data loaded, then printed a urllib3 message."""
    import time

    uri = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    started = time.monotonic()
    assert main(_workspace_args(tmp_path)) == 2
    line = _one_line(capsys)
    assert time.monotonic() - started < 60
    assert line.startswith(
        f"ctan: error: {uri}: no MLflow server answers there (Connection refused); start it"
    )
    assert "MLFLOW_TRACKING_URI" in line
    assert not (tmp_path / "ws").exists()


def test_a_server_that_accepts_but_never_answers_times_out(monkeypatch):
    """A hung server (or a firewall that drops packets): MLflow's own timeout is 120 s per try, 7 tries."""
    import socket
    import time

    monkeypatch.setattr(tracking, "PROBE_TIMEOUT_S", 1)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)  # connections complete in the backlog; nothing ever answers
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(
            tracking.CtanError, match=r"no MLflow server answers there \(no answer within 1 s\)"
        ):
            tracking.check_tracking(_params(uri))
        assert time.monotonic() - started < 15


@pytest.mark.skipif(
    not Path("/proc/self").is_dir(), reason="needs Linux /proc, a folder no file can be made in"
)
def test_a_store_in_a_folder_that_cannot_be_written(tmp_path, monkeypatch):
    """Was a PermissionError traceback from filelock, or (where the lock file cannot be made at all)
    a 600 s wait ending in 'waited for another job to create the MLflow store'."""
    monkeypatch.setattr(tracking, "LOCK_TIMEOUT_S", 1)
    with pytest.raises(tracking.CtanError) as err:
        tracking.init_tracking(_params("sqlite:////proc/mlflow.db"))
    assert err.value.path == "/proc/mlflow.db"
    assert "/proc" in err.value.problem and (
        "cannot write" in err.value.problem or "read-only" in err.value.problem
    )
    assert "another job" not in err.value.problem


def test_a_read_only_store_is_refused_before_any_work(tmp_path, capsys, monkeypatch, template):
    """An existing store that cannot be written: a sqlite3 'attempt to write a readonly database'
    traceback when training had set up and started its run."""
    store = tmp_path / "store"
    _seed(template, store)
    db = store / "mlflow.db"
    db.chmod(0o444)
    if os.access(db, os.W_OK):  # root writes anyway: make os.access answer as for any other user
        real = os.access
        monkeypatch.setattr(
            os, "access", lambda p, m, **k: False if Path(p) == db and m & os.W_OK else real(p, m, **k)
        )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    assert main(_workspace_args(tmp_path)) == 2
    line = _one_line(capsys)
    assert line.startswith(f"ctan: error: {db}: the MLflow store is read-only")
    assert not (tmp_path / "ws").exists()
    db.chmod(0o644)


def test_a_database_server_without_its_driver(monkeypatch):
    """postgresql:// without psycopg2 installed: a ModuleNotFoundError traceback."""
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("psycopg2 is installed here")
    with pytest.raises(tracking.CtanError, match="needs the Python module psycopg2"):
        tracking.init_tracking(_params("postgresql://ctan@127.0.0.1:1/ctan"))


def test_a_store_failing_mid_run_is_one_line(tmp_path, monkeypatch, template):
    """A server gone or a database locked while a job logs: an MlflowException traceback mid-training."""
    import mlflow
    from mlflow.exceptions import MlflowException

    store = tmp_path / "store"
    _seed(template, store)
    params = _params(f"sqlite:///{store / 'mlflow.db'}")

    def gone(*args, **kwargs):
        raise MlflowException("API request to http://mlflow:5000 failed: Connection refused")

    with pytest.raises(tracking.CtanError, match="logging to the MLflow store failed: API request"):
        with tracking.training_run(params, "r", {}) as run:
            monkeypatch.setattr(mlflow, "log_metrics", gone)
            tracking.log_metrics({"loss": 1.0}, step=1)
    assert mlflow.get_run(run.info.run_id).info.status == "FAILED"  # the run ended, marked failed
