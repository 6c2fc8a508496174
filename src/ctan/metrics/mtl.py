"""Δ_MTL: the average relative improvement of a multi-task model over single-task learning (STL).

Maninis et al. 2019 / Vandenhende et al.; computed as LibMTL's ``count_improvement``:

    Δ = 100 % × (1/T) Σ_t (1/M_t) Σ_m (−1)^{l_{t,m}} (M_{t,m} − M_STL,{t,m}) / M_STL,{t,m}

with ``l = 1`` where lower is better, so a positive Δ means better than STL. Metrics are averaged
within each task first, so a task with several metrics weighs as much as a task with one. The
baseline is the STL model's value (same seed), never epoch 0.

A relative change is NaN where either value is NaN or the STL value is 0; Δ is then NaN too, rather
than silently averaging over fewer metrics. The change is divided by ``|M_STL|`` (LibMTL divides by
``M_STL``): the same for the non-negative metrics of the registry, and for a negative baseline it
keeps "positive = better" true instead of flipping the sign.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

from ctan.errors import CtanError

log = logging.getLogger("ctan.metrics")

Results = Mapping[str, Mapping[str, float]]
Primary = Mapping[str, Sequence[str]]
Directions = Mapping[str, bool] | Mapping[str, Mapping[str, bool]]


def _direction(directions: Directions | None, task: str, metric: str) -> bool:
    if directions is None:
        from ctan.metrics import higher_is_better

        return higher_is_better(metric)
    per_task = directions.get(task)
    if isinstance(per_task, Mapping) and metric in per_task:
        return bool(per_task[metric])
    if metric in directions and not isinstance(directions[metric], Mapping):
        return bool(directions[metric])
    raise CtanError(None, f"no higher-is-better direction for {task}/{metric}")


def relative_change(value: float, stl: float, higher_is_better: bool) -> float:
    """Signed relative change (%) of one metric over STL: positive = better than STL."""
    value, stl = float(value), float(stl)
    if value == stl:  # no change, also against a zero baseline (STL compared with itself)
        return 0.0
    if math.isnan(value) or math.isnan(stl) or stl == 0:
        return float("nan")
    sign = 1.0 if higher_is_better else -1.0
    return sign * (value - stl) / abs(stl) * 100.0


def relative_changes(
    model: Results, stl: Results, directions: Directions | None = None, primary: Primary | None = None
) -> dict[str, dict[str, float]]:
    """``{task: {metric: signed relative change %}}`` for every metric of the STL results.

    ``directions`` is ``{metric: higher_is_better}`` or ``{task: {metric: higher_is_better}}``; by
    default the registry's (`ctan.metrics.higher_is_better`). ``primary`` (``{task: metrics}``, the
    task records' `primary_metrics`) keeps only those metrics.
    """
    out: dict[str, dict[str, float]] = {}
    for task, baseline in stl.items():
        if task not in model:
            raise CtanError(None, f"model results lack task {task!r} that STL has")
        out[task] = {}
        if primary is not None:
            missing = [m for m in primary.get(task, ()) if m not in baseline]
            if missing or task not in primary:
                raise CtanError(
                    None, f"STL results lack {task} primary metric(s) {missing or '(none declared)'}"
                )
            baseline = {m: baseline[m] for m in primary[task]}
        for metric, reference in baseline.items():
            if metric not in model[task]:
                raise CtanError(None, f"model results lack {task}/{metric} that STL has")
            change = relative_change(model[task][metric], reference, _direction(directions, task, metric))
            if math.isnan(change):
                log.warning(
                    "relative change of %s/%s undefined (model %s, STL %s)",
                    task,
                    metric,
                    model[task][metric],
                    reference,
                )
            out[task][metric] = change
    return out


def delta_mtl(
    model: Results, stl: Results, directions: Directions | None = None, primary: Primary | None = None
) -> float:
    """Δ_MTL in % over the tasks of ``stl`` (metrics averaged within a task, then over tasks).

    With ``primary``, only each task's primary metrics enter (the headline: bounded metrics only)."""
    changes = relative_changes(model, stl, directions, primary)
    per_task = [sum(metrics.values()) / len(metrics) for metrics in changes.values() if metrics]
    if not per_task:
        raise CtanError(None, "Δ_MTL needs at least one task with one metric")
    return sum(per_task) / len(per_task)


def over_seeds(deltas: Sequence[float]) -> tuple[float, float, int]:
    """(mean, std, n) of the seeds whose Δ_MTL is defined: the one rule of the summary and the comparison
    (a seed whose Δ is undefined is left out and ``n`` says so, rather than making the mean NaN)."""
    finite = [float(d) for d in deltas if math.isfinite(d)]
    if not finite:
        return math.nan, math.nan, 0
    mean = sum(finite) / len(finite)
    std = math.sqrt(sum((d - mean) ** 2 for d in finite) / (len(finite) - 1)) if len(finite) > 1 else 0.0
    return mean, std, len(finite)
