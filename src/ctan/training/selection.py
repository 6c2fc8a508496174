"""Which epoch a training job keeps: one rule for STL and multi-task models, on validation metrics only.

Each task is scored on the validation split by its selection metric (dose: MAE in the possible-dose
mask; segmentation: Dice; binary classification: ROC AUC; multi-class: balanced accuracy), and
normalised as the *share of the gap to a perfect score closed since the first epoch*:

    higher is better, bounded by 1:   (m_e − m_1) / (1 − m_1)
    lower is better, bounded by 0:    (m_1 − m_e) / m_1

The kept epoch maximises the mean of that share over tasks; among equal scores (a validation AUC of
1 on a few cases is reached long before the head is calibrated) the lower total validation loss wins.
For one task (an STL network) this is the epoch with the best validation metric; for several it weighs
every task alike, whatever the scale of its loss. The unweighted sum of validation losses used before
let the largest loss (cross-entropy ≈ 1.8 against a Dice loss ≈ 0.1 on HAM10000) decide for all tasks,
and STL never faced that.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ctan.tasks import Task

EPS = 1e-6


def selection_metric(task: Task) -> tuple[str, bool]:
    """``(metric name, higher is better)`` used to pick a task's best epoch."""
    if task.kind == "regression":
        return "mae", False
    if task.kind == "segmentation":
        return "dice", True
    return ("auc", True) if task.out_channels == 1 else ("balanced_accuracy", True)


def classification_metrics(task: Task, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Epoch-level validation metrics of an image-level task (a per-batch mean would be meaningless)."""
    from ctan.metrics.classification import mean_recall, rank_auc

    labels = labels.astype(int)
    if task.out_channels == 1:
        score = logits.reshape(-1)
        positive = labels == 1
        auc = rank_auc(positive, score) if 0 < positive.sum() < len(labels) else 0.5
        return {"auc": auc, "balanced_accuracy": mean_recall(labels, (score > 0).astype(int))}
    return {"balanced_accuracy": mean_recall(labels, logits.argmax(axis=1))}


def gap_closed(value: float, first: float, higher_is_better: bool) -> float:
    """Share of the distance to a perfect score (1, or 0 for errors) closed since the first epoch."""
    if not (math.isfinite(value) and math.isfinite(first)):
        return -math.inf
    if higher_is_better:
        return (value - first) / max(1.0 - first, EPS)
    return (first - value) / max(first, EPS)


def selection_score(
    tasks: list[Task], metrics: Mapping[str, Mapping[str, float]], first: Mapping[str, Mapping[str, float]]
) -> float:
    """Mean over tasks of `gap_closed` for this epoch's validation ``metrics`` against the first epoch's."""
    shares = []
    for task in tasks:
        name, higher = selection_metric(task)
        shares.append(gap_closed(metrics[task.name][name], first[task.name][name], higher))
    return float(np.mean(shares))


def improves(record: Mapping[str, Any], best: Mapping[str, Any]) -> bool:
    """Whether an epoch's history record beats the kept one: higher score, then lower validation loss."""
    if record["selection_score"] != best["selection_score"]:
        return record["selection_score"] > best["selection_score"]
    return record["val_loss"]["total"] < best["val_loss"]["total"]
