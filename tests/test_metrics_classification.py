"""Balanced accuracy, AUCs and STOIC's AUCs: hand-computed values, ties, absent and lone classes."""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import pytest

from ctan.errors import CtanError
from ctan.metrics import classification as C


def test_balanced_accuracy_is_mean_recall_over_true_classes():
    y_true = [0, 0, 0, 0, 1, 1, 2, 2]
    y_pred = [0, 0, 0, 1, 1, 0, 2, 2]
    # recalls: class 0 3/4, class 1 1/2, class 2 2/2
    assert C.balanced_accuracy(y_true, y_pred) == pytest.approx((0.75 + 0.5 + 1.0) / 3)


def test_balanced_accuracy_with_predicted_class_absent_from_truth_is_warning_free():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert C.balanced_accuracy([0, 0, 1, 1], [0, 6, 1, 1]) == pytest.approx((0.5 + 1.0) / 2)
    assert math.isnan(C.balanced_accuracy([], []))
    with pytest.raises(CtanError):
        C.balanced_accuracy([0, 1], [0])


def test_binary_auc_hand_computed_with_ties():
    # positives scores 0.8, 0.5; negatives 0.5, 0.2. Pairs: (0.8>0.5) 1, (0.8>0.2) 1, (0.5=0.5) ½, (0.5>0.2) 1
    assert C.binary_auc([1, 1, 0, 0], [0.8, 0.5, 0.5, 0.2]) == pytest.approx(3.5 / 4)
    assert C.binary_auc([1, 0], [0.3, 0.3]) == pytest.approx(0.5)


def test_binary_auc_one_class_is_nan_with_a_reason(caplog):
    with caplog.at_level(logging.WARNING, logger="ctan.metrics"), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(C.binary_auc([1, 1, 1], [0.2, 0.4, 0.9]))
    assert "only class 1" in caplog.text
    assert math.isnan(C.binary_auc([], []))
    with pytest.raises(CtanError):
        C.binary_auc([0, 2], [0.1, 0.2])


def test_macro_auc_skips_classes_absent_from_truth():
    y_true = np.array([0, 0, 1, 1])
    scores = np.array(
        [
            [0.7, 0.2, 0.1],
            [0.4, 0.5, 0.1],
            [0.3, 0.6, 0.1],
            [0.5, 0.4, 0.1],
        ]
    )
    # class 0 vs rest: pos {0.7, 0.4} neg {0.3, 0.5}: pairs 1, 1, 1, 0 -> 0.75
    # class 1 vs rest: pos {0.6, 0.4} neg {0.2, 0.5}: pairs 1, 1, 1, 0 -> 0.75; class 2 absent: skipped
    per_class = C.per_class_auc(y_true, scores)
    assert per_class[0] == pytest.approx(0.75) and per_class[1] == pytest.approx(0.75)
    assert math.isnan(per_class[2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert C.macro_auc(y_true, scores, n_classes=3) == pytest.approx(0.75)
    with pytest.raises(CtanError):
        C.macro_auc(y_true, scores, n_classes=7)


def test_macro_auc_matches_sklearn_when_all_classes_present():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y_true = np.arange(40) % 4
    logits = rng.normal(size=(40, 4)) + np.eye(4)[y_true]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = roc_auc_score(y_true, probs, multi_class="ovr", average="macro")
    assert C.macro_auc(y_true, probs) == pytest.approx(expected)


def test_macro_auc_one_class_present_is_nan(caplog):
    with caplog.at_level(logging.WARNING, logger="ctan.metrics"):
        assert math.isnan(C.macro_auc([2, 2, 2], np.full((3, 4), 0.25)))
    assert "at least two" in caplog.text


def test_stoic_severity_auc_only_on_covid_positive_patients():
    covid = [1, 1, 1, 1, 0, 0]
    covid_score = [0.9, 0.8, 0.7, 0.4, 0.6, 0.1]
    severe = [1, 0, 1, 0, 0, 0]
    severe_score = [0.9, 0.2, 0.3, 0.4, 0.95, 0.99]  # the negatives' high scores must not count
    result = C.stoic_aucs(covid, covid_score, severe, severe_score)
    # covid: positives {.9,.8,.7,.4} vs negatives {.6,.1}: 7 of 8 pairs -> 0.875
    assert result["auc_covid"] == pytest.approx(0.875)
    # severity among COVID+: severe {.9,.3} vs non-severe {.2,.4}: pairs 1, 1, 1, 0 -> 0.75
    assert result["auc_severity"] == pytest.approx(0.75)


def test_stoic_without_severe_covid_cases_is_nan():
    result = C.stoic_aucs([1, 0], [0.7, 0.2], [0, 1], [0.1, 0.9])
    assert result["auc_covid"] == 1.0
    assert math.isnan(result["auc_severity"])
