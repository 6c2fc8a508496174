"""`ctan train`: determinism, exact resume after a kill, STL as one job per task, weights-only loading."""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ctan.config import dataset_settings, load_params
from ctan.training import checkpoint
from ctan.training.trainer import train

REPO = Path(__file__).resolve().parents[1]


def _write_params(root: Path, epochs: int) -> Path:
    """A tiny HAM10000 demo (2D, fast) with everything under `root`."""
    override = {
        "run": {"datasets": ["ham10000_demo"], "architectures": ["stl", "ctan"], "seeds": [0]},
        "paths": {k: str(root / k) for k in ("raw", "preprocessed", "models", "results")},
        "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "test"},
        "training": {"epochs": epochs, "batch_size": 4},
        "datasets": {"ham10000_demo": {"demo": {"train": 8, "validation": 4, "test": 4, "seed": 3}}},
    }
    path = root / f"override-{epochs}.yaml"
    path.write_text(yaml.safe_dump(override))
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    from ctan.fetch import download_dataset
    from ctan.preprocess.pipeline import preprocess_dataset
    from ctan.tracking import init_tracking

    root = tmp_path_factory.mktemp("train")
    params = load_params([REPO / "params.yaml", _write_params(root, 3)])
    settings = dataset_settings(params, "ham10000_demo")
    download_dataset(settings)
    preprocess_dataset(settings)
    init_tracking(params)
    return root


def _params(root: Path, epochs: int) -> dict:
    return load_params([REPO / "params.yaml", _write_params(root, epochs)])


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(path)["state_dict"]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_gives_the_same_weights(prepared, tmp_path):
    torch.set_num_threads(1)
    params = _params(prepared, 3)
    first = train(params, "ham10000_demo", "ctan", 0)[0]
    a = _weights(first / "model.pt")
    (first / "checkpoint.pt").unlink()  # force a fresh run, not a resume
    train(params, "ham10000_demo", "ctan", 0)
    assert _same(a, _weights(first / "model.pt"))
    other = dict(params, run=dict(params["run"]))
    train(other, "ham10000_demo", "ctan", 1)
    assert not _same(a, _weights(first.parent / "seed1" / "model.pt"))


def test_weights_do_not_depend_on_the_number_of_loader_workers(prepared, tmp_path):
    torch.set_num_threads(1)
    params = _params(prepared, 2)
    params["paths"] = {**params["paths"], "models": str(tmp_path / "w0")}
    a = _weights(train(params, "ham10000_demo", "hps", 0)[0] / "model.pt")
    params["paths"]["models"] = str(tmp_path / "w1")
    params["training"] = {**params["training"], "num_workers": 1}
    assert _same(a, _weights(train(params, "ham10000_demo", "hps", 0)[0] / "model.pt"))


def test_stl_trains_one_model_per_task(prepared):
    params = _params(prepared, 1)
    outs = train(params, "ham10000_demo", "stl", 0)
    assert [p.name for p in outs] == ["lesion", "diagnosis"]
    for out in outs:
        state = checkpoint.load(out / "model.pt")  # weights_only=True inside
        assert [t["name"] for t in state["tasks"]] == [out.name]
        assert (out / "history.json").is_file() and (out / "run.json").is_file()
        (epoch,) = json.loads((out / "history.json").read_text())["epochs"]
        assert epoch["step_seconds"] > 0 and 0 <= epoch["data_wait_fraction"] < 1
        assert epoch["peak_memory_mib"] > 50  # a Python process with torch loaded is well above this


def test_a_killed_job_resumes_to_the_same_weights(prepared, tmp_path):
    """Kill `ctan train` after its second epoch's checkpoint, start it again, compare with a clean run."""
    epochs = 8  # room between the kill (after epoch 2) and the end, however fast epochs are
    override = _write_params(prepared, epochs)
    cmd = [
        str(Path(sys.executable).parent / "ctan"),
        "train",
        "--params",
        str(REPO / "params.yaml"),
        "--params",
        str(override),
        "--dataset",
        "ham10000_demo",
        "--arch",
        "hps",
        "--seed",
        "0",
        "--threads",
        "1",
    ]
    env = dict(os.environ, MPLBACKEND="Agg")
    out = Path(prepared) / "models" / "ham10000_demo" / "hps" / "seed0"
    # Demo epochs take tens of ms: nothing may stall this poll. A collection could free an earlier
    # test's DataLoader with workers, whose shutdown waits ~10 s for them: collect now, not while polling.
    gc.collect()
    gc.disable()
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 240
        while time.time() < deadline:
            ckpt = out / "checkpoint.pt"
            if ckpt.is_file():
                try:
                    if checkpoint.load(ckpt)["epoch"] >= 2:
                        break
                except Exception:  # being replaced right now
                    pass
            if proc.poll() is not None:
                pytest.fail("training finished before it could be killed; make it longer")
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        gc.enable()
    killed_at = checkpoint.load(out / "checkpoint.pt")["epoch"]
    assert 2 <= killed_at < epochs and not (out / "model.pt").exists()

    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming {out} after epoch {killed_at}" in resumed.stdout
    resumed_weights = _weights(out / "model.pt")

    (out / "checkpoint.pt").unlink()
    clean = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr[-2000:]
    assert _same(resumed_weights, _weights(out / "model.pt"))


def test_task_flag_is_only_for_stl(prepared, capsys):
    from ctan.cli import main

    code = main(
        ["train", "--params", str(REPO / "params.yaml"), "--params", str(_write_params(prepared, 1))]
        + ["--dataset", "ham10000_demo", "--arch", "hps", "--seed", "0", "--task", "lesion"]
    )
    assert code == 2 and "--task is for --arch stl only" in capsys.readouterr().err


def test_a_finished_run_retrains_and_logs_each_epoch(prepared, capsys):
    """`snakemake -f` deletes model.pt and reruns: the finished checkpoint must not be resumed.

    Under a batch system stderr is not a terminal: each epoch writes one line (as it does here).
    """
    params = _params(prepared, 2)
    out = train(params, "ham10000_demo", "mtan", 0)[0]
    first = capsys.readouterr()
    assert "resuming" not in first.out
    lines = [line for line in first.err.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == ["1/2", "2/2"]
    parts = ["train loss", "val loss", "lesion ", "diagnosis ", "lesion/dice", "diagnosis/accuracy", "step"]
    assert all(part in lines[0] for part in parts), lines[0]
    run_id = json.loads((out / "run.json").read_text())["run_id"]

    (out / "model.pt").unlink()  # what a forced rerun does before the job starts
    train(params, "ham10000_demo", "mtan", 0)
    second = capsys.readouterr()
    assert f"{out / 'checkpoint.pt'}: its run has finished (epoch 2 of 2)" in second.out
    assert "resuming" not in second.out
    assert len([line for line in second.err.splitlines() if line.startswith("epoch ")]) == 2
    assert json.loads((out / "run.json").read_text())["run_id"] != run_id  # a new MLflow run


def test_a_checkpoint_resumes_only_its_own_unfinished_run():
    state = {**dict.fromkeys(checkpoint.CHECKPOINT_KEYS), "config_hash": "c", "code_hash": "k", "epoch": 2}
    assert checkpoint.why_not_resume(state, "c", "k", epochs=5) is None
    assert "parameters or data changed" in checkpoint.why_not_resume(state, "other", "k", epochs=5)
    assert "training code changed" in checkpoint.why_not_resume(state, "c", "edited", epochs=5)
    assert "training code changed" in checkpoint.why_not_resume({**state, "code_hash": None}, "c", "k", 5)
    assert "finished" in checkpoint.why_not_resume(state, "c", "k", epochs=2)


def _small_state(weighting: str = "uncertainty") -> checkpoint.TrainingState:
    from ctan.training.weighting import build_weighting

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    weights = build_weighting(weighting, ["a", "b"])
    optimizer = torch.optim.Adam([*model.parameters(), *weights.parameters()], lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    return checkpoint.TrainingState(model, weights, optimizer, scheduler)


def _trained_checkpoint(path: Path) -> None:
    """Two epochs of a small run, checkpointed as `ctan train` does."""
    state = _small_state()
    for epoch in (1, 2):
        loss = state.model(torch.ones(4, 3)).square().mean() + state.weighting.parameters().__next__().sum()
        loss.backward()
        state.optimizer.step()
        state.scheduler.step()
        state.add({"epoch": epoch, "selection_score": -loss.item()}, better=True)
    state.save(path, "c", "k")


def test_a_model_copied_over_the_checkpoint_is_named_as_such():
    model_file = {"model_config": {}, "state_dict": {}, "config_hash": "c", "identity": {}}
    said = checkpoint.why_not_resume(model_file, "c", "k", epochs=5)
    assert "a trained model.pt, not a training checkpoint" in said
    said = checkpoint.why_not_resume({"epoch": 3}, "c", "k", epochs=5)
    assert said.startswith("not a training checkpoint (no best_epoch, best_model") and "more)" in said


@pytest.mark.parametrize(
    "damage",
    [
        lambda s: s.update(model={"weight": torch.zeros(5, 3), "bias": torch.zeros(5)}),  # another model
        lambda s: s.update(history=json.dumps([{"epoch": 1}])),  # two epochs claimed, one recorded
        lambda s: s.update(best_epoch=7),
        lambda s: s.update(optimizer={"state": {}, "param_groups": []}),
        lambda s: s.update(weighting={"log_var": torch.zeros(9)}),
    ],
    ids=["model-shape", "history-short", "best-epoch", "optimizer-groups", "weighting"],
)
def test_an_inconsistent_checkpoint_starts_afresh_from_a_fresh_state(tmp_path, damage):
    """Hashes that match do not make the contents fit: such a checkpoint is named and not half-loaded."""
    path = tmp_path / "checkpoint.pt"
    _trained_checkpoint(path)
    saved = torch.load(path, weights_only=True)
    damage(saved)
    checkpoint.save_atomic(saved, path)
    state, fresh = _small_state(), _small_state()
    said = state.resume(path, "c", "k", epochs=5)
    assert said.startswith(f"{path}: inconsistent") and said.endswith("starting afresh"), said
    assert state.epoch == 0 and state.best_epoch == 0 and state.best_model is None
    for key, value in fresh.model.state_dict().items():
        assert torch.equal(state.model.state_dict()[key], value), key
    for key, value in fresh.weighting.state_dict().items():
        assert torch.equal(state.weighting.state_dict()[key], value), key
    assert state.optimizer.state_dict() == fresh.optimizer.state_dict()


def test_a_consistent_checkpoint_resumes(tmp_path):
    path = tmp_path / "checkpoint.pt"
    _trained_checkpoint(path)
    state = _small_state()
    assert state.resume(path, "c", "k", epochs=5) == f"resuming {tmp_path} after epoch 2"
    assert state.epoch == 2 and state.best_epoch == 2


def test_training_code_hash_covers_the_training_code_and_only_it(tmp_path, monkeypatch):
    """The hash moves with an edit to a model or the trainer (the files whose edit reruns `train` in
    Snakemake, ctan.provenance.STAGE_CODE) and not with plumbing such as the CLI."""
    from ctan.provenance import stage_code

    package = Path(checkpoint.__file__).resolve().parents[1]
    files = {f.relative_to(package).as_posix() for f in stage_code("train")}
    assert {"models/ctan.py", "training/trainer.py", "loader.py", "inference.py"} <= files
    assert not files & {"cli.py", "config.py", "tracking.py", "evaluation.py"}
    copy = tmp_path / "ctan"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    fake = copy / "training" / "checkpoint.py"
    monkeypatch.setattr(checkpoint, "__file__", str(fake))
    before = checkpoint.code_hash()
    (copy / "cli.py").write_text((copy / "cli.py").read_text() + "\n# a comment\n")
    assert checkpoint.code_hash() == before
    (copy / "models" / "ctan.py").write_text((copy / "models" / "ctan.py").read_text() + "\n# a comment\n")
    assert checkpoint.code_hash() != before


def test_precision_and_memory_format_options(prepared):
    """channels_last trains the same model (within float rounding); bf16 autocast runs on the CPU."""
    torch.set_num_threads(1)

    def run(**training) -> tuple[dict[str, torch.Tensor], dict]:
        params = _params(prepared, 1)
        params = dict(params, training={**params["training"], **training})
        out = train(params, "ham10000_demo", "ctan", 0, device="cpu")[0]
        history = json.loads((out / "history.json").read_text())
        return _weights(out / "model.pt"), history["epochs"][-1]

    plain, plain_record = run(precision="fp32", channels_last=False)
    last, last_record = run(precision="fp32", channels_last=True)
    assert plain.keys() == last.keys()
    for split in ("train_loss", "val_loss"):  # (Adam turns rounding in near-zero gradients into steps)
        for task, loss in plain_record[split].items():
            assert last_record[split][task] == pytest.approx(loss, rel=1e-4), (split, task)
    _, record = run(precision="bf16")
    assert all(torch.isfinite(torch.tensor(v)) for v in record["train_loss"].values())


def test_evaluate_refuses_a_model_of_another_architecture(prepared):
    """The hash record travels with a copied model.pt, so the model's own configuration decides: an HPS
    model copied into ctan's (or an STL network's) folder must not be scored and filed as that."""
    import shutil

    from ctan.errors import CtanError
    from ctan.evaluation import load_models
    from ctan.layout import model_dir

    torch.set_num_threads(1)
    params = _params(prepared, 1)
    settings = dataset_settings(params, "ham10000_demo")
    source = train(params, "ham10000_demo", "hps", 7)[0]
    for arch, task, expected in [
        ("ctan", None, "the ctan model of lesion, diagnosis"),
        ("stl", "lesion", "the stl model of lesion "),
    ]:
        target = model_dir(settings, arch, 7, task)
        target.mkdir(parents=True, exist_ok=True)
        for name in ("model.pt", "model.pt.sha256"):
            shutil.copy(source / name, target / name)
        with pytest.raises(CtanError, match=f"holds a hps model of lesion, diagnosis, not {expected}") as err:
            load_models(settings, arch, 7, torch.device("cpu"))
        assert err.value.path == str(target / "model.pt")
    assert set(load_models(settings, "hps", 7, torch.device("cpu"))[0]) == set(settings.tasks)


def _prepare_in_run_folder(name: str, override: dict) -> tuple[dict, object]:
    """In the current run folder: write the override, download and preprocess ``name``; (params, settings)."""
    from ctan.fetch import download_dataset
    from ctan.preprocess.pipeline import preprocess_dataset

    Path("o.yaml").write_text(yaml.safe_dump(override))
    params = load_params([Path("params.yaml"), Path("o.yaml")])
    settings = dataset_settings(params, name)
    download_dataset(settings)
    preprocess_dataset(settings)
    return params, settings


def test_cases_on_their_native_grid_train_and_evaluate(tmp_path):
    """preprocess.shape null: each case keeps its own size (none a multiple of 2**depth here). Patches
    train; whole volumes validate one at a time and are scored at their own size; batches of whole
    volumes of different sizes are one line naming them."""
    from conftest import run_folder
    from ctan.errors import CtanError
    from ctan.evaluation import evaluate
    from ctan.store import SplitStore
    from ctan.tracking import init_tracking

    name = "prostate_demo"
    override = {
        "run": {"datasets": [name], "architectures": ["stl", "ctan"], "seeds": [0]},
        "mlflow": {"tracking_uri": "mlruns", "experiment": "native"},
        "training": {"epochs": 1, "batch_size": 2, "cache_mb": 0},
        "datasets": {
            name: {
                "demo": {"train": 4, "validation": 2, "test": 2, "seed": 12},
                "preprocess": {"spacing": [9.0, 9.0, 9.0], "shape": None, "ct_window": [-300, 500]},
                "training": {"epochs": 1, "patch_size": [8, 8, 8]},
            }
        },
    }
    with run_folder(tmp_path / "run"):
        params, settings = _prepare_in_run_folder(name, override)
        store = SplitStore.open(settings.preprocessed_dir / "test.zarr")
        sizes = {tuple(store.array(c, "image").shape[1:]) for c in store.case_ids}
        assert any(n % 8 for size in sizes for n in size), sizes  # the padded path is taken
        # Larger than the 8-voxel training patches: validation and test predict by sliding windows.
        assert all(any(n > 8 for n in size) for size in sizes), sizes
        init_tracking(params)
        train(params, name, "ctan", 0)
        evaluate(params, name, "ctan", 0)
        prediction = np.load(
            settings.results_dir / "ctan" / "seed0" / "predictions" / f"{store.case_ids[0]}.npz"
        )
        assert prediction["dose"].shape[1:] == store.array(store.case_ids[0], "image").shape[1:]

        whole = {**override, "training": {**override["training"]}}
        whole["datasets"][name]["training"] = {"epochs": 1, "patch_size": None}
        Path("o.yaml").write_text(yaml.safe_dump(whole))
        params = load_params([Path("params.yaml"), Path("o.yaml")])
        with pytest.raises(CtanError, match="cases of one batch differ in size .*batch_size 1"):
            train(params, name, "ctan", 1)


def test_stl_severity_is_selected_among_covid_positive_validation_cases(tmp_path):
    """A validation split with enough COVID-positive cases of each severity: the STL severity network
    (which does not train covid) is scored, and its epoch kept, by the AUC among COVID-positive cases,
    the metric the test split reports."""
    from conftest import run_folder
    from ctan.tasks import Task
    from ctan.tracking import init_tracking
    from ctan.training.selection import selection_metric_name

    name = "stoic_demo"
    override = {
        "run": {"datasets": [name], "architectures": ["stl"], "seeds": [0]},
        "mlflow": {"tracking_uri": "mlruns", "experiment": "severity"},
        "training": {"epochs": 1, "batch_size": 4, "cache_mb": 0},
        "datasets": {name: {"demo": {"train": 4, "validation": 40, "test": 2, "seed": 5}}},
    }
    with run_folder(tmp_path / "run"):
        params, _ = _prepare_in_run_folder(name, override)
        init_tracking(params)
        [folder] = train(params, name, "stl", 0, task="severity")
        history = json.loads((folder / "history.json").read_text())
        metrics = history["epochs"][0]["val_metrics"]["severity"]
        assert 0.0 <= metrics["auc_covid_positive"] <= 1.0
        severity = Task("severity", "classification", "severity", classes=2)
        assert selection_metric_name(severity, metrics) == "auc_covid_positive"
