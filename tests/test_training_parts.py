"""Loss weighting, per-task losses and checkpoints: hand-computed values."""

import math

import pytest
import torch

from ctan.tasks import DOSE as SHARED_DOSE
from ctan.tasks import Task
from ctan.training import checkpoint
from ctan.training.losses import soft_dice_loss, task_loss
from ctan.training.weighting import build_weighting

DOSE = Task("dose", "regression", "dose", channels=1)
SEG = Task("structures", "segmentation", "structures", channels=2, multilabel=True)
DX = Task("diagnosis", "classification", "diagnosis", classes=3)
COVID = Task("covid", "classification", "covid", classes=2)


def test_equal_weighting_sums():
    w = build_weighting("equal", ["a", "b"])
    assert float(w({"a": torch.tensor(1.5), "b": torch.tensor(2.0)})) == pytest.approx(3.5)


def test_uncertainty_weighting_starts_as_sum_and_learns():
    w = build_weighting("uncertainty", ["a", "b"])
    total = w({"a": torch.tensor(1.0), "b": torch.tensor(3.0)})
    assert float(total.detach()) == pytest.approx(4.0)  # s = 0: exp(0)·L + 0
    total.backward()
    # d/ds (e^-s L + s) = 1 − L at s = 0
    assert w.log_vars.grad.tolist() == pytest.approx([0.0, -2.0])


def test_dwa_weights_follow_loss_ratios():
    w = build_weighting("dwa", ["a", "b"], dwa_temperature=2.0)
    w.end_epoch({"a": 1.0, "b": 1.0})
    assert w.weights() == {"a": 1.0, "b": 1.0}  # first epochs: equal
    w.end_epoch({"a": 0.5, "b": 1.0})  # a improved, b stalled -> b gets more weight
    ea, eb = math.exp(0.5 / 2), math.exp(1.0 / 2)
    assert w.weights()["a"] == pytest.approx(2 * ea / (ea + eb))
    assert w.weights()["b"] == pytest.approx(2 * eb / (ea + eb))
    restored = build_weighting("dwa", ["a", "b"])
    restored.load_extra_state(w.extra_state())
    assert restored.weights() == pytest.approx(w.weights())


def test_dose_loss_is_mae_inside_possible_dose_mask():
    pred = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[[1.0, 3.0], [100.0, 100.0]]]])
    mask = torch.tensor([[[[1, 1], [0, 0]]]])
    assert float(task_loss(DOSE, pred, {"dose": target, "possible_dose_mask": mask})) == pytest.approx(2.0)
    # In the head's units: the shared dose task predicts in 10 Gy, so the same error is 0.2 of them.
    batch = {"dose": target, "possible_dose_mask": mask}
    assert float(task_loss(SHARED_DOSE, pred, batch)) == pytest.approx(0.2)


def test_absent_structures_do_not_count():
    target = torch.zeros(1, 2, 4, 4)
    target[0, 0, :2] = 1
    logits = torch.full((1, 2, 4, 4), -20.0)
    logits[0, 0, :2] = 20.0
    # channel 1 is wildly wrong but not contoured: loss ~ 0
    logits[0, 1] = 20.0
    batch = {"structures": target, "structure_present": torch.tensor([[True, False]])}
    assert float(task_loss(SEG, logits, batch)) < 1e-3
    batch["structure_present"] = torch.tensor([[True, True]])
    assert float(task_loss(SEG, logits, batch)) > 1.0


def test_soft_dice_perfect_and_disjoint():
    t = torch.zeros(1, 1, 8)
    t[..., :4] = 1
    assert float(soft_dice_loss(torch.where(t > 0, 30.0, -30.0), t)) == pytest.approx(0.0, abs=1e-6)
    assert float(soft_dice_loss(torch.where(t > 0, -30.0, 30.0), t)) == pytest.approx(1 - 1 / 9, abs=1e-3)


def test_classification_losses():
    logits = torch.tensor([[0.0, 0.0, 0.0]])
    assert float(task_loss(DX, logits, {"diagnosis": torch.tensor([2])})) == pytest.approx(math.log(3))
    assert float(task_loss(COVID, torch.zeros(2, 1), {"covid": torch.tensor([0, 1])})) == pytest.approx(
        math.log(2)
    )


def test_checkpoint_roundtrip_is_weights_only(tmp_path):
    state = {"model": {"w": torch.arange(3.0)}, "epoch": 2, "history": "[]"}
    checkpoint.save_atomic(state, tmp_path / "c.pt")
    loaded = checkpoint.load(tmp_path / "c.pt")
    assert loaded["epoch"] == 2 and torch.equal(loaded["model"]["w"], torch.arange(3.0))
    assert not list(tmp_path.glob(".*tmp*"))


def test_malloc_keeps_freed_memory_on_glibc():
    """The mallopt call is accepted where glibc is the C library (Linux CI); elsewhere it is a no-op."""
    import platform

    from ctan.device import keep_freed_memory

    kept = keep_freed_memory()
    if platform.libc_ver()[0] == "glibc":
        assert kept
    else:
        assert kept is False


def test_severity_is_selected_among_covid_positive_cases():
    """As the test metric (auc_covid_positive): a severity score that ranks well only across COVID
    status must not look good on validation, once there are enough COVID-positive cases to rank."""
    import numpy as np

    from ctan.training.selection import (
        MIN_SEVERITY_CASES,
        classification_metrics,
        selection_metric_name,
        selection_score,
    )

    n = MIN_SEVERITY_CASES
    severity = Task("severity", "classification", "severity", classes=2)
    covid = np.array([0] * 4 * n + [1] * 2 * n)
    labels = np.array([0] * 4 * n + [0] * n + [1] * n)
    # Negatives far below, and among COVID-positive cases the severe ones ranked *below* the others.
    logits = np.concatenate([np.full(4 * n, -5.0), np.linspace(2.0, 3.0, n), np.linspace(0.5, 1.5, n)])
    metrics = classification_metrics(severity, logits, labels, covid)
    assert metrics["auc"] > 0.5  # over all cases: negatives rank lowest
    assert metrics["auc_covid_positive"] == 0.0
    assert selection_metric_name(severity, metrics) == "auc_covid_positive"
    assert classification_metrics(COVID, logits, covid, covid).keys() == {"auc", "balanced_accuracy"}
    better = classification_metrics(severity, -logits, labels, covid)  # right order among positives
    assert selection_score([severity], {"severity": better}, {"severity": metrics}) == 1.0
    assert selection_score([severity], {"severity": metrics}, {"severity": better}) < 0


def test_severity_falls_back_to_all_cases_on_few_covid_positive_cases():
    """One severe case fewer than MIN_SEVERITY_CASES: the AUC over all cases selects (the demo's case)."""
    import numpy as np

    from ctan.training.selection import MIN_SEVERITY_CASES, classification_metrics, selection_metric_name

    n = MIN_SEVERITY_CASES
    severity = Task("severity", "classification", "severity", classes=2)
    covid = np.array([0] * 4 + [1] * (2 * n - 1))
    labels = np.array([0] * 4 + [0] * n + [1] * (n - 1))
    logits = np.arange(len(labels), dtype=float)
    metrics = classification_metrics(severity, logits, labels, covid)
    assert "auc_covid_positive" not in metrics
    assert selection_metric_name(severity, metrics) == "auc"
    assert classification_metrics(severity, logits, labels).keys() == {"auc", "balanced_accuracy"}
