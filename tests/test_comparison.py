"""`ctan compare`: per-case re-aggregation, the paired bootstrap, and the report on a synthetic run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ctan.comparison import (
    _table_head,
    aggregate,
    metrics_on,
    paired_bootstrap_delta,
    render_markdown,
    scored_cases,
)
from ctan.errors import CtanError

CASES = [f"case_{i:03d}" for i in range(30)]


def _doc(dice: list[float], probs: list[float], labels: list[int]) -> dict:
    """A metrics.json with a segmentation task (Dice) and a binary classification task (AUC)."""
    from ctan.metrics.classification import binary_auc

    per_case = {
        "lesion": {c: {"dice": d} for c, d in zip(CASES, dice, strict=True)},
        "covid": {
            c: {"probability": [p], "label": y, "covid": y}
            for c, p, y in zip(CASES, probs, labels, strict=True)
        },
    }
    return {
        "tasks": {"lesion": {"dice": float(np.mean(dice))}, "covid": {"auc": binary_auc(labels, probs)}},
        "higher_is_better": {"lesion": {"dice": True}, "covid": {"auc": True}},
        "per_case": per_case,
    }


@pytest.fixture
def run():
    rng = np.random.default_rng(0)
    labels = [i % 2 for i in range(len(CASES))]
    docs = {}
    for seed in (0, 1, 2):
        base = rng.uniform(0.4, 0.8, len(CASES))
        probs = np.clip(np.array(labels) * 0.3 + rng.uniform(0, 0.7, len(CASES)), 0, 1)
        docs["stl", seed] = _doc(list(base), list(probs), labels)
        docs["same", seed] = _doc(list(base), list(probs), labels)
        docs["better", seed] = _doc(list(base * 1.1), list(probs), labels)  # Dice 10 % up, AUC unchanged
    return docs


def test_all_cases_reproduce_the_evaluated_metrics(run):
    doc = run["stl", 0]
    assert scored_cases(doc) == CASES
    again = metrics_on(doc, CASES)
    for task, metrics in doc["tasks"].items():
        for metric, value in metrics.items():
            assert again[task][metric] == pytest.approx(value, rel=1e-12)


def test_a_uniform_gain_has_a_tight_interval_and_no_change_has_none(run):
    better = paired_bootstrap_delta(run, "better", [0, 1, 2], resamples=100)
    # Dice +10 % on every case, AUC unchanged: Δ = (10 + 0) / 2 = 5 % on every resample (paired).
    assert better["delta_mtl"] == pytest.approx(5.0)
    assert better["ci_low"] == pytest.approx(5.0) and better["ci_high"] == pytest.approx(5.0)
    assert better["per_seed"] == pytest.approx([5.0, 5.0, 5.0]) and better["std_over_seeds"] == pytest.approx(
        0
    )
    same = paired_bootstrap_delta(run, "same", [0, 1, 2], resamples=100)
    assert same["delta_mtl"] == 0 and same["ci_low"] == 0 and same["ci_high"] == 0
    assert same["resamples_with_delta"] == 100


def test_a_noisy_difference_gets_an_interval_around_the_estimate(run):
    rng = np.random.default_rng(5)
    for seed in (0, 1, 2):
        stl = run["stl", seed]
        dice = [stl["per_case"]["lesion"][c]["dice"] * rng.uniform(0.8, 1.3) for c in CASES]
        probs = [stl["per_case"]["covid"][c]["probability"][0] for c in CASES]
        labels = [stl["per_case"]["covid"][c]["label"] for c in CASES]
        run["noisy", seed] = _doc(dice, probs, labels)
    out = paired_bootstrap_delta(run, "noisy", [0, 1, 2], resamples=200)
    assert out["ci_low"] < out["delta_mtl"] < out["ci_high"]
    assert 0.5 < out["ci_high"] - out["ci_low"] < 20
    again = paired_bootstrap_delta(run, "noisy", [0, 1, 2], resamples=200)
    assert np.array_equal(again.pop("draws"), out.pop("draws")) and again == out  # the resampling is seeded


def test_seed_spread_widens_the_hierarchical_interval_only(run):
    """Seeds that disagree: resampling seeds too must give a wider interval than cases alone."""
    for seed, gain in zip((0, 1, 2), (0.8, 1.0, 1.25), strict=True):
        stl = run["stl", seed]
        dice = [stl["per_case"]["lesion"][c]["dice"] * gain for c in CASES]
        probs = [stl["per_case"]["covid"][c]["probability"][0] for c in CASES]
        labels = [stl["per_case"]["covid"][c]["label"] for c in CASES]
        run["spread", seed] = _doc(dice, probs, labels)
    out = paired_bootstrap_delta(run, "spread", [0, 1, 2], resamples=300)
    # Every case scaled by the same factor within a seed: no case-to-case variation at all.
    assert out["cases_ci_high"] - out["cases_ci_low"] == pytest.approx(0, abs=1e-9)
    assert out["ci_low"] < -5 and out["ci_high"] > 5  # seeds span -10 % .. +12.5 % on Dice
    assert out["detectable_pct"] > 5


def test_paired_difference_uses_the_same_resamples(run):
    from ctan.comparison import paired_difference

    better = paired_bootstrap_delta(run, "better", [0, 1, 2], resamples=100)
    same = paired_bootstrap_delta(run, "same", [0, 1, 2], resamples=100)
    diff = paired_difference(better, same)
    assert diff["difference"] == pytest.approx(5.0)
    assert diff["ci_low"] == pytest.approx(5.0) and diff["ci_high"] == pytest.approx(5.0)


def test_only_primary_metrics_enter_the_delta(run):
    for seed in (0, 1, 2):
        doc = json.loads(json.dumps(run["better", seed]))
        doc["tasks"]["lesion"]["hd95"] = 99.0  # unbounded; it must not move the headline
        doc["higher_is_better"]["lesion"]["hd95"] = False
        stl = json.loads(json.dumps(run["stl", seed]))
        stl["tasks"]["lesion"]["hd95"] = 1.0
        stl["higher_is_better"]["lesion"]["hd95"] = False
        for d in (doc, stl):
            for row in d["per_case"]["lesion"].values():
                row["hd95"] = d["tasks"]["lesion"]["hd95"]
        run["hd", seed], run["stl", seed] = doc, stl
    primary = {"lesion": ["dice"], "covid": ["auc"]}
    out = paired_bootstrap_delta(run, "hd", [0, 1, 2], resamples=50, primary=primary)
    assert out["delta_mtl"] == pytest.approx(5.0)


def test_undefined_resamples_are_counted_not_averaged():
    labels = [1] * 29 + [0]  # one negative: a third of the resamples miss it, and their AUC is undefined
    probs = list(np.linspace(0.1, 0.9, 30))
    stl_probs = [*probs[1:], 0.05]  # the negative scored lowest: AUC 1
    docs = {("stl", 0): _doc([0.5] * 30, stl_probs, labels), ("hps", 0): _doc([0.6] * 30, probs, labels)}
    out = paired_bootstrap_delta(docs, "hps", [0], resamples=200)
    assert 0 < out["resamples_with_delta"] < 200
    assert math.isfinite(out["ci_low"])


def test_dvh_score_is_pooled_by_each_patients_count():
    rows = [{"dvh_score": 1.0, "dvh_count": 10}, {"dvh_score": 4.0, "dvh_count": 2}]
    assert aggregate("dvh_score", rows) == pytest.approx((10 + 8) / 12)
    assert aggregate("jaccard_thresholded", [{"jaccard": 0.6}, {"jaccard": 0.9}]) == pytest.approx(0.45)


def test_mismatched_test_cases_are_refused(run):
    run["better", 1]["per_case"]["lesion"].pop(CASES[0])
    with pytest.raises(CtanError, match="different test cases"):
        paired_bootstrap_delta(run, "better", [0, 1, 2], resamples=10)


def test_a_case_missing_in_one_architecture_is_named(run):
    for task in ("lesion", "covid"):
        run["better", 1]["per_case"][task].pop(CASES[3])
    with pytest.raises(CtanError, match=f"better seed 1 .*lacks {CASES[3]}; has in addition none"):
        paired_bootstrap_delta(run, "better", [0, 1, 2], resamples=10)


def test_the_markdown_names_every_architecture_and_the_paper(run):
    delta = paired_bootstrap_delta(run, "better", [0, 1, 2], resamples=50)
    delta.pop("draws")  # resamples for paired differences; `compare` drops them before writing JSON
    entry = {
        "data_hash": "abc.dir",
        "source_sha256": None,
        "test_cases": len(CASES),
        "metrics": {},
        "delta_mtl": {"better": delta},
        "cost": {
            a: {
                "epochs": 2,
                "train_minutes": 1.0,
                "step_seconds": 0.1,
                "data_wait_pct": 1.0,
                "peak_memory_mib": 500,
            }
            for a in ("stl", "better")
        },
        "provenance": {
            a: {"0": {"git_commit": "0123456789abcdef", "git_dirty": False, "mlflow_run_ids": {"all": "r1"}}}
            for a in ("stl", "better")
        },
    }
    for arch in ("stl", "better"):
        entry["metrics"][arch] = {
            t: {m: {"mean": v, "std": 0.01, "higher_is_better": True} for m, v in ms.items()}
            for t, ms in run[arch, 0]["tasks"].items()
        }
    entry["seeds"] = [0, 1, 2]
    report = {"datasets": {"toy": entry}, "paper_delta_mtl": {"ctan": 4.67}}
    report["mean_delta_mtl"] = {"better": entry["delta_mtl"]["better"]["delta_mtl"]}
    text = render_markdown(report)
    assert "Seeds 0, 1, 2; " in text
    assert "### toy" in text and "| better | +5.00 ± 0.00 | [+5.00, +5.00]" in text
    assert "`r1`" in text and "abc.dir" in text
    json.dumps(report)  # everything in the report is plain JSON


def test_tied_architectures_are_all_bold_and_a_full_tie_is_bold_for_none(run):
    """STOIC/HAM10000 after a short run: every model at balanced accuracy 1/7 printed `**0.143** | 0.143
    | 0.143`, STL alone in bold for a tie (the first in table order won)."""
    archs = ("stl", "same", "better")
    entry = {
        "data_hash": "abc.dir",
        "test_cases": len(CASES),
        "seeds": [0],
        "metrics": {
            a: {
                "lesion": {"dice": {"mean": m, "std": 0.0, "higher_is_better": True}},
                "covid": {"auc": {"mean": 0.5, "std": 0.0, "higher_is_better": True}},
            }
            for a, m in zip(archs, (0.6, 0.7, 0.7), strict=True)
        },
        "delta_mtl": {a: paired_bootstrap_delta(run, a, [0], resamples=20) for a in archs[1:]},
        "cost": {},
        "provenance": {},
    }
    for delta in entry["delta_mtl"].values():
        delta.pop("draws")
    text = render_markdown({"datasets": {"toy": entry}, "paper_delta_mtl": {}, "mean_delta_mtl": {}})
    assert "| lesion | dice ↑ | 0.6 | **0.7** | **0.7** |" in text
    assert "| covid | auc ↑ | 0.5 | 0.5 | 0.5 |" in text


def test_a_table_rule_has_its_headers_width():
    assert _table_head("architecture", "Δ_MTL (%) here", "paper") == [
        "| architecture | Δ_MTL (%) here | paper |",
        "|---|---|---|",
    ]


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_fast_classification_metrics_equal_scikit_learns():
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    from ctan.metrics.classification import mean_recall as balanced_accuracy
    from ctan.metrics.classification import rank_auc

    rng = np.random.default_rng(3)
    for n in (5, 40, 389):
        labels = rng.integers(0, 2, n)
        labels[:2] = [0, 1]
        score = np.round(rng.random(n), 1)  # many ties
        assert rank_auc(labels == 1, score) == pytest.approx(roc_auc_score(labels, score), abs=1e-12)
        classes = rng.integers(0, 7, n)
        predicted = rng.integers(0, 7, n)
        assert balanced_accuracy(classes, predicted) == pytest.approx(
            balanced_accuracy_score(classes, predicted), abs=1e-12
        )
    assert math.isnan(rank_auc(np.ones(4, bool), np.arange(4.0)))


# --- training histories ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, problem",
    [
        ("", "not a readable training history"),
        ('{"epochs": [{"x": 1}]}', "epoch record 1 lacks seconds"),
        ('{"epochs": [{"seconds": "1", "data_wait_fraction": 0.1}]}', "non-number '1' for seconds"),
        ('{"epochs": []}', "no epoch records"),
        ("[1, 2]", "no epoch records"),
    ],
)
def test_a_damaged_history_names_the_file_and_the_command_that_rebuilds_it(tmp_path, text, problem):
    """A traceback (KeyError, JSONDecodeError) before."""
    from types import SimpleNamespace

    from ctan.comparison import training_cost

    settings = SimpleNamespace(name="demo", models_dir=tmp_path, tasks=("dose", "structures"))
    good = {"epochs": [{"seconds": 2.0, "data_wait_fraction": 0.1, "step_seconds": 0.5}] * 2}
    for task in settings.tasks:
        (tmp_path / "stl" / "seed1" / task).mkdir(parents=True)
        (tmp_path / "stl" / "seed1" / task / "history.json").write_text(json.dumps(good))
    assert training_cost(settings, "stl", 1)["train_minutes"] == pytest.approx(8 / 60)
    damaged = tmp_path / "stl" / "seed1" / "structures" / "history.json"
    damaged.write_text(text)
    with pytest.raises(CtanError, match=problem) as err:
        training_cost(settings, "stl", 1)
    assert err.value.path == str(damaged)
    assert "`ctan train --dataset demo --arch stl --seed 1 --task structures`" in str(err.value)


def test_a_metric_edited_apart_from_its_per_case_values_is_refused(run):
    """compare takes its estimate from the metrics and its interval from the per-case values: an edit of
    one alone put the estimate far outside its own interval."""
    from ctan.comparison import check_per_case

    doc = run["stl", 0]
    check_per_case("m.json", doc)  # as evaluate writes it
    doc["tasks"]["lesion"]["dice"] = 0.5
    with pytest.raises(CtanError, match=r"m.json: tasks.lesion.dice is 0.5, but its per-case values give"):
        check_per_case("m.json", doc)


def test_a_seed_without_a_delta_is_left_out_as_the_summary_leaves_it_out(run):
    """compare once printed "+nan ± nan" where the summary averaged the seeds with a Δ: one rule now."""
    from ctan.metrics.mtl import over_seeds

    for case in run["better", 2]["per_case"]["lesion"].values():
        case["dice"] = math.nan
    run["better", 2]["tasks"]["lesion"]["dice"] = math.nan
    better = paired_bootstrap_delta(run, "better", [0, 1, 2], resamples=50)
    assert math.isnan(better["per_seed"][2])
    assert better["delta_mtl"] == pytest.approx(5.0) and better["seeds_with_delta"] == 2
    assert (better["delta_mtl"], better["std_over_seeds"], 2) == over_seeds(better["per_seed"])
