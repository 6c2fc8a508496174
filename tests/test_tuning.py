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
    # One point: nothing to tune; training uses training.lr (and that is what is recorded).
    assert tuned_values(single, "ctan") == {"lr": single.training["lr"]} != {"lr": 0.002}


def test_what_training_uses_is_what_provenance_records_when_nothing_is_tuned(prepared):
    """A one-value tuning.lr differing from training.lr was recorded as the value used while training
    used training.lr."""
    from ctan.evaluation import _tuning_record
    from ctan.training.trainer import train

    params = _params(prepared, [0.002])
    settings = dataset_settings(params, "ham10000_demo")
    assert settings.training["lr"] != 0.002
    (model,) = train(params, "ham10000_demo", "hps", 1)
    used = json.loads((model / "history.json").read_text())["epochs"][0]["lr"]
    assert used == pytest.approx(settings.training["lr"])
    assert _tuning_record(settings, "hps") == {"tuned": False, "values": {"lr": used}}


# choice.json records what it depends on; `ctan train` refuses a stale or damaged one in one line.

TUNE_HPS = "ctan tune --dataset ham10000_demo --arch hps"


@pytest.fixture(scope="module")
def tuned(prepared) -> tuple[Path, str]:
    """The HPS choice of a fresh tuning (path, its text, to restore after a test edits it)."""
    from ctan.training.tuning import tune

    (path,) = tune(_params(prepared, [0.001, 0.003]), "ham10000_demo", "hps")
    return path, path.read_text()


def _variant(root: Path, section: str, key: str, value) -> dict:
    params = _params(root, [0.001, 0.003])
    params[section] = {**params[section], key: value}
    return params


def _refused(settings, arch: str = "hps", task: str | None = None) -> str:
    from ctan.training.tuning import tuned_values

    with pytest.raises(CtanError) as err:
        tuned_values(settings, arch, task)
    message = str(err.value)
    assert "\n" not in message and "choice.json" in message, message
    return message


def test_a_fresh_tuning_choice_is_accepted_and_records_what_it_depends_on(prepared, tuned):
    from ctan.manifest import read_manifest
    from ctan.training.tuning import tune, tuned_values

    path, _ = tuned
    params = _params(prepared, [0.001, 0.003])
    settings = dataset_settings(params, "ham10000_demo")
    choice = json.loads(path.read_text())
    depends = choice["depends_on"]
    assert depends["data_hash"] == read_manifest(settings.preprocessed_dir)["data_hash"]
    assert depends["tuning"] == {"grid": {"lr": [0.001, 0.003]}, "epochs": 1, "seed": 0}
    assert "lr" not in depends["training"] and depends["training"]["weighting"] == "equal"
    assert tuned_values(settings, "hps") == choice["chosen"]
    # The training epochs are not the tuning runs' epochs (tuning.epochs is set): still the same choice.
    longer = dataset_settings(_variant(prepared, "training", "epochs", 7), "ham10000_demo")
    assert tuned_values(longer, "hps") == choice["chosen"]
    for stl in tune(params, "ham10000_demo", "stl"):  # each STL network's choice is accepted as well
        assert tuned_values(settings, "stl", stl.parent.name) == json.loads(stl.read_text())["chosen"]


@pytest.mark.parametrize(
    ("section", "key", "value", "named"),
    [
        ("tuning", "epochs", 2, "tuning.epochs: 1 -> 2"),
        ("tuning", "seed", 3, "tuning.seed: 0 -> 3"),
        ("training", "weighting", "uncertainty", 'training.weighting: "equal" -> "uncertainty"'),
        ("training", "augment", False, "training.augment: true -> false"),
        ("model", "width", 4, "model.width: 8 -> 4"),
    ],
)
def test_a_choice_made_for_other_settings_is_refused(prepared, tuned, section, key, value, named):
    settings = dataset_settings(_variant(prepared, section, key, value), "ham10000_demo")
    message = _refused(settings)
    assert "stale" in message and named in message and TUNE_HPS in message, message


def test_a_choice_made_on_other_data_or_for_another_model_is_refused(prepared, tuned, tmp_path):
    from ctan.layout import choice_path
    from ctan.training.tuning import tuned_values

    path, text = tuned
    settings = dataset_settings(_params(prepared, [0.001, 0.003]), "ham10000_demo")
    choice = json.loads(text)
    try:
        path.write_text(json.dumps({**choice, "depends_on": {**choice["depends_on"], "data_hash": "0" * 64}}))
        assert "preprocessed data changed" in _refused(settings)
        # Edited training code reruns `tune` in Snakemake and DVC; `ctan train` by hand agrees.
        path.write_text(
            json.dumps({**choice, "depends_on": {**choice["depends_on"], "training_code": "0" * 64}})
        )
        message = _refused(settings)
        assert "the training code changed" in message and "older ctan" not in message, message
        # Evaluation only reads which values a model was trained with: a code edit since is not its concern.
        assert tuned_values(settings, "hps", same_code=False) == choice["chosen"]
        before = {k: v for k, v in choice["depends_on"].items() if k != "training_code"}
        path.write_text(json.dumps({**choice, "depends_on": before}))
        assert "the training code changed (ctan's training" in (message := _refused(settings))
        assert "made by an older ctan" in message, message
    finally:
        path.write_text(text)
    copied = choice_path(settings, "mtan")  # hps's choice copied into mtan's folder
    copied.parent.mkdir(parents=True, exist_ok=True)
    try:
        copied.write_text(text)
        message = _refused(settings, "mtan")
        assert (
            'architecture: "hps" -> "mtan"' in message
            and "ctan tune --dataset ham10000_demo --arch mtan" in message
        )
    finally:
        copied.unlink()


@pytest.mark.parametrize(
    "damage",
    [
        "not json",
        "a list",
        "no chosen",
        "older ctan",
        "off the grid",
        "negative lr",
        "a string",
        "a bool",
        "another key",
        "not the best",
    ],
)
def test_a_damaged_choice_is_a_one_line_error(prepared, tuned, damage):
    path, text = tuned
    settings = dataset_settings(_params(prepared, [0.001, 0.003]), "ham10000_demo")
    choice = json.loads(text)
    other = next(c["point"] for c in choice["candidates"] if c["point"] != choice["chosen"])
    edits = {
        "not json": "{broken",
        "a list": "[]",
        "no chosen": {k: v for k, v in choice.items() if k != "chosen"},
        "older ctan": {k: v for k, v in choice.items() if k not in ("depends_on", "depends_on_hash")},
        "off the grid": {**choice, "chosen": {"lr": 0.007}},
        "negative lr": {**choice, "chosen": {"lr": -1}},
        "a string": {**choice, "chosen": {"lr": "0.001"}},
        "a bool": {**choice, "chosen": {"lr": True}},
        "another key": {**choice, "chosen": {"epochs": 1.5}},
        "not the best": {**choice, "chosen": other},
    }
    edit = edits[damage]
    try:
        path.write_text(edit if isinstance(edit, str) else json.dumps(edit))
        message = _refused(settings)
        assert TUNE_HPS in message, message
    finally:
        path.write_text(text)


def test_a_diverging_grid_point_is_recorded_as_failed(prepared, monkeypatch):
    """The trainer's NonFiniteLoss (a CtanError) for one point: tuning goes on; for every point: it fails."""
    import ctan.training.trainer as trainer
    from ctan.training.tuning import tune, tuned_values

    class NonFiniteLoss(CtanError):
        pass

    monkeypatch.setattr(trainer, "NonFiniteLoss", NonFiniteLoss, raising=False)
    real_train = trainer.train
    diverging: set[float] = set()

    def train(params, dataset, *args, **kwargs):
        lr = params["datasets"][dataset]["training"]["lr"]
        if lr in diverging:
            raise NonFiniteLoss(None, f"non-finite training loss at epoch 1 (lr {lr})")
        return real_train(params, dataset, *args, **kwargs)

    monkeypatch.setattr(trainer, "train", train)
    params = _params(prepared, [0.001, 0.003])
    settings = dataset_settings(params, "ham10000_demo")

    diverging.update({0.001, 0.003})
    with pytest.raises(CtanError, match="every point of the tuning grid diverged"):
        tune(params, "ham10000_demo", "ctan")
    assert not (prepared / "models" / "ham10000_demo" / "ctan" / "tuning" / "choice.json").exists()

    diverging.discard(0.003)
    (path,) = tune(params, "ham10000_demo", "ctan")
    choice = json.loads(path.read_text())
    failed, trained = choice["candidates"]
    assert failed["point"] == {"lr": 0.001} and failed["failed"].startswith("non-finite loss")
    assert failed["score"] is None and trained["score"] is not None
    assert choice["chosen"] == {"lr": 0.003} == tuned_values(settings, "ctan")


def test_grid_points_get_folders_of_their_own():
    from ctan.training.tuning import _point_name

    assert _point_name({"lr": 0.001}) == "lr0.001" and _point_name({"lr": 3e-4}) == "lr0.0003"
    assert _point_name({"lr": 0.0010000001}) != _point_name({"lr": 0.001})
