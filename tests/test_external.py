"""External test sets (`external_of:`): another site's cases, preprocessed with the training dataset's
plan, never read by training or tuning, evaluated with its models beside the internal test split."""

from __future__ import annotations

import copy
import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import strict_json_loads
from ctan.config import dataset_settings, external_sets, load_params, validate
from ctan.errors import CtanError
from ctan.fetch import download_dataset
from ctan.manifest import compatibility_problems, read_manifest
from ctan.preprocess.pipeline import preprocess_dataset

REPO = Path(__file__).resolve().parents[1]


def _base() -> dict:
    return load_params([REPO / "params.yaml"])


def _with(params: dict, **entries) -> dict:
    out = copy.deepcopy(params)
    out["datasets"].update(entries)
    return out


EXTERNAL = {"format": "openkbp", "external_of": "openkbp_demo", "source": "demo", "sha256": None}


# --- parameters ------------------------------------------------------------------------------------


def test_an_external_set_takes_tasks_and_plan_from_its_training_dataset():
    params = _base()
    settings = dataset_settings(params, "openkbp_demo_external")
    training = dataset_settings(params, "openkbp_demo")
    assert settings.external_of == "openkbp_demo"
    assert settings.tasks == training.tasks and settings.preprocess == training.preprocess
    assert settings.models_dir == training.models_dir  # the models it is evaluated with
    assert settings.results_dir == Path("results/openkbp_demo/external/openkbp_demo_external")
    assert settings.raw_dir == Path("data/raw/openkbp_demo_external")
    assert settings.data_section["external_of"] == "openkbp_demo"
    assert "external_of" not in training.data_section  # training sets' hashes are unchanged
    assert external_sets(params, "openkbp_demo") == ["openkbp_demo_external"]
    assert external_sets(params, "prostate_demo") == []


def test_a_dataset_may_set_its_own_seeds_and_its_external_sets_follow():
    params = _base()
    assert dataset_settings(params, "openkbp_demo").seeds == tuple(params["run"]["seeds"])
    params["datasets"]["openkbp_demo"]["seeds"] = [3, 7]
    params = validate(params, source="test")
    assert dataset_settings(params, "openkbp_demo").seeds == (3, 7)
    assert dataset_settings(params, "openkbp_demo_external").seeds == (3, 7)  # its models' seeds
    assert dataset_settings(params, "ham10000_demo").seeds == tuple(params["run"]["seeds"])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"run": {"datasets": ["openkbp_demo_external"]}}, "never trained on"),
        ({"external_of": "nowhere"}, "names 'nowhere', which is not under datasets"),
        ({"external_of": "other_external"}, "itself an external test set"),
        (
            {"format": "nifti_cases"},
            "format is nifti_cases, but its training dataset openkbp_demo is openkbp",
        ),
        ({"tasks": ["dose"]}, r"tasks \['dose'\] differ from the tasks of its training dataset"),
        ({"preprocess": {"shape": [8, 8, 8]}}, "sets preprocess, which an external test set takes"),
        ({"split": {"test": 0.5}}, "sets split"),
        ({"seeds": [0, 1]}, "sets seeds, which an external test set takes"),
    ],
)
def test_bad_external_entries_are_refused_naming_what_differs(change, message):
    params = _with(_base(), other_external=dict(EXTERNAL))
    if "run" in change:
        params["run"]["datasets"] = change["run"]["datasets"]
    else:
        params["datasets"]["openkbp_demo_external"] = {
            **params["datasets"]["openkbp_demo_external"],
            **change,
        }
    with pytest.raises(CtanError, match=message):
        validate(params)


def test_a_training_entry_still_needs_its_tasks():
    params = _with(_base(), plain={"format": "openkbp", "source": "demo"})
    with pytest.raises(CtanError, match="'tasks' is a required property"):
        validate(params)


def test_training_and_tuning_refuse_an_external_set():
    from ctan.training.trainer import train
    from ctan.training.tuning import tune

    params = _base()
    with pytest.raises(CtanError, match="never trained or tuned on"):
        train(params, "openkbp_demo_external", "hps", 0)
    with pytest.raises(CtanError, match="never trained or tuned on"):
        tune(params, "openkbp_demo_external", "hps")


def test_compatibility_names_what_differs():
    training = {"format": "nifti_cases", "structure_names": ["Bladder", "PTV", "Rectum"], "image_channels": 1}
    external = {"format": "nifti_cases", "structure_names": ["Bladder", "Femur", "PTV"], "image_channels": 3}
    problems = compatibility_problems(training, external)
    assert "structures differ (missing Rectum; not in the training set: Femur)" in problems
    assert "image channels differ (3 here, 1 in the training set)" in problems
    assert compatibility_problems(training, dict(training)) == []


# --- data: every format, all cases test, the training set's plan -------------------------------------


def _local(root: Path, params: dict, **extra) -> dict:
    out = copy.deepcopy(params)
    out["paths"] = {k: str(root / k) for k in ("raw", "preprocessed", "models", "results")}
    out["datasets"].update(extra)
    return validate(out)


SMALL = {"train": 3, "validation": 1, "test": 1}
TRAINING = {"ham10000": "ham10000_demo", "stoic": "stoic_demo", "nifti_cases": "prostate_demo"}


@pytest.mark.parametrize("fmt", sorted(TRAINING))
def test_external_cases_are_all_test_cases_preprocessed_with_the_training_plan(tmp_path, fmt):
    name = TRAINING[fmt]
    params = _base()
    params["datasets"][name]["demo"] = {**SMALL, "seed": 1}
    ext = {
        "format": fmt,
        "external_of": name,
        "source": "demo",
        "sha256": None,
        "demo": {"test": 3, "seed": 9},
    }
    params = _local(tmp_path, params, site_b=ext)
    training, external = dataset_settings(params, name), dataset_settings(params, "site_b")
    download_dataset(training)
    download_dataset(external)
    out = preprocess_dataset(external, training=training)
    manifest = read_manifest(out)
    assert manifest["external_of"] == name
    assert manifest["plan"] == {"dataset": name, **params["datasets"][name]["preprocess"]}
    assert manifest["tasks"] == list(training.tasks)
    assert {c["split"] for c in manifest["cases"]} == {"test"} and len(manifest["cases"]) >= 3
    # No train or validation split: nothing to train on.
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "plan.json", "test.zarr"]
    with pytest.raises(CtanError, match="pass the settings of"):
        preprocess_dataset(external, force=True)


def test_openkbp_folder_of_bare_patients_is_an_external_test_set(tmp_path):
    """The issue's case: `source:` a folder of pt_* patients (e.g. the official test-pats), unpinned."""
    from ctan.datasets.demo import generate

    generate("openkbp", tmp_path / "release", {"test": 2}, seed=5)
    patients = tmp_path / "release" / "provided-data" / "test-pats"
    entry = {"format": "openkbp", "external_of": "openkbp_demo", "source": str(patients), "sha256": None}
    params = _base()
    params["datasets"]["openkbp_demo"]["demo"] = {"train": 1, "validation": 1, "test": 1, "seed": 1}
    params = _local(tmp_path, params, test_pats=entry)
    training, external = dataset_settings(params, "openkbp_demo"), dataset_settings(params, "test_pats")
    download_dataset(training)
    raw = download_dataset(external)
    assert json.loads((raw / "source.json").read_text())["cases"] == 2
    manifest = read_manifest(preprocess_dataset(external, training=training))
    assert [(c["case_id"], c["split"]) for c in manifest["cases"]] == [("pt_241", "test"), ("pt_242", "test")]
    assert manifest["plan"]["dataset"] == "openkbp_demo"
    from ctan.datasets import find_root
    from ctan.datasets.openkbp import reference_folders

    assert reference_folders(find_root(raw, "openkbp")) == [raw]


def test_an_external_set_with_other_structures_is_refused_before_training(tmp_path):
    """Bring-your-own cases whose masks name other structures than the training set's: one error,
    at preprocessing, naming the difference."""
    from ctan.datasets.demo import generate

    source = generate("nifti_cases", tmp_path / "site_b", {"test": 3}, seed=4)
    renamed = 0
    for case in (source / "cases").iterdir():
        if (case / "masks" / "Rectum.nii.gz").is_file():  # a demo case may lack a contour
            (case / "masks" / "Rectum.nii.gz").rename(case / "masks" / "Femur.nii.gz")
            renamed += 1
    assert renamed
    params = _base()
    params["datasets"]["prostate_demo"]["demo"] = {**SMALL, "seed": 1}
    entry = {"format": "nifti_cases", "external_of": "prostate_demo", "source": str(source), "sha256": None}
    params = _local(tmp_path / "work", params, site_b=entry)
    training, external = dataset_settings(params, "prostate_demo"), dataset_settings(params, "site_b")
    download_dataset(training)
    download_dataset(external)
    with pytest.raises(
        CtanError, match=r"structures differ \(missing Rectum; not in the training set: Femur\)"
    ):
        preprocess_dataset(external, training=training)
    assert not external.preprocessed_dir.exists()


# --- training never reads it; evaluation, summary, comparison and audit cover it ------------------------


@pytest.fixture(scope="module")
def ham_run(tmp_path_factory) -> tuple[Path, dict]:
    """A tiny HAM10000 demo with an external set; STL and HPS trained for one epoch each."""
    from ctan import loader
    from ctan.tracking import init_tracking
    from ctan.training.trainer import train

    root = tmp_path_factory.mktemp("external")
    params = _base()
    params["run"] = {"datasets": ["ham10000_demo"], "architectures": ["stl", "hps"], "seeds": [0]}
    params["mlflow"] = {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "test"}
    params["training"].update(epochs=1, batch_size=4)
    params["comparison"]["resamples"] = 200
    params["datasets"]["ham10000_demo"]["demo"] = {"train": 8, "validation": 4, "test": 4, "seed": 3}
    ext = {"format": "ham10000", "external_of": "ham10000_demo", "source": "demo", "sha256": None}
    params = _local(root, params, ham_site_b={**ext, "demo": {"test": 4, "seed": 8}})
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    training, external = dataset_settings(params, "ham10000_demo"), dataset_settings(params, "ham_site_b")
    for settings in (training, external):
        download_dataset(settings)
    preprocess_dataset(training)
    preprocess_dataset(external, training=training)
    init_tracking(params)

    opened: list[Path] = []
    original = loader.CaseDataset.__init__

    def recording(self, store_dir, split, *args, **kwargs):
        opened.append(Path(store_dir) / split)
        original(self, store_dir, split, *args, **kwargs)

    torch.set_num_threads(1)
    loader.CaseDataset.__init__ = recording
    try:
        for arch in ("stl", "hps"):
            train(params, "ham10000_demo", arch, 0)
    finally:
        loader.CaseDataset.__init__ = original
    params["_opened"] = opened
    return root, params


def test_training_never_opens_the_external_store(ham_run):
    root, params = ham_run
    opened = params["_opened"]
    assert opened and {p.name for p in opened} == {"train", "validation"}
    assert all(p.parent == root / "preprocessed" / "ham10000_demo" for p in opened)
    external_ids = {c["case_id"] for c in read_manifest(root / "preprocessed" / "ham_site_b")["cases"]}
    training_ids = {
        c["case_id"]
        for c in read_manifest(root / "preprocessed" / "ham10000_demo")["cases"]
        if c["split"] != "test"
    }
    assert external_ids and not external_ids & training_ids


@pytest.fixture(scope="module")
def evaluated(ham_run) -> tuple[Path, dict]:
    from ctan.evaluation import evaluate

    root, params = ham_run
    params = {k: v for k, v in params.items() if not k.startswith("_")}
    for arch in ("stl", "hps"):
        evaluate(params, "ham10000_demo", arch, 0)
        evaluate(params, "ham10000_demo", arch, 0, on="ham_site_b")
    return root, params


def test_evaluation_on_an_external_set_writes_beside_the_internal_results(evaluated):
    root, params = evaluated
    path = root / "results/ham10000_demo/external/ham_site_b/hps/seed0/metrics.json"
    doc = json.loads(path.read_text())
    assert doc["dataset"] == "ham_site_b" and doc["trained_on"] == "ham10000_demo"
    manifest = read_manifest(root / "preprocessed" / "ham_site_b")
    assert doc["provenance"]["data_hash"] == manifest["data_hash"]
    assert doc["provenance"]["source_sha256"] == manifest["source_sha256"]
    assert set(doc["per_case"]["lesion"]) == {c["case_id"] for c in manifest["cases"]}
    internal = json.loads((root / "results/ham10000_demo/hps/seed0/metrics.json").read_text())
    assert internal["provenance"]["model_sha256"] == doc["provenance"]["model_sha256"]  # the same models
    assert (path.parent / "examples.png").is_file()


def test_evaluate_on_refuses_a_dataset_that_is_not_its_external_set(evaluated):
    from ctan.evaluation import evaluate

    _, params = evaluated
    with pytest.raises(CtanError, match="not an external test set of ham10000_demo"):
        evaluate(params, "ham10000_demo", "hps", 0, on="stoic_demo")
    with pytest.raises(CtanError, match="never trained or tuned on"):
        evaluate(params, "ham_site_b", "hps", 0)


def test_evaluation_refuses_stores_made_with_another_plan(evaluated, tmp_path):
    from ctan.evaluation import check_external_manifest

    root, params = evaluated
    training = read_manifest(root / "preprocessed" / "ham10000_demo")
    external = read_manifest(root / "preprocessed" / "ham_site_b")
    settings, data = dataset_settings(params, "ham10000_demo"), dataset_settings(params, "ham_site_b")
    check_external_manifest(training, external, settings, data)
    other = {**external, "plan": {**external["plan"], "shape": [64, 64]}, "class_names": ["a", "b"]}
    with pytest.raises(CtanError, match="classes differ .*preprocessing plan differs"):
        check_external_manifest(training, other, settings, data)


def test_summary_comparison_and_audit_cover_external_sets(evaluated, monkeypatch, capsys):
    from ctan.audit import audit
    from ctan.comparison import compare, read_report, render_markdown
    from ctan.summary import summarize

    root, params = evaluated
    monkeypatch.chdir(root)
    summary = summarize(params, root / "results" / "summary.csv")
    with open(summary, newline="") as fh:
        rows = list(csv.DictReader(fh))
    external = [r for r in rows if r["dataset"] == "ham_site_b"]
    assert external and all(r["trained_on"] == "ham10000_demo" for r in external)
    assert {r["architecture"] for r in external} == {"stl", "hps"}
    assert any(r["row_type"] == "delta_mtl" and r["architecture"] == "hps" for r in external)
    manifest = read_manifest(root / "preprocessed" / "ham_site_b")
    assert {r["source_sha256"] for r in external} == {manifest["source_sha256"]}
    internal_hash = {r["data_hash"] for r in rows if r["dataset"] == "ham10000_demo"}
    assert {r["data_hash"] for r in external}.isdisjoint(internal_hash)

    md = compare(params, root / "results" / "comparison")
    report = strict_json_loads((md.parent / "comparison.json").read_text())
    assert render_markdown(read_report(md.parent / "comparison.json")) == md.read_text()
    assert report["external"]["ham_site_b"]["trained_on"] == "ham10000_demo"
    assert "hps" in report["external"]["ham_site_b"]["delta_mtl"]
    text = md.read_text()
    assert "### ham_site_b (external test set; models trained on ham10000_demo)" in text
    assert "| ham10000_demo | ham_site_b (external) |" in text
    # Each test set names the machines behind its numbers (the models' training, the evaluation).
    import torch

    assert "Training on: " in text and "Evaluation on: " in text and f"torch {torch.__version__}" in text
    doc = json.loads((root / "results/ham10000_demo/hps/seed0/metrics.json").read_text())
    assert set(doc["provenance"]["machine"]["training"]) == {"all"}  # one network
    assert doc["provenance"]["machine"]["evaluation"]["threads"] == torch.get_num_threads()

    capsys.readouterr()
    assert audit(summary) == 0
    shutil.copy(summary, root / "edited.csv")
    with open(root / "edited.csv", newline="") as fh:
        edited = list(csv.DictReader(fh))
    for row in edited:
        if row["dataset"] == "ham_site_b" and row["metric"] == "dice" and row["architecture"] == "hps":
            row["value"] = "0.999"
    with open(root / "edited.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(edited[0]))
        writer.writeheader()
        writer.writerows(edited)
    assert audit(root / "edited.csv") == 1
    assert "ham_site_b/hps/seed 0/lesion/dice" in capsys.readouterr().out


def test_an_external_set_holding_training_patients_is_refused(tmp_path):
    """ "Another site's" patients that are the training set's own (the same release copied) would score
    seen patients as unseen: matched on identically preprocessed images, at evaluation."""
    from ctan.datasets.demo import generate
    from ctan.evaluation import check_external_manifest

    params = _base()
    params["datasets"]["openkbp_demo"]["demo"] = {"train": 2, "validation": 1, "test": 1, "seed": 1}
    generate("openkbp", tmp_path / "release", {"train": 2, "validation": 1, "test": 1}, seed=1)
    patients = tmp_path / "release" / "provided-data" / "train-pats"  # the demo's own training patients
    entry = {"format": "openkbp", "external_of": "openkbp_demo", "source": str(patients), "sha256": None}
    params = _local(tmp_path, params, site_b=entry)
    training, external = dataset_settings(params, "openkbp_demo"), dataset_settings(params, "site_b")
    download_dataset(training)
    download_dataset(external)
    ours = read_manifest(preprocess_dataset(training))
    theirs = read_manifest(preprocess_dataset(external, training=training))
    with pytest.raises(
        CtanError, match=r"site_b holds cases of its training dataset: pt_1 = openkbp_demo pt_1 \(train\)"
    ):
        check_external_manifest(ours, theirs, training, external)
