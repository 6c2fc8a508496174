"""A model is scored only under the data, settings and CT window it was trained with; a diverging
training writes no model; `ctan evaluate` writes its results all or none.

One tiny 2D run (HAM10000 demo, HPS and STL, one epoch) and one tiny 3D run (prostate demo, HPS, one
epoch) are built once; every test works on a copy of them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import run_folder, work_in_copy
from ctan.cli import main
from ctan.training import checkpoint

REPO = Path(__file__).resolve().parents[1]
HAM = "ham10000_demo"
PROSTATE = "prostate_demo"


def _override(root: Path, name: str = "override.yaml", **extra) -> Path:
    document = {
        "run": {"datasets": [HAM], "architectures": ["stl", "hps"], "seeds": [0]},
        "paths": {k: k for k in ("raw", "preprocessed", "models", "results")},
        # A file store: creating a SQLite one costs ~15 s of migrations, more than the rest of the run.
        "mlflow": {"tracking_uri": "mlruns", "experiment": "integrity-test"},
        "training": {"epochs": 1, "batch_size": 4, "cache_mb": 0},
        "datasets": {
            HAM: {"demo": {"train": 4, "validation": 2, "test": 3, "seed": 5}},
            PROSTATE: {
                "demo": {"train": 2, "validation": 1, "test": 2, "seed": 12},
                "training": {"epochs": 1},
            },
        },
    }
    for key, value in extra.items():
        document[key] = value
    path = root / name
    path.write_text(yaml.safe_dump(document))
    return path


def _interrupted(params: dict, dataset: str, arch: str, seed: int) -> None:
    """Seed ``seed`` killed after epoch 1 of 2, as a job killed then leaves it (checkpoint.pt only)."""
    import copy

    import ctan.training.trainer as trainer

    params = copy.deepcopy(params)
    params["datasets"][dataset]["training"]["epochs"] = 2
    real = trainer.train_one_epoch

    def killed_in_epoch_2(state, tasks, train_loader, val_loader, epoch, *args):
        if epoch == 2:
            raise KeyboardInterrupt
        return real(state, tasks, train_loader, val_loader, epoch, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "train_one_epoch", killed_in_epoch_2)
        with pytest.raises(KeyboardInterrupt):
            trainer.train(params, dataset, arch, seed)
    folder = Path("models") / dataset / arch / f"seed{seed}"
    assert (folder / "checkpoint.pt").is_file() and not (folder / "model.pt").exists()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    from ctan.config import dataset_settings, load_params
    from ctan.evaluation import evaluate
    from ctan.fetch import download_dataset
    from ctan.preprocess.pipeline import preprocess_dataset
    from ctan.tracking import init_tracking
    from ctan.training.trainer import train

    root = tmp_path_factory.mktemp("integrity") / "run"
    with run_folder(root):
        params = load_params([Path("params.yaml"), _override(root).relative_to(root)])
        for dataset in (HAM, PROSTATE):
            settings = dataset_settings(params, dataset)
            download_dataset(settings)
            preprocess_dataset(settings)
        init_tracking(params)
        for arch in ("stl", "hps"):
            train(params, HAM, arch, 0)
            evaluate(params, HAM, arch, 0)
        train(params, PROSTATE, "hps", 0)  # one epoch, finished and evaluated
        evaluate(params, PROSTATE, "hps", 0)
        _interrupted(params, PROSTATE, "hps", 1)
    return root


@pytest.fixture
def run(built, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the tiny run, as the working directory."""
    return work_in_copy(built, tmp_path, monkeypatch)


def _ctan(capsys, *args: str, extra: Path | None = None) -> tuple[int, str]:
    files = ["--params", "params.yaml", "--params", "override.yaml"]
    if extra is not None:
        files += ["--params", str(extra)]
    capsys.readouterr()
    code = main([args[0], *files, *args[1:]])
    captured = capsys.readouterr()
    return code, captured.err


def _extra(root: Path, document: dict) -> Path:
    path = root / "extra.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def _results(dataset: str, arch: str) -> Path:
    return Path("results") / dataset / arch / "seed0"


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_kept(folder: Path, before: dict[str, bytes]) -> None:
    assert _snapshot(folder) == before, "the previous results changed"
    leftovers = [p.name for p in folder.parent.iterdir() if p.name != folder.name]
    assert not leftovers, f"partial results left beside {folder}: {leftovers}"


def _one_error_line(err: str) -> str:
    """The error: one line (stderr also holds the per-epoch log lines of a batch run)."""
    lines = [line for line in err.splitlines() if line.startswith("ctan: error")]
    assert len(lines) == 1, err
    return lines[0]


def _rewrite_model(path: Path, change) -> None:
    """Edit a model.pt and record its new SHA-256, as a model trained that way would have it."""
    saved = checkpoint.load(path)
    change(saved)
    checkpoint.save_model(saved, path)


# --- A3: the model must be the one the current data and params train -------------------------------


def test_evaluate_refuses_a_model_trained_with_other_settings(run, capsys):
    before = _snapshot(_results(HAM, "hps"))
    other_lr = _extra(run, {"training": {"lr": 0.001}})
    code, err = _ctan(capsys, "evaluate", "--dataset", HAM, "--arch", "hps", "--seed", "0", extra=other_lr)
    line = _one_error_line(err)
    assert code == 2
    assert "models/ham10000_demo/hps/seed0/model.pt" in line
    assert "training.lr: 0.005 -> 0.001" in line
    assert "`ctan train --dataset ham10000_demo --arch hps --seed 0`" in line
    _assert_kept(_results(HAM, "hps"), before)


def test_evaluate_refuses_a_model_trained_on_other_data(run, capsys):
    model = Path("models") / HAM / "hps" / "seed0" / "model.pt"
    _rewrite_model(model, lambda saved: saved.update(data_hash="0bc6db98afc0" + "0" * 52))
    before = _snapshot(_results(HAM, "hps"))
    code, err = _ctan(capsys, "evaluate", "--dataset", HAM, "--arch", "hps", "--seed", "0")
    line = _one_error_line(err)
    assert code == 2
    assert str(model) in line and "trained on other data (data_hash 0bc6db98afc0)" in line
    assert "ctan train --dataset ham10000_demo --arch hps --seed 0" in line
    _assert_kept(_results(HAM, "hps"), before)


def test_evaluate_checks_each_stl_network(run, capsys):
    # Unchanged, STL evaluates (one network per task) ...
    code, err = _ctan(capsys, "evaluate", "--dataset", HAM, "--arch", "stl", "--seed", "0")
    assert code == 0, err
    # ... and a network trained with another model width is refused, named with its --task command.
    model = Path("models") / HAM / "stl" / "seed0" / "diagnosis" / "model.pt"

    def wider(saved):
        saved["identity"]["model"]["width"] = 99
        saved["config_hash"] = "0" * 16

    _rewrite_model(model, wider)
    before = _snapshot(_results(HAM, "stl"))
    code, err = _ctan(capsys, "evaluate", "--dataset", HAM, "--arch", "stl", "--seed", "0")
    line = _one_error_line(err)
    assert code == 2 and str(model) in line and "model.width: 99 ->" in line
    assert "--arch stl --seed 0 --task diagnosis" in line
    _assert_kept(_results(HAM, "stl"), before)


# --- A1: the CT window is part of what a model is trained with --------------------------------------


def test_a_ct_window_change_is_refused_by_evaluate_and_not_resumed(run, capsys):
    window = _extra(run, {"datasets": {PROSTATE: {"preprocess": {"ct_window": [-1000, 3000]}}}})
    code, err = _ctan(capsys, "preprocess", PROSTATE, "--force", extra=window)
    assert code == 0, err
    before = _snapshot(_results(PROSTATE, "hps"))
    # The arrays keep HU, so the data_hash is unchanged: only the model's record can tell.
    code, err = _ctan(capsys, "evaluate", "--dataset", PROSTATE, "--arch", "hps", "--seed", "0", extra=window)
    line = _one_error_line(err)
    assert code == 2 and "models/prostate_demo/hps/seed0/model.pt" in line
    assert "intensity.ct_window: [-300.0, 500.0] -> [-1000.0, 3000.0]" in line
    _assert_kept(_results(PROSTATE, "hps"), before)
    # The run killed after epoch 1 of 2 under the old window does not resume under the new one.
    out = _train_seed1(capsys)
    assert "starting afresh" in out and "resuming" not in out


def test_an_unchanged_ct_window_resumes(run, capsys):
    out = _train_seed1(capsys)
    assert "resuming" in out and "after epoch 1" in out


def _train_seed1(capsys) -> str:
    from ctan.config import load_params
    from ctan.training.trainer import train

    files = [Path("params.yaml"), Path("override.yaml")]
    if Path("extra.yaml").is_file():
        files.append(Path("extra.yaml"))
    params = load_params(files)
    params["datasets"][PROSTATE]["training"]["epochs"] = 2
    capsys.readouterr()
    train(params, PROSTATE, "hps", 1)
    history = json.loads((Path("models") / PROSTATE / "hps" / "seed1" / "history.json").read_text())
    assert len(history["epochs"]) == 2
    return capsys.readouterr().out


# --- A4: a diverging training writes no model --------------------------------------------------------


def test_a_non_finite_loss_stops_training_without_a_model(run, capsys, monkeypatch):
    import ctan.training.trainer as trainer

    def nan_loss(task, prediction, batch):
        return prediction.sum() * float("nan")

    monkeypatch.setattr(trainer, "task_loss", nan_loss)
    from ctan.config import load_params

    folder = Path("models") / HAM / "hps" / "seed1"
    params = load_params([Path("params.yaml"), Path("override.yaml")])
    with pytest.raises(trainer.NonFiniteLoss) as caught:
        trainer.train(params, HAM, "hps", 1)
    assert caught.value.epoch == 1 and caught.value.step == 1
    message = str(caught.value)
    assert str(folder) in message and "epoch 1, step 1" in message and "lower training.lr" in message
    assert "\n" not in message
    assert not (folder / "model.pt").exists() and not (folder / "history.json").exists()


def test_a_huge_learning_rate_is_one_line_and_no_model(run, capsys):
    extra = _extra(run, {"training": {"lr": 1.0e8, "epochs": 2}})
    code, err = _ctan(capsys, "train", "--dataset", HAM, "--arch", "hps", "--seed", "1", extra=extra)
    line = _one_error_line(err)
    assert code == 2 and "training diverged at epoch" in line and "lower training.lr" in line
    assert not (Path("models") / HAM / "hps" / "seed1" / "model.pt").exists()


# --- B6 + C: all or none ------------------------------------------------------------------------------


def test_a_model_predicting_nan_is_refused_and_the_old_results_kept(run, capsys):
    model = Path("models") / HAM / "hps" / "seed0" / "model.pt"

    def poison(saved):
        for tensor in saved["state_dict"].values():
            if tensor.is_floating_point():
                tensor.fill_(float("nan"))

    _rewrite_model(model, poison)
    before = _snapshot(_results(HAM, "hps"))
    code, err = _ctan(capsys, "evaluate", "--dataset", HAM, "--arch", "hps", "--seed", "0")
    line = _one_error_line(err)
    assert code == 2 and str(model) in line and "predicts non-finite values" in line
    _assert_kept(_results(HAM, "hps"), before)


def test_a_failure_late_in_evaluate_keeps_the_old_results(run, monkeypatch):
    from ctan import evaluation
    from ctan.config import load_params

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(evaluation, "_log_to_mlflow", broken)
    before = _snapshot(_results(HAM, "hps"))
    with pytest.raises(RuntimeError, match="disk full"):
        evaluation.evaluate(load_params([Path("params.yaml"), Path("override.yaml")]), HAM, "hps", 0)
    _assert_kept(_results(HAM, "hps"), before)


def test_evaluate_replaces_the_results_as_a_whole(run):
    from ctan import evaluation
    from ctan.config import load_params

    stale = _results(HAM, "hps") / "stale.txt"
    stale.write_text("from an older evaluation")
    path = evaluation.evaluate(load_params([Path("params.yaml"), Path("override.yaml")]), HAM, "hps", 0)
    assert path == _results(HAM, "hps") / "metrics.json" and path.is_file()
    assert not stale.exists()
    assert [p.name for p in _results(HAM, "hps").parent.iterdir()] == ["seed0"]


# --- predictions and references that cannot be scored together ------------------------------------


def test_a_prediction_on_another_grid_names_the_model_and_case(run, capsys, monkeypatch):
    """A dense output one voxel short of its reference: numpy's broadcast error, a traceback, before."""
    from ctan import evaluation

    real = evaluation.predict

    def one_voxel_short(*args, **kwargs):
        return {name: p[..., :-1] if p.ndim > 2 else p for name, p in real(*args, **kwargs).items()}

    monkeypatch.setattr(evaluation, "predict", one_voxel_short)
    before = _snapshot(_results(PROSTATE, "hps"))
    code, err = _ctan(capsys, "evaluate", "--dataset", PROSTATE, "--arch", "hps", "--seed", "0")
    line = _one_error_line(err)
    assert code == 2 and str(Path("models") / PROSTATE / "hps" / "seed0" / "model.pt") in line
    assert "predicts dose of shape (1, 24, 32, 31)" in line and "whose reference is (1, 24, 32, 32)" in line
    _assert_kept(_results(PROSTATE, "hps"), before)


def test_an_empty_possible_dose_mask_is_refused_not_left_out_of_the_dose_score(run, capsys, monkeypatch):
    """Its dose score is 0/0: NaN, which the mean over cases then skipped, with exit status 0."""
    from ctan.loader import CaseDataset

    real = CaseDataset.__getitem__

    def without_mask(self, index):
        item = real(self, index)
        if "possible_dose_mask" in item and index == 0:
            item["possible_dose_mask"] = item["possible_dose_mask"] * 0
        return item

    monkeypatch.setattr(CaseDataset, "__getitem__", without_mask)
    before = _snapshot(_results(PROSTATE, "hps"))
    code, err = _ctan(capsys, "evaluate", "--dataset", PROSTATE, "--arch", "hps", "--seed", "0")
    line = _one_error_line(err)
    assert code == 2 and "test.zarr/" in line and "the possible-dose mask is empty" in line
    _assert_kept(_results(PROSTATE, "hps"), before)
