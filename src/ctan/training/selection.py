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


MIN_SEVERITY_CASES = 5
"""Severe and non-severe COVID-positive validation cases each needs before severity is selected by its
AUC among them. Below that (the demo's 8 validation cases hold 1-3 of each) one case moves that AUC by
a fifth or more and the kept epoch follows noise (a first attempt without this floor left the demo's
multi-task heads at the class prior); the AUC over all validation cases is used instead."""


def classification_metrics(
    task: Task, logits: np.ndarray, labels: np.ndarray, covid: np.ndarray | None = None
) -> dict[str, float]:
    """Epoch-level validation metrics of an image-level task (a per-batch mean would be meaningless).

    Severity, given the cases' ``covid`` labels, is also scored among COVID-positive cases
    (``auc_covid_positive``, STOIC's test metric) when they hold `MIN_SEVERITY_CASES` of each class;
    selection then uses that AUC instead of the one over all cases (`selection_metric_name`).
    """
    from ctan.metrics.classification import mean_recall, rank_auc

    labels = labels.astype(int).reshape(-1)
    if task.out_channels != 1:
        return {"balanced_accuracy": mean_recall(labels, logits.argmax(axis=1))}
    score = logits.reshape(-1)
    positive = labels == 1
    auc = rank_auc(positive, score) if 0 < positive.sum() < len(labels) else 0.5
    out = {"auc": auc, "balanced_accuracy": mean_recall(labels, (score > 0).astype(int))}
    if task.target == "severity" and covid is not None:
        among = covid.reshape(-1) == 1
        severe = int(positive[among].sum())
        if min(severe, int(among.sum()) - severe) >= MIN_SEVERITY_CASES:
            out["auc_covid_positive"] = rank_auc(positive[among], score[among])
    return out


def selection_metric_name(task: Task, metrics: Mapping[str, float]) -> str:
    """The metric an epoch of ``task`` is judged by: `selection_metric`'s, except severity's AUC among
    COVID-positive cases where the validation split allowed it (the same every epoch)."""
    name, _ = selection_metric(task)
    return "auc_covid_positive" if name == "auc" and "auc_covid_positive" in metrics else name


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
        _, higher = selection_metric(task)
        name = selection_metric_name(task, first[task.name])
        shares.append(gap_closed(metrics[task.name][name], first[task.name][name], higher))
    return float(np.mean(shares))


def improves(record: Mapping[str, Any], best: Mapping[str, Any]) -> bool:
    """Whether an epoch's history record beats the kept one: higher score, then lower validation loss."""
    if record["selection_score"] != best["selection_score"]:
        return record["selection_score"] > best["selection_score"]
    return record["val_loss"]["total"] < best["val_loss"]["total"]
