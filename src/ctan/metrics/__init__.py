"""The field's metrics and their registry: which metrics each task gets and which way is better.

Modules: `dose` (OpenKBP dose and DVH scores, challenge CSVs), `segmentation` (Dice, HD95, ISIC
thresholded Jaccard), `classification` (balanced accuracy, AUCs, STOIC), `mtl` (Δ_MTL).

Metric names used in ``metrics.json`` and ``results/summary.csv`` are the keys of `METRICS`;
per-structure variants are written ``<metric>/<structure>`` (e.g. ``dice/Brainstem``) and logged
variants may carry prefixes (``test/dose/dose_score``): `higher_is_better` understands both.
"""

from __future__ import annotations

from dataclasses import dataclass

from ctan.errors import CtanError
from ctan.tasks import Task


@dataclass(frozen=True)
class MetricInfo:
    higher_is_better: bool
    unit: str
    description: str


METRICS: dict[str, MetricInfo] = {
    "dose_score": MetricInfo(
        False, "Gy", "OpenKBP dose score: mean absolute dose error in the possible-dose mask"
    ),
    "dvh_score": MetricInfo(False, "Gy", "OpenKBP DVH score: mean absolute error of the DVH metrics"),
    "mae": MetricInfo(False, "Gy", "mean absolute error inside the possible-dose mask (learning curves)"),
    "dice": MetricInfo(True, "", "Dice coefficient (mean over contoured structures)"),
    "hd95": MetricInfo(False, "mm", "95th-percentile symmetric Hausdorff distance"),
    "jaccard": MetricInfo(True, "", "Jaccard index (intersection over union)"),
    "jaccard_thresholded": MetricInfo(True, "", "ISIC 2018 task 1: per-image Jaccard, < 0.65 counts as 0"),
    "accuracy": MetricInfo(True, "", "fraction of correct labels (learning curves)"),
    "balanced_accuracy": MetricInfo(True, "", "mean per-class recall (ISIC 2018 task 3)"),
    "auc": MetricInfo(True, "", "ROC AUC (binary)"),
    "auc_macro": MetricInfo(True, "", "macro one-vs-rest ROC AUC over the classes present"),
    "auc_covid_positive": MetricInfo(True, "", "STOIC 2021: severity AUC on COVID-positive patients"),
    "delta_mtl_pct": MetricInfo(True, "%", "Δ_MTL: mean relative improvement over STL"),
}


def metric_info(name: str) -> MetricInfo:
    """Registry entry for ``name``, also for ``dice/Brainstem`` or ``test/dose/dose_score``."""
    if name in METRICS:
        return METRICS[name]
    for part in reversed(name.split("/")):
        if part in METRICS:
            return METRICS[part]
    raise CtanError(None, f"unknown metric {name!r}; known: {', '.join(sorted(METRICS))}")


def higher_is_better(name: str) -> bool:
    """Whether a larger value of metric ``name`` is better (sets the sign in Δ_MTL)."""
    return metric_info(name).higher_is_better


def metrics_for(task: Task) -> dict[str, bool]:
    """``{metric: higher_is_better}`` of what a task reports: its record's ``metrics`` (the one source)."""
    if not task.metrics:
        raise CtanError(None, f"task {task.name!r} declares no metrics (Task.metrics)")
    return {name: higher_is_better(name) for name in task.metrics}
