"""Reading a run's metrics.json files (`ctan.results`): what summarize, compare and audit refuse."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import strict_json_loads
from ctan.errors import CtanError
from ctan.layout import metrics_path
from ctan.results import load_metrics, read_docs, strict_json

DATASET = "ham10000_demo"


def _doc(arch: str, seed: int, dice: float = 0.5) -> dict:
    return {
        "dataset": DATASET,
        "trained_on": DATASET,
        "architecture": arch,
        "seed": seed,
        "tasks": {"lesion": {"dice": dice, "hd95": 3.0}, "diagnosis": {"auc_macro": 0.7}},
        "primary_metrics": {"lesion": ["dice"], "diagnosis": ["auc_macro"]},
        "higher_is_better": {"lesion": {"dice": True, "hd95": False}, "diagnosis": {"auc_macro": True}},
        "provenance": {
            "data_hash": "a" * 64,
            "git_commit": "0" * 40,
            "git_dirty": False,
            "mlflow_run_ids": {},
            "model_sha256": {},
        },
    }


@pytest.fixture
def results(tmp_path) -> Path:
    for arch in ("stl", "hps"):
        for seed in (0, 1):
            path = metrics_path(tmp_path, arch, seed)
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps(_doc(arch, seed)))
    return tmp_path


def _read(results: Path):
    return read_docs(results, DATASET, None, ["stl", "hps"], [0, 1])


def _edit(results: Path, arch: str, seed: int, change) -> Path:
    path = metrics_path(results, arch, seed)
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))
    return path


def test_a_run_as_evaluate_writes_it_reads(results):
    docs = _read(results)
    assert sorted(docs) == [("hps", 0), ("hps", 1), ("stl", 0), ("stl", 1)]


def test_non_finite_numbers_are_written_as_strict_json_and_read_back(tmp_path):
    """HD95 is inf with one mask empty and NaN with both: other tools must be able to read the file,
    and ctan must read back the same numbers (an inf HD95 counts as the worst case, a NaN is skipped)."""
    doc = _doc("stl", 0, dice=math.nan)
    doc["per_case"] = {"lesion": {"hd95": {"c1": math.inf, "c2": np.float32(2.5), "c3": math.nan}}}
    doc["details"] = {"lesion": {"hd95_per_class": [-math.inf, 1.0]}}
    text = strict_json(doc)
    strict = strict_json_loads(text)
    assert strict["tasks"]["lesion"]["dice"] == "NaN"
    assert strict["per_case"]["lesion"]["hd95"] == {"c1": "Infinity", "c2": 2.5, "c3": "NaN"}
    path = tmp_path / "metrics.json"
    path.write_text(text)
    back = load_metrics(path, "rerun")
    assert math.isnan(back["tasks"]["lesion"]["dice"])
    hd95 = back["per_case"]["lesion"]["hd95"]
    assert hd95["c1"] == math.inf and hd95["c2"] == 2.5 and math.isnan(hd95["c3"])
    assert back["details"]["lesion"]["hd95_per_class"] == [-math.inf, 1.0]
    assert back["provenance"]["data_hash"] == "a" * 64
    # comparison.json is written and read the same way (an undefined Δ of one seed is NaN there).
    from ctan.comparison import read_report

    path.write_text(strict_json({"per_seed": {"0": 5.0, "2": math.nan}}))
    assert strict_json_loads(path.read_text())["per_seed"]["2"] == "NaN"
    assert math.isnan(read_report(path)["per_seed"]["2"])
    # A file from before the change (bare NaN, as Python's json writes by default) still reads.
    path.write_text(json.dumps(doc | {"per_case": {}}, default=float))
    assert math.isnan(load_metrics(path, "rerun")["tasks"]["lesion"]["dice"])


@pytest.mark.parametrize(
    "field, value, said",
    [
        ("architecture", "ctan", "records architecture 'ctan' where its folder is for architecture 'hps'"),
        ("seed", 0, "records seed 0 where its folder is for seed 1"),
        ("dataset", "openkbp_demo", "records dataset 'openkbp_demo'"),
    ],
)
def test_a_file_copied_from_another_run_is_refused(results, field, value, said):
    path = _edit(results, "hps", 1, lambda d: d.update({field: value}))
    with pytest.raises(CtanError, match=said) as err:
        _read(results)
    assert err.value.path == str(path) and "ctan evaluate --dataset ham10000_demo --arch hps --seed 1" in str(
        err.value
    )


@pytest.mark.parametrize(
    "change, said",
    [
        (lambda d: d["tasks"]["lesion"].update(dice="0.5"), "tasks.lesion.dice is not a number"),
        (lambda d: d["tasks"]["lesion"].update(dice=True), "tasks.lesion.dice is not a number"),
        (lambda d: d["tasks"]["lesion"].update(dice=None), "tasks.lesion.dice is not a number"),
        (lambda d: d.pop("provenance"), "has no provenance"),
        (lambda d: d.pop("primary_metrics"), "has no primary_metrics"),
        (lambda d: d["primary_metrics"].update(lesion=["jaccard"]), "primary_metrics.lesion must name"),
        (lambda d: d["higher_is_better"]["lesion"].pop("hd95"), "higher_is_better.lesion.hd95"),
        (lambda d: d["provenance"].pop("data_hash"), "provenance.data_hash"),
    ],
)
def test_a_damaged_document_is_refused(results, change, said):
    _edit(results, "stl", 0, change)
    with pytest.raises(CtanError, match=said):
        _read(results)


@pytest.mark.parametrize("text", ["", "[1, 2]", '{"tasks": '])
def test_a_file_that_is_not_a_metrics_document_is_refused(results, text):
    metrics_path(results, "hps", 0).write_text(text)
    with pytest.raises(CtanError, match="not a (readable )?metrics.json"):
        _read(results)


@pytest.mark.parametrize(
    "change, what",
    [
        (lambda d: d["provenance"].update(data_hash="b" * 64), "data content hash"),
        (lambda d: d["primary_metrics"].update(lesion=["dice", "hd95"]), "primary metrics"),
        (lambda d: d["tasks"]["lesion"].pop("hd95") and d["higher_is_better"]["lesion"].pop("hd95"), "tasks"),
        (lambda d: d["higher_is_better"]["lesion"].update(hd95=True), "higher_is_better"),
    ],
)
def test_documents_of_one_test_set_must_share_their_evaluation(results, change, what):
    """Results on other data, or scored with other primary metrics, would otherwise be mixed in one Δ_MTL."""
    path = _edit(results, "hps", 1, change)
    with pytest.raises(CtanError, match=f"has {what}") as err:
        _read(results)
    assert err.value.path == str(path)
