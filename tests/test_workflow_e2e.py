"""The README's main job end to end: the default demo workflow with the real `ctan`.

One run per session (`local_demo_run` in conftest.py); these tests read what it left behind.
"""

from __future__ import annotations

import csv
import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from ctan.provenance import dvc_md5
from ctan.results import load_metrics

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def _rows(root: Path) -> list[dict[str, str]]:
    with open(root / "results" / "summary.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_summary_holds_every_architecture_for_every_dataset(local_demo_run):
    rows = _rows(local_demo_run)
    run = PARAMS["run"]
    for dataset in run["datasets"]:
        tasks = PARAMS["datasets"][dataset]["tasks"]
        for arch in run["architectures"]:
            metric_rows = [
                r
                for r in rows
                if (r["dataset"], r["architecture"], r["row_type"]) == (dataset, arch, "metric")
            ]
            assert {r["task"] for r in metric_rows} == set(tasks), (dataset, arch)
            delta = [
                r
                for r in rows
                if (r["dataset"], r["architecture"], r["row_type"]) == (dataset, arch, "delta_mtl")
            ]
            assert len(delta) == 1
            if arch == "stl":  # STL against itself: no change at all
                assert float(delta[0]["value"]) == 0.0
                assert all(float(r["relative_change_pct"]) == 0.0 for r in metric_rows)
    for row in rows:
        assert row["git_commit"] and row["params_hash"] and row["data_hash"].endswith(".dir")
        if row["row_type"] == "metric":
            assert row["mlflow_run_id"] and row["model_sha256"]


def test_data_hashes_match_the_preprocessed_folders(local_demo_run):
    for row in _rows(local_demo_run):
        assert dvc_md5(local_demo_run / row["data_path"]) == row["data_hash"]


def test_nothing_left_to_do_afterwards(local_demo_run):
    proc = subprocess.run(
        [str(BIN / "snakemake"), "-n", "results/summary.csv"],
        cwd=local_demo_run,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_every_training_job_recorded_an_mlflow_run(local_demo_run):
    jobs = sum(
        len(PARAMS["datasets"][d]["tasks"]) if a == "stl" else 1
        for d in PARAMS["run"]["datasets"]
        for a in PARAMS["run"]["architectures"]
    )
    with sqlite3.connect(local_demo_run / "mlflow.db") as db:
        runs = db.execute("SELECT run_uuid, status FROM runs").fetchall()
        assert len(runs) == jobs and {s for _, s in runs} == {"FINISHED"}
        with_test_metrics = db.execute(
            "SELECT COUNT(DISTINCT run_uuid) FROM metrics WHERE key LIKE 'test/%'"
        ).fetchone()[0]
    assert with_test_metrics == jobs


def test_openkbp_predictions_are_written_in_the_challenge_format(local_demo_run):
    from ctan.metrics.dose import read_sparse_csv

    folder = local_demo_run / "results" / "openkbp_demo" / "ctan" / "seed0" / "predictions" / "dose_csv"
    files = sorted(folder.glob("pt_*.csv"))
    assert len(files) == PARAMS["datasets"]["openkbp_demo"]["demo"]["test"]
    dose = read_sparse_csv(files[0])
    assert dose.shape == (128, 128, 128) and dose.max() > 10


def test_the_external_test_set_is_evaluated_for_every_architecture_and_seed(local_demo_run):
    """The demo's external set: challenge-format dose and DVH scores for every model, its own summary rows
    and provenance, and a place beside the internal test split in the comparison."""
    name = "openkbp_demo_external"
    entry = PARAMS["datasets"][name]
    training = entry["external_of"]
    manifest = json.loads((local_demo_run / "data/preprocessed" / name / "manifest.json").read_text())
    assert manifest["plan"]["dataset"] == training and {c["split"] for c in manifest["cases"]} == {"test"}
    for arch in PARAMS["run"]["architectures"]:
        for seed in PARAMS["run"]["seeds"]:
            run = local_demo_run / "results" / training / "external" / name / arch / f"seed{seed}"
            doc = json.loads((run / "metrics.json").read_text())
            assert doc["trained_on"] == training and set(doc["tasks"]["dose"]) == {"dose_score", "dvh_score"}
            assert len(list((run / "predictions" / "dose_csv").glob("pt_*.csv"))) == entry["demo"]["test"]
    rows = [r for r in _rows(local_demo_run) if r["dataset"] == name]
    assert {r["architecture"] for r in rows} == set(PARAMS["run"]["architectures"])
    assert {r["trained_on"] for r in rows} == {training}
    assert {r["source_sha256"] for r in rows} == {manifest["source_sha256"]}
    report = json.loads((local_demo_run / "results/comparison/comparison.json").read_text())
    assert report["external"][name]["trained_on"] == training


def _trivial(root: Path, dataset: str) -> dict[str, float]:
    """Validation error of the trivial predictors: mean training dose, majority class, empty mask."""
    from ctan.store import SplitStore

    base = root / "data" / "preprocessed" / dataset
    train, val = SplitStore.open(base / "train.zarr"), SplitStore.open(base / "validation.zarr")
    out: dict[str, float] = {}
    if "dose" in PARAMS["datasets"][dataset]["tasks"]:
        mean = np.mean(
            [
                train.read_case(c)["dose"][train.read_case(c)["possible_dose_mask"] > 0].mean()
                for c in train.case_ids
            ]
        )
        errors = []
        for c in val.case_ids:
            case = val.read_case(c)
            inside = case["possible_dose_mask"] > 0
            errors.append(np.abs(case["dose"][inside] - mean).mean())
        out["dose_mae"] = float(np.mean(errors))
    return out


def test_dose_predictions_are_zero_outside_the_possible_dose_mask(local_demo_run):
    """Bring-your-own cases are scored on our grid: a dose outside the mask would count as error."""
    from ctan.store import SplitStore

    store = SplitStore.open(local_demo_run / "data" / "preprocessed" / "prostate_demo" / "test.zarr")
    folder = local_demo_run / "results" / "prostate_demo" / "hps" / "seed0" / "predictions"
    for case_id in store.case_ids:
        predicted = np.load(folder / f"{case_id}.npz")["dose"]
        outside = store.read_case(case_id)["possible_dose_mask"] == 0
        assert outside.any() and not predicted[outside].any(), case_id
        assert predicted[~outside].max() > 10, case_id


def _class_prior_loss(root: Path, dataset: str, target: str) -> float:
    """Validation cross-entropy of always predicting the training split's class frequencies."""
    from ctan.store import SplitStore

    base = root / "data" / "preprocessed" / dataset

    def labels(split: str) -> np.ndarray:
        store = SplitStore.open(base / f"{split}.zarr")
        return np.array([int(store.case_attrs(c)["labels"][target]) for c in store.case_ids])

    train, val = labels("train"), labels("validation")
    prior = np.bincount(train, minlength=val.max() + 1) / train.size
    return float(-np.mean(np.log(np.clip(prior[val], 1e-12, 1))))


@pytest.mark.parametrize("dataset", PARAMS["run"]["datasets"])
def test_every_image_level_head_learns_beyond_the_class_prior(local_demo_run, dataset):
    """A head that never learned predicts the prior: its loss sits at the prior's cross-entropy (ln 2
    for balanced binary labels), and a 16-case AUC of its float noise can land anywhere. So each
    image-level head's validation loss at the kept epoch must end clearly (10 %) below the prior's."""
    tasks = PARAMS["datasets"][dataset]["tasks"]
    image_level = [t for t in tasks if t in ("diagnosis", "covid", "severity")]
    if not image_level:
        pytest.skip(f"{dataset} has no image-level task")
    failures = []
    for arch in PARAMS["run"]["architectures"]:
        for task in image_level:
            folder = local_demo_run / "models" / dataset / arch / "seed0"
            history = json.loads(
                ((folder / task) if arch == "stl" else folder).joinpath("history.json").read_text()
            )
            kept = history["epochs"][history["best_epoch"] - 1]
            prior = _class_prior_loss(local_demo_run, dataset, task)
            if not kept["val_loss"][task] < 0.9 * prior:
                failures.append(
                    f"{arch} {task}: validation loss {kept['val_loss'][task]:.3f}, prior {prior:.3f}"
                )
    assert not failures, failures


@pytest.mark.parametrize("dataset", PARAMS["run"]["datasets"])
def test_every_architecture_learns_on_the_demo(local_demo_run, dataset):
    """Test-split metrics beat a trivial predictor by a clear margin, for every architecture.

    Trivial predictors and what "clear" means here: the mean training dose inside the possible-dose
    mask (validation MAE; the model's dose score must be at most 75 % of it), an empty mask (Dice 0; the
    model needs Dice > 0.5 for 2D lesions, > 0.1 for the demo's small 3D structures after a few dozen
    steps), a constant score (AUC 0.5; the model needs > 0.6).
    """
    trivial = _trivial(local_demo_run, dataset)
    failures = []
    for arch in PARAMS["run"]["architectures"]:
        doc = load_metrics(local_demo_run / "results" / dataset / arch / "seed0" / "metrics.json", "")
        for task, metrics in doc["tasks"].items():
            if "dose_score" in metrics and not metrics["dose_score"] < 0.75 * trivial["dose_mae"]:
                failures.append(
                    f"{arch} {task} dose_score {metrics['dose_score']:.2f} vs {trivial['dose_mae']:.2f}"
                )
            floor = 0.5 if task == "lesion" else 0.1
            if "dice" in metrics and not metrics["dice"] > floor:
                failures.append(f"{arch} {task} dice {metrics['dice']:.2f} (needs > {floor})")
            for name in ("auc", "auc_macro", "auc_covid_positive"):
                if name in metrics and not metrics[name] > 0.6:
                    failures.append(f"{arch} {task} {name} {metrics[name]:.2f}")
    assert not failures, failures


def test_audit_passes_then_names_the_rows_behind_a_flipped_chunk_byte(local_demo_run, tmp_path):
    root = tmp_path / "run"
    for name in ("data/preprocessed", "models", "results"):
        shutil.copytree(local_demo_run / name, root / name)
    ctan = str(BIN / "ctan")
    ok = subprocess.run([ctan, "audit", "results/summary.csv"], cwd=root, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr

    victim = next((root / "data/preprocessed/ham10000_demo/test.zarr").glob("*/image/c/*/*/*"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    bad = subprocess.run([ctan, "audit", "results/summary.csv"], cwd=root, capture_output=True, text=True)
    assert bad.returncode == 1
    changed = [line for line in bad.stdout.splitlines() if line.startswith("CHANGED")]
    assert changed and all("ham10000_demo/" in line for line in changed)
    n_ham = sum(r["dataset"] == "ham10000_demo" for r in _rows(root))
    assert len(changed) == n_ham


def test_per_case_values_reproduce_every_evaluated_metric(local_demo_run):
    """`ctan compare` resamples per-case values; with every case once they must give metrics.json back."""
    from ctan.comparison import metrics_on, scored_cases

    results = local_demo_run / "results"
    for path in sorted(
        [*results.glob("*/*/seed*/metrics.json"), *results.glob("*/external/*/*/seed*/metrics.json")]
    ):
        doc = load_metrics(path, "")  # the way summarize and compare read it (strict JSON's "NaN" as NaN)
        again = metrics_on(doc, scored_cases(doc, path))
        for task, metrics in doc["tasks"].items():
            for metric, value in metrics.items():
                assert again[task][metric] == pytest.approx(value, rel=1e-9, nan_ok=True), (
                    path,
                    task,
                    metric,
                )


def test_the_comparison_report_covers_every_dataset_and_architecture(local_demo_run):
    folder = local_demo_run / "results" / "comparison"
    report = json.loads((folder / "comparison.json").read_text())
    assert list(report["datasets"]) == PARAMS["run"]["datasets"]
    for dataset, entry in report["datasets"].items():
        assert set(entry["delta_mtl"]) == set(PARAMS["run"]["architectures"]) - {"stl"}
        for arch, cost in entry["cost"].items():
            assert cost["step_seconds"] > 0 and cost["peak_memory_mib"] > 50, (dataset, arch)
            assert 0 <= cost["data_wait_pct"] < 100, (dataset, arch)
        for arch, delta in entry["delta_mtl"].items():
            if delta["resamples_with_delta"]:
                assert delta["ci_low"] <= delta["ci_high"], (dataset, arch)
    text = (folder / "comparison.md").read_text()
    assert all(f"### {d}" in text for d in PARAMS["run"]["datasets"])
    assert (folder / "delta_mtl_ci.png").stat().st_size > 10_000
    assert (folder / "training_cost.png").stat().st_size > 10_000
