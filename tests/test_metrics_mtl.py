"""Δ_MTL as LibMTL's count_improvement, the registry of metric directions."""

from __future__ import annotations

import math

import pytest

from ctan import metrics
from ctan.errors import CtanError
from ctan.metrics.mtl import delta_mtl, relative_change, relative_changes
from ctan.tasks import Task

# LibMTL's docstring example: base {'A': [96, 98], 'B': [0.2]}, new {'A': [93, 99], 'B': [0.5]},
# weight {'A': [1, 0], 'B': [1]} (1 = higher is better).
STL = {"A": {"m1": 96.0, "m2": 98.0}, "B": {"m3": 0.2}}
MODEL = {"A": {"m1": 93.0, "m2": 99.0}, "B": {"m3": 0.5}}
DIRECTIONS = {"m1": True, "m2": False, "m3": True}


def _libmtl_count_improvement(base, new, weight):
    """LibMTL/utils.py count_improvement, ported (returns a fraction)."""
    improvement = 0.0
    for task in base:
        terms = [(-1) ** w * (b - n) / b for b, n, w in zip(base[task], new[task], weight[task], strict=True)]
        improvement += sum(terms) / len(terms)
    return improvement / len(base)


def test_delta_mtl_hand_computed_and_equal_to_libmtl():
    # A: (93−96)/96 = −3.125 %, −(99−98)/98 = −1.0204 % -> mean −2.0727 %; B: (0.5−0.2)/0.2 = +150 %
    expected = ((-3.125 - 100 / 98) / 2 + 150.0) / 2
    assert delta_mtl(MODEL, STL, DIRECTIONS) == pytest.approx(expected)
    libmtl = _libmtl_count_improvement(
        {"A": [96, 98], "B": [0.2]}, {"A": [93, 99], "B": [0.5]}, {"A": [1, 0], "B": [1]}
    )
    assert delta_mtl(MODEL, STL, DIRECTIONS) == pytest.approx(100 * libmtl)


def test_per_metric_relative_changes_and_nested_directions():
    nested = {"A": {"m1": True, "m2": False}, "B": {"m3": True}}
    changes = relative_changes(MODEL, STL, nested)
    assert changes["A"]["m1"] == pytest.approx(-3.125)
    assert changes["A"]["m2"] == pytest.approx(-100 / 98)
    assert changes["B"]["m3"] == pytest.approx(150.0)
    assert delta_mtl(MODEL, STL, nested) == pytest.approx(delta_mtl(MODEL, STL, DIRECTIONS))


def test_identical_to_stl_is_zero_and_registry_directions_by_default():
    results = {"dose": {"dose_score": 2.5, "dvh_score": 1.8}, "structures": {"dice": 0.8, "hd95": 4.0}}
    assert delta_mtl(results, results) == 0.0
    better = {"dose": {"dose_score": 2.0, "dvh_score": 1.8}, "structures": {"dice": 0.88, "hd95": 4.0}}
    # dose: +20 % (lower is better), 0 -> 10 %; structures: +10 %, 0 -> 5 %; Δ = 7.5 %
    assert delta_mtl(better, results) == pytest.approx(7.5)


def test_undefined_relative_changes_propagate_and_missing_metrics_raise():
    assert math.isnan(relative_change(0.5, 0.0, True))
    assert math.isnan(relative_change(float("nan"), 0.5, True))
    assert math.isnan(delta_mtl({"A": {"m1": float("nan")}}, {"A": {"m1": 0.5}}, {"m1": True}))
    with pytest.raises(CtanError, match="B"):
        delta_mtl({"A": MODEL["A"]}, STL, DIRECTIONS)
    with pytest.raises(CtanError, match="direction"):
        delta_mtl(MODEL, STL, {"m1": True})


def test_registry():
    assert metrics.higher_is_better("dice") and not metrics.higher_is_better("hd95")
    assert not metrics.higher_is_better("dose_score") and not metrics.higher_is_better("dvh_score")
    assert metrics.higher_is_better("dice/Brainstem")
    assert not metrics.higher_is_better("test/dose/dvh_score")
    assert metrics.higher_is_better("jaccard_thresholded") and metrics.higher_is_better("auc_covid_positive")
    with pytest.raises(CtanError):
        metrics.higher_is_better("loss_of_nerve")
    from ctan.datasets import get_reader

    assert metrics.metrics_for(get_reader("openkbp").TASKS["dose"]) == {
        "dose_score": False,
        "dvh_score": False,
    }
    lesion = get_reader("ham10000").TASKS["lesion"]
    assert metrics.metrics_for(lesion) == {"dice": True, "jaccard_thresholded": True}
    structures = get_reader("openkbp").TASKS["structures"]
    assert metrics.metrics_for(structures) == {"dice": True, "hd95": False}
    assert structures.primary_metrics == ("dice",)  # HD95 is reported, never averaged into Δ_MTL
    with pytest.raises(CtanError, match="declares no metrics"):
        metrics.metrics_for(Task(name="x", kind="classification", target="new_label", classes=2))


def test_every_primary_metric_is_bounded_and_reported():
    from ctan.datasets import FORMATS, get_reader

    bounded = {"dose_score", "dvh_score", "dice", "jaccard_thresholded", "balanced_accuracy", "auc"}
    bounded |= {"auc_macro", "auc_covid_positive"}
    for fmt in FORMATS:
        for task in get_reader(fmt).TASKS.values():
            assert task.primary_metrics and set(task.primary_metrics) <= set(task.metrics), (fmt, task.name)
            assert set(task.primary_metrics) <= bounded, (fmt, task.name)


def test_equal_values_are_no_change_even_against_a_zero_baseline():
    from ctan.metrics.mtl import delta_mtl, relative_change

    assert relative_change(0.0, 0.0, True) == 0.0
    assert relative_change(0.5, 0.0, True) != relative_change(0.5, 0.0, True)  # NaN: undefined
    results = {"seg": {"dice": 0.0}, "dose": {"dose_score": 3.0}}
    assert delta_mtl(results, results, {"dice": True, "dose_score": False}) == 0.0
