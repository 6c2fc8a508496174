"""Image-level metrics: balanced accuracy, binary and macro one-vs-rest AUC, and STOIC 2021's AUCs.

Undefined values are NaN, never an exception, and the reason is logged (logger ``ctan.metrics``):
an AUC needs both classes in ``y_true``; a balanced accuracy needs at least one sample. Bad input is
an error (`CtanError`): NaN or infinite scores, labels that are not class indices.

- Balanced accuracy (ISIC 2018 task 3): the mean recall over the classes present in ``y_true``
  (scikit-learn's ``balanced_accuracy_score``; predicted classes absent from ``y_true`` only lower
  the recall of the true classes).
- Macro AUC one-vs-rest: the mean of each class's binary AUC (class k against the rest, scored by
  column k); classes absent from ``y_true`` are skipped, as are classes present in every sample,
  rather than making the whole metric undefined. NaN if no class can be scored.
- STOIC 2021: AUC for COVID-19 on all patients; AUC for severity on RT-PCR-positive patients only.
Ties between scores count one half, as in scikit-learn's ``roc_auc_score``.
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from ctan.errors import CtanError

log = logging.getLogger("ctan.metrics")


def _labels(y_true: np.ndarray | list) -> np.ndarray:
    """Class indices as int64; NaN or fractional "labels" are refused rather than truncated (a NaN
    cast to int64 is a large negative number that silently counts as a wrong class)."""
    array = np.asarray(y_true)
    if array.ndim != 1:
        raise CtanError(None, f"labels must be one-dimensional, got shape {array.shape}")
    if array.dtype.kind == "f":
        bad = ~np.isfinite(array) | (array != np.round(array))
        if bad.any():
            raise CtanError(None, f"labels must be class indices, found {array[bad][:3].tolist()}")
    return array.astype(np.int64)


def _scores(score: np.ndarray | list, name: str) -> np.ndarray:
    """Scores as float64, refused if any is NaN or infinite (scikit-learn's bare ValueError before)."""
    values = np.asarray(score, dtype=np.float64)
    bad = int(np.count_nonzero(~np.isfinite(values)))
    if bad:
        raise CtanError(None, f"{name}: {bad} score(s) are NaN or infinite")
    return values


def balanced_accuracy(y_true: np.ndarray | list, y_pred: np.ndarray | list) -> float:
    """Mean per-class recall over the classes in ``y_true``; NaN for no samples."""
    truth, predicted = _labels(y_true), _labels(y_pred)
    if truth.shape != predicted.shape:
        raise CtanError(None, f"{truth.size} labels but {predicted.size} predictions")
    if truth.size == 0:
        log.warning("balanced accuracy undefined: no samples")
        return float("nan")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return float(balanced_accuracy_score(truth, predicted))


def binary_auc(y_true: np.ndarray | list, score: np.ndarray | list, name: str = "AUC") -> float:
    """ROC AUC of a binary label against a score (higher = positive); NaN if one class only."""
    truth = _labels(y_true)
    values = _scores(score, name)
    if values.shape != truth.shape:
        raise CtanError(None, f"{name}: {truth.size} labels but scores of shape {values.shape}")
    classes = np.unique(truth)
    if not set(classes.tolist()) <= {0, 1}:
        raise CtanError(None, f"{name}: binary labels must be 0/1, found {classes.tolist()}")
    if classes.size < 2:
        which = "no samples" if classes.size == 0 else f"only class {int(classes[0])} ({truth.size} samples)"
        log.warning("%s undefined: y_true holds %s", name, which)
        return float("nan")
    return float(roc_auc_score(truth, values))


def per_class_auc(
    y_true: np.ndarray | list, scores: np.ndarray, n_classes: int | None = None
) -> dict[int, float]:
    """One-vs-rest AUC of each class (column of ``scores``, shape ``(N, K)``); NaN where undefined."""
    truth = _labels(y_true)
    scores = _scores(scores, "macro AUC")
    if scores.ndim != 2 or scores.shape[0] != truth.size:
        raise CtanError(None, f"scores must be (N, K) with N={truth.size}, got {scores.shape}")
    if n_classes is not None and scores.shape[1] != n_classes:
        raise CtanError(None, f"scores have {scores.shape[1]} columns for {n_classes} classes")
    if truth.size and (truth.min() < 0 or truth.max() >= scores.shape[1]):
        raise CtanError(None, f"labels outside 0..{scores.shape[1] - 1}")
    out: dict[int, float] = {}
    for k in range(scores.shape[1]):
        positive = truth == k
        if positive.all() or not positive.any():
            out[k] = float("nan")  # absent (or alone) in y_true: AUC of this class is undefined
        else:
            out[k] = float(roc_auc_score(positive.astype(np.int64), scores[:, k]))
    return out


def macro_auc(y_true: np.ndarray | list, scores: np.ndarray, n_classes: int | None = None) -> float:
    """Macro one-vs-rest AUC over the classes that can be scored; NaN with a logged reason if none.

    ``scores`` is ``(N, K)`` (probabilities or logits: AUC only uses their order within a column);
    ``n_classes``, when given, is checked against K.
    """
    values = [v for v in per_class_auc(y_true, scores, n_classes).values() if not np.isnan(v)]
    if not values:
        present = np.unique(_labels(y_true)).tolist()
        log.warning("macro AUC undefined: y_true holds classes %s, at least two are needed", present)
        return float("nan")
    return float(np.mean(values))


def stoic_aucs(
    covid_true: np.ndarray | list,
    covid_score: np.ndarray | list,
    severity_true: np.ndarray | list,
    severity_score: np.ndarray | list,
) -> dict[str, float]:
    """STOIC 2021: ``auc_covid`` on all patients, ``auc_severity`` on COVID-positive patients only."""
    covid = _labels(covid_true)
    severity = _labels(severity_true)
    severity_values = _scores(severity_score, "severity AUC")
    if severity.shape != covid.shape or severity_values.shape != covid.shape:
        raise CtanError(None, "STOIC labels and scores must all have one value per patient")
    positive = covid == 1
    return {
        "auc_covid": binary_auc(covid, covid_score, name="COVID AUC"),
        "auc_severity": binary_auc(
            severity[positive], severity_values[positive], name="severity AUC (COVID+)"
        ),
    }


# Fast versions for bootstrap resamples and per-epoch validation: scikit-learn's input validation made
# 2,000 resamples take 15 min. Checked against scikit-learn in tests/test_comparison.py.


def rank_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of a boolean label against a score; NaN where one class is missing."""
    from scipy.stats import rankdata

    positive = np.asarray(positive, dtype=bool)
    n1 = int(positive.sum())
    n0 = positive.size - n1
    if n1 == 0 or n0 == 0:
        return math.nan
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def mean_recall(labels: np.ndarray, predicted: np.ndarray) -> float:
    """Balanced accuracy without scikit-learn's input checks: mean recall over the classes in ``labels``."""
    classes = np.unique(labels)
    if classes.size == 0:
        return math.nan
    return float(np.mean([np.mean(predicted[labels == k] == k) for k in classes]))
