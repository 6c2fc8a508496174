"""One writer per model folder, model.pt written last, and the leftovers of killed runs swept.

A process killed by SIGKILL (the OOM killer, ``scancel --signal=KILL``, a node dying) runs no clean-up:
these tests kill real processes and check what the next command finds and does.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from ctan.cli import main
from ctan.errors import CtanError
from ctan.training import checkpoint
from ctan.workspace import LOCK_NAME, exclusive, partial_folder, sweep_temporaries

REPO = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()

# A second process that holds ``exclusive(folder)`` (or builds ``partial_folder(target)``) until its stdin
# closes, printing "holding", the path it holds and the pid of the child it forked ("fork") once it holds it.
HOLD = """
import os, sys, time
from pathlib import Path
from ctan.workspace import exclusive, partial_folder
if sys.argv[1] in ("exclusive", "fork"):
    with exclusive(Path(sys.argv[2]), "ctan train"):
        child = os.fork() if sys.argv[1] == "fork" else None  # as a DataLoader worker is forked
        if child == 0:
            time.sleep(60)
            os._exit(0)
        print("holding", sys.argv[2], child or "", sep="\\t", flush=True)
        sys.stdin.read()
else:
    with partial_folder(Path(sys.argv[2])) as work:
        (work / "data").mkdir()
        print("holding", work, "", sep="\\t", flush=True)
        sys.stdin.read()
"""


class Holder:
    """A child process holding a lock; ``path``: what it holds."""

    def __init__(self, kind: str, path: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLD, kind, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for line in self.proc.stdout:  # after any line its own sweep printed
            if line.startswith("holding\t"):
                break
        else:
            pytest.fail(f"the holder did not start (exit {self.proc.wait()})")
        _, path, child = line.rstrip("\n").split("\t")
        self.path, self.child = Path(path), int(child) if child else None

    def finish(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0
        self.proc.stdout.close()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)
        self.proc.stdin.close()
        self.proc.stdout.close()


def dead_pid() -> int:
    """The pid of a process that has exited (and was reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


# ----------------------------------------------------------------------------------------------------
# One writer per folder


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    folder = tmp_path / "seed0"
    folder.mkdir()
    (folder / "checkpoint.pt").write_bytes(b"epoch 3")
    holder = Holder("exclusive", folder)
    before = listing(folder)
    with pytest.raises(CtanError) as err:
        with exclusive(folder, "ctan train"):
            pytest.fail("entered a folder another process holds")
    assert err.value.path == str(folder)
    assert (
        f"another ctan train (pid {holder.proc.pid} on host {HOST}) is writing {folder}; "
        "wait for it to finish or stop it"
    ) in err.value.problem
    assert listing(folder) == before  # the refused writer touched nothing
    holder.finish()
    assert sorted(os.listdir(folder)) == ["checkpoint.pt"]  # the lock file goes with its holder
    with exclusive(folder, "ctan train"):
        assert (folder / LOCK_NAME).read_text().split() == [str(os.getpid()), HOST]
    assert sorted(os.listdir(folder)) == ["checkpoint.pt"]


def test_the_lock_is_free_once_its_holder_is_killed(tmp_path):
    """flock, not a pid file: the OS drops the lock of a SIGKILLed holder, whose lock file stays."""
    holder = Holder("exclusive", tmp_path)
    holder.kill()
    assert (tmp_path / LOCK_NAME).exists()
    with exclusive(tmp_path, "ctan train"):
        assert (tmp_path / LOCK_NAME).read_text().split() == [str(os.getpid()), HOST]
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_forked_child_does_not_keep_a_killed_holders_lock(tmp_path):
    """DataLoader workers are forked while `ctan train` holds the lock: when the trainer is killed, its
    lock must not live on in them."""
    holder = Holder("fork", tmp_path)
    holder.kill()
    try:
        with exclusive(tmp_path, "ctan train"):
            pass
    finally:
        os.kill(holder.child, signal.SIGKILL)


def test_without_locks_on_the_filesystem_the_work_goes_on_and_nothing_is_swept(tmp_path, monkeypatch, capsys):
    """Lustre mounted noflock and some NFS set-ups refuse flock: a warning, not a refusal to work; and a
    partial folder whose lock cannot be tried is never taken for dead."""
    import errno

    import ctan.workspace

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    target = tmp_path / "ds"
    unknown = tmp_path / ".ds.partial-unknown"
    unknown.mkdir()
    (unknown / LOCK_NAME).write_text("")
    os.utime(unknown, (time.time() - 3600,) * 2)
    monkeypatch.setattr(ctan.workspace.fcntl, "flock", no_locks)
    with exclusive(tmp_path, "ctan train"):
        assert (tmp_path / LOCK_NAME).exists()
    assert not (tmp_path / LOCK_NAME).exists()
    assert "does not support locks (No locks available)" in capsys.readouterr().err
    with partial_folder(target) as work:
        assert work.is_dir()
    assert _partials(target) == [unknown.name]


# ----------------------------------------------------------------------------------------------------
# model.pt last


def _state(run_id: str) -> SimpleNamespace:
    return SimpleNamespace(
        history=[{"epoch": 1}], best_epoch=1, best_score=0.5, best_model={"w": torch.ones(2)}, run_id=run_id
    )


@pytest.fixture
def stale_model(tmp_path, monkeypatch) -> Path:
    """A model folder holding an earlier run's model.pt, its SHA-256 and run.json; MLflow stubbed out."""
    from ctan import tracking

    monkeypatch.setattr(tracking, "log_artifact", lambda *a, **k: None)
    monkeypatch.setattr(tracking, "log_metrics", lambda *a, **k: None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    checkpoint.save_model({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "model.pt")
    (tmp_path / "run.json").write_text(json.dumps({"run_id": "old"}))
    return tmp_path


def _write(out: Path, run_id: str = "new") -> None:
    from ctan.training.trainer import write_model

    params = {"mlflow": {"tracking_uri": "sqlite:///mlflow.db"}}
    write_model(out, torch.device("cpu"), _state(run_id), {}, [], "c", {"data_hash": "d"}, params)


def test_a_run_failing_after_its_run_json_leaves_no_model(stale_model, monkeypatch):
    """Before: model.pt was written first, so a kill before run.json left a finished-looking folder."""
    import ctan.plots

    def fail(*args, **kwargs):
        raise RuntimeError("killed while drawing the curves")

    monkeypatch.setattr(ctan.plots, "plot_learning_curves", fail)
    with pytest.raises(RuntimeError):
        _write(stale_model)
    assert json.loads((stale_model / "run.json").read_text())["run_id"] == "new"
    assert (stale_model / "history.json").is_file()
    assert not (stale_model / "model.pt").exists()  # neither the new one nor the stale one
    assert not (stale_model / "model.pt.sha256").exists()


def test_a_stale_model_is_gone_when_the_new_one_fails_to_save(stale_model, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_model", fail)
    with pytest.raises(OSError):
        _write(stale_model)
    assert not (stale_model / "model.pt").exists() and not (stale_model / "model.pt.sha256").exists()
    assert json.loads((stale_model / "run.json").read_text())["run_id"] == "new"


def test_model_pt_is_written_after_everything_it_is_the_mark_of(stale_model, monkeypatch):
    save = checkpoint.save_model
    seen = {}

    def spy(obj, path):
        seen["run_id"] = json.loads((path.parent / "run.json").read_text())["run_id"]
        seen["others"] = sorted(p.name for p in path.parent.iterdir())
        return save(obj, path)

    monkeypatch.setattr(checkpoint, "save_model", spy)
    _write(stale_model)
    assert seen["run_id"] == "new"
    assert {"history.json", "run.json", "curves.png"} <= set(seen["others"])
    assert "model.pt" not in seen["others"]
    checkpoint.verify(stale_model / "model.pt")
    assert torch.equal(checkpoint.load(stale_model / "model.pt")["state_dict"]["w"], torch.ones(2))


# ----------------------------------------------------------------------------------------------------
# Leftovers of killed runs


def test_temporaries_of_dead_writers_are_swept(tmp_path, capsys):
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    dead = dead_pid()
    (tmp_path / f".checkpoint.pt.tmp-{dead}").write_bytes(b"x" * 3000)
    (tmp_path / f".model.pt.sha256.tmp-{dead}").write_text("abc")
    (tmp_path / f".model.pt.tmp-{live.pid}").write_bytes(b"being written")
    (tmp_path / "checkpoint.pt").write_bytes(b"kept")
    (tmp_path / ".notes.tmp-abc").write_text("not ours")
    sweep_temporaries(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["checkpoint.pt", ".notes.tmp-abc", f".model.pt.tmp-{live.pid}"]
    )
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and f"{tmp_path / f'.checkpoint.pt.tmp-{dead}'}: removed" in out[0]
    assert "left by a killed run (2.9 KiB)" in out[0]
    live.communicate(b"")


def _partials(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.glob(f".{target.name}.partial-*"))


def test_dead_partial_folders_are_swept_and_live_ones_kept(tmp_path, capsys):
    target = tmp_path / "ds"
    live = Holder("partial", target)  # a concurrent run building its partial folder
    killed = Holder("partial", target)
    (killed.path / "data" / "chunk").write_bytes(b"x" * 2 * 2**20)
    killed.kill()
    old = tmp_path / ".ds.partial-old"  # an older ctan's, without a lock file
    (old / "data").mkdir(parents=True)
    os.utime(old, (time.time() - 3600,) * 2)
    fresh = tmp_path / ".ds.partial-new"  # no lock file yet: being created this instant
    fresh.mkdir()
    other = tmp_path / ".dsx.partial-abc"  # another target's
    other.mkdir()
    os.utime(other, (time.time() - 3600,) * 2)
    capsys.readouterr()
    with partial_folder(target) as work:
        assert sorted(_partials(target)) == sorted([live.path.name, fresh.name, work.name])
    assert sorted(_partials(target)) == sorted([live.path.name, fresh.name])
    assert other.exists()
    said = capsys.readouterr().out
    assert f"{killed.path}: removed, left by a killed run (2.0 MiB)" in said
    assert f"{old}: removed" in said
    live.finish()
    assert _partials(target) == [fresh.name]


# ----------------------------------------------------------------------------------------------------
# The commands: ctan download, preprocess, train, evaluate on a tiny dataset


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, list[str]]:
    """A tiny HAM10000 demo downloaded and preprocessed; the CLI arguments for its parameters."""
    root = tmp_path_factory.mktemp("locks")
    override = root / "override.yaml"
    override.write_text(
        yaml.safe_dump(
            {
                "run": {"datasets": ["ham"]},
                "paths": {k: str(root / k) for k in ("raw", "preprocessed", "models", "results")},
                "mlflow": {"tracking_uri": (root / "mlruns").as_uri(), "experiment": "locks"},
                "training": {"epochs": 1, "batch_size": 4},
                "datasets": {
                    "ham": {
                        "format": "ham10000",
                        "source": "demo",
                        "sha256": None,
                        "demo": {"train": 4, "validation": 2, "test": 2, "seed": 3},
                        "tasks": ["lesion", "diagnosis"],
                        "preprocess": {"shape": [16, 16]},
                    }
                },
            }
        )
    )
    args = ["--params", str(REPO / "params.yaml"), "--params", str(override)]
    env = pytest.MonkeyPatch()
    env.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    env.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        assert main(["download", *args, "ham"]) == 0
        assert main(["preprocess", *args, "ham"]) == 0
        yield root, args
    finally:
        env.undo()


def _stale_partial(target: Path) -> Path:
    """What a SIGKILLed command leaves beside ``target``: a partial folder whose lock nobody holds."""
    killed = Holder("partial", target)
    (killed.path / "data" / "case.zarr").write_bytes(b"x" * 4096)
    killed.kill()
    return killed.path


@pytest.mark.parametrize("stage", ["download", "preprocess"])
def test_a_forced_rerun_sweeps_a_killed_runs_partial_folder(project, stage, capsys):
    root, args = project
    target = root / ("raw" if stage == "download" else "preprocessed") / "ham"
    live = Holder("partial", target)  # first: it would sweep the stale one itself
    stale = _stale_partial(target)
    capsys.readouterr()
    assert main([stage, *args, "ham", "--force"]) == 0
    assert f"{stale}: removed, left by a killed run (4.0 KiB)" in capsys.readouterr().out
    assert _partials(target) == [live.path.name]
    live.finish()
    assert _partials(target) == []


def test_ctan_train_refuses_a_model_folder_another_train_is_writing(project, capsys):
    root, args = project
    train = ["train", *args, "--dataset", "ham", "--arch", "hps", "--seed", "0", "--threads", "1"]
    folder = root / "models" / "ham" / "hps" / "seed0"
    folder.mkdir(parents=True)
    dead = dead_pid()
    (folder / f".checkpoint.pt.tmp-{dead}").write_bytes(b"x" * 100)
    holder = Holder("exclusive", folder)
    before = listing(folder)
    capsys.readouterr()
    assert main(train) == 2
    err = capsys.readouterr().err
    assert f"ctan: error: {folder}: another ctan train (pid {holder.proc.pid} on host {HOST})" in err
    assert listing(folder) == before
    holder.kill()  # killed: the OS released its lock, its lock file stays

    assert main(train) == 0
    said = capsys.readouterr().out
    assert f"{folder / f'.checkpoint.pt.tmp-{dead}'}: removed, left by a killed run (100 B)" in said
    assert sorted(os.listdir(folder)) == [
        "checkpoint.pt",
        "curves.png",
        "history.json",
        "model.pt",
        "model.pt.sha256",
        "run.json",
    ]


def test_ctan_evaluate_sweeps_a_killed_evaluations_partial_folder(project, capsys):
    root, args = project
    run = ["--dataset", "ham", "--arch", "hps", "--seed", "0"]
    if not (root / "models" / "ham" / "hps" / "seed0" / "model.pt").is_file():  # run alone
        assert main(["train", *args, *run, "--threads", "1"]) == 0
    results = root / "results" / "ham" / "hps" / "seed0"
    live = Holder("partial", results)
    stale = _stale_partial(results)
    capsys.readouterr()
    assert main(["evaluate", *args, *run, "--threads", "1"]) == 0
    assert f"{stale}: removed, left by a killed run (4.0 KiB)" in capsys.readouterr().out
    assert _partials(results) == [live.path.name] and (results / "metrics.json").is_file()
    live.finish()
