"""`ctan tune`: a grid scored on validation only, applied by `ctan train`, recorded in provenance."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from ctan.config import dataset_settings, load_params
from ctan.errors import CtanError

REPO = Path(__file__).resolve().parents[1]


def _params(root: Path, grid: list[float]) -> dict:
    override = {
        "run": {"datasets": ["ham10000_demo"], "architectures": ["stl", "hps"], "seeds": [0]},
        "paths": {k: str(root / k) for k in ("raw", "preprocessed", "models", "results")},
        "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "test"},
        "training": {"epochs": 2, "batch_size": 4},
        "tuning": {"lr": grid, "epochs": 1, "seed": 0},
        "datasets": {"ham10000_demo": {"demo": {"train": 8, "validation": 4, "test": 4, "seed": 3}}},
    }
    path = root / "override.yaml"
    path.write_text(yaml.safe_dump(override))
    return load_params([REPO / "params.yaml", path])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A tiny HAM10000 demo whose test split is *gone*: tuning and training must never need it."""
    from ctan.fetch import download_dataset
    from ctan.preprocess.pipeline import preprocess_dataset
    from ctan.tracking import init_tracking

    root = tmp_path_factory.mktemp("tune")
    params = _params(root, [0.001, 0.003])
    settings = dataset_settings(params, "ham10000_demo")
    download_dataset(settings)
    preprocess_dataset(settings)
    init_tracking(params)
    shutil.rmtree(settings.preprocessed_dir / "test.zarr")
    return root


def test_tuning_and_training_never_read_the_test_split(prepared):
    from ctan.training.trainer import train
    from ctan.training.tuning import choice_path, tune, tuned_values

    params = _params(prepared, [0.001, 0.003])
    settings = dataset_settings(params, "ham10000_demo")
    (hps,) = tune(params, "ham10000_demo", "hps")
    assert hps == choice_path(settings, "hps")
    stl = tune(params, "ham10000_demo", "stl")
    assert [p.parent.name for p in stl] == list(settings.tasks)  # each STL network tuned on its own

    choice = json.loads(hps.read_text())
    assert [c["point"]["lr"] for c in choice["candidates"]] == [0.001, 0.003]
    assert choice["chosen"]["lr"] in (0.001, 0.003)
    assert choice["chosen_score"] == max(c["score"] for c in choice["candidates"])
    for c in choice["candidates"]:  # scored on validation metrics of the kept epoch
        assert set(c["val_metrics"]) == set(settings.tasks)

    (model,) = train(params, "ham10000_demo", "hps", 0)
    history = json.loads((model / "history.json").read_text())
    assert history["epochs"][0]["lr"] == pytest.approx(tuned_values(settings, "hps")["lr"])


def test_training_refuses_to_guess_without_the_tuning_choice(tmp_path):
    from ctan.training.tuning import tuned_values

    settings = dataset_settings(_params(tmp_path, [0.001, 0.003]), "ham10000_demo")
    with pytest.raises(CtanError, match="ctan tune --dataset ham10000_demo --arch ctan"):
        tuned_values(settings, "ctan")
    single = dataset_settings(_params(tmp_path, [0.002]), "ham10000_demo")
    assert tuned_values(single, "ctan") == {}  # one point: used as given, nothing to tune
