"""Checkpoint selection: one rule for STL and multi-task models, on validation metrics."""

from __future__ import annotations

import numpy as np
import pytest

from ctan.tasks import Task
from ctan.training.selection import classification_metrics, gap_closed, selection_score

DOSE = Task("dose", "regression", "dose")
LESION = Task("lesion", "segmentation", "lesion")
DIAGNOSIS = Task("diagnosis", "classification", "diagnosis", classes=3)
COVID = Task("covid", "classification", "covid", classes=2)


def test_gap_closed_by_direction():
    assert gap_closed(0.75, 0.5, True) == pytest.approx(0.5)  # half the way from 0.5 to 1
    assert gap_closed(2.0, 8.0, False) == pytest.approx(0.75)  # 3/4 of the error removed
    assert gap_closed(0.4, 0.5, True) < 0
    assert gap_closed(float("nan"), 0.5, True) == -np.inf


def test_one_task_picks_its_best_metric_and_scale_does_not_decide():
    first = {"dose": {"mae": 10.0}, "lesion": {"dice": 0.2}}
    # Epoch A: dose much better (large units), lesion worse. Epoch B: both moderately better.
    epoch_a = {"dose": {"mae": 6.0}, "lesion": {"dice": 0.1}}
    epoch_b = {"dose": {"mae": 8.0}, "lesion": {"dice": 0.6}}
    assert selection_score([DOSE], epoch_a, first) > selection_score([DOSE], epoch_b, first)
    assert selection_score([LESION], epoch_b, first) > selection_score([LESION], epoch_a, first)
    # Together each task counts alike: B closes 20 % + 50 %, A 40 % − 12.5 %.
    assert selection_score([DOSE, LESION], epoch_b, first) > selection_score([DOSE, LESION], epoch_a, first)


def test_classification_metrics_are_computed_over_the_whole_split():
    labels = np.array([0, 0, 1, 1])
    out = classification_metrics(COVID, np.array([[-1.0], [0.5], [0.2], [2.0]]), labels)
    assert out["auc"] == pytest.approx(0.75)
    assert out["balanced_accuracy"] == pytest.approx(0.75)
    logits = np.eye(3)[[0, 1, 2, 2]]
    assert classification_metrics(DIAGNOSIS, logits, np.array([0, 1, 2, 1]))["balanced_accuracy"] == (
        pytest.approx((1 + 0.5 + 1) / 3)
    )
    # One class only: AUC undefined, reported as chance so the epoch is not preferred.
    assert classification_metrics(COVID, np.array([[1.0], [2.0]]), np.array([1, 1]))["auc"] == 0.5


def test_equal_scores_are_decided_by_the_validation_loss():
    from ctan.training.selection import improves

    kept = {"selection_score": 1.0, "val_loss": {"total": 1.25}}
    assert improves({"selection_score": 1.0, "val_loss": {"total": 0.1}}, kept)
    assert not improves({"selection_score": 0.9, "val_loss": {"total": 0.1}}, kept)
    assert improves({"selection_score": 1.1, "val_loss": {"total": 9.0}}, kept)
