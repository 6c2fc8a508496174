"""`ctan tune`: hyperparameters chosen on the validation split, the same budget for every model.

Every architecture — and each STL network separately — trains once per point of the grid in
``tuning:`` (params.yaml; a dataset entry may override it) on the training split, and is scored on the
validation split only, at the epoch the usual selection rule keeps (`ctan.training.selection`). The
winner is the point that closes the largest mean share of each task's gap to a perfect score,
measured from the worst point of the grid; for one task that is simply its best validation metric.
The choice is written to ``models/<dataset>/<arch>/tuning[/<task>]/choice.json``; `ctan train`
applies it, and `ctan evaluate` copies it into metrics.json's provenance.

A grid with one value per key needs no tuning jobs: the value is used as given.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np

from ctan.config import DatasetSettings, dataset_settings
from ctan.errors import CtanError
from ctan.layout import check_task_option, choice_path, per_task
from ctan.training.selection import gap_closed, selection_metric

KEYS = ("lr",)  # training keys a grid may hold


def grid(settings: DatasetSettings) -> dict[str, list[Any]]:
    """``{training key: values}`` of the grid; keys with one value are not tuned."""
    return {k: list(settings.tuning.get(k) or [settings.training[k]]) for k in KEYS}


def needs_tuning(settings: DatasetSettings) -> bool:
    return any(len(values) > 1 for values in grid(settings).values())


def tuned_values(settings: DatasetSettings, arch: str, task: str | None = None) -> dict[str, Any]:
    """The training values a job must use: the tuning choice where the grid has several points."""
    if not needs_tuning(settings):
        return {}
    path = choice_path(settings, arch, task)
    if not path.is_file():
        how = f"ctan tune --dataset {settings.name} --arch {arch}" + (f" --task {task}" if task else "")
        raise CtanError(path, f"missing: the tuning grid has several points; run `{how}` first")
    choice = json.loads(path.read_text())
    if choice.get("grid") != grid(settings):
        raise CtanError(path, "made for another tuning grid; run `ctan tune` again")
    return dict(choice["chosen"])


def _points(settings: DatasetSettings) -> list[dict[str, Any]]:
    g = grid(settings)
    points: list[dict[str, Any]] = [{}]
    for key, values in g.items():
        points = [{**p, key: v} for p in points for v in values]
    return points


def _point_name(point: dict[str, Any]) -> str:
    return "_".join(f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in point.items())


def tune(
    params: dict[str, Any], dataset: str, arch: str, task: str | None = None, device: str | None = None
) -> list[Path]:
    """Train every grid point, score it on validation, write and return the choice file(s)."""
    from ctan.training.trainer import train

    settings = dataset_settings(params, dataset).trainable()
    if per_task(arch) and task is None:
        return [p for t in settings.tasks for p in tune(params, dataset, arch, t, device)]
    check_task_option(arch, task, dataset, "tunes")
    cfg = settings.tuning
    seed = int(cfg.get("seed", 0))
    out = choice_path(settings, arch, task)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not needs_tuning(settings):  # `dvc repro` runs every stage: record the given values, train nothing
        (point,) = _points(settings)
        return [
            _write(
                out,
                {
                    "dataset": dataset,
                    "architecture": arch,
                    "task": task or "all",
                    "grid": grid(settings),
                    "candidates": [],
                    "chosen": point,
                    "chosen_score": None,
                },
            )
        ]
    candidates = []
    for point in _points(settings):
        overrides = {**point}
        if cfg.get("epochs"):
            overrides["epochs"] = int(cfg["epochs"])
        trial = copy.deepcopy(params)
        entry = trial["datasets"][dataset]
        entry["training"] = {**entry.get("training", {}), **overrides}
        folder = out.parent / _point_name(point)
        (model_folder,) = train(trial, dataset, arch, seed, task=task, device=device, out=folder, tuned=False)
        history = json.loads((model_folder / "history.json").read_text())
        kept = history["epochs"][history["best_epoch"] - 1]
        candidates.append(
            {"point": point, "best_epoch": history["best_epoch"], "val_metrics": kept["val_metrics"]}
        )

    tasks = _tasks(settings, task)
    for c in candidates:
        shares = []
        for t in tasks:
            name, higher = selection_metric(t)
            values = [d["val_metrics"][t.name][name] for d in candidates]
            worst = min(values) if higher else max(values)
            shares.append(gap_closed(c["val_metrics"][t.name][name], worst, higher))
        c["score"] = float(np.mean(shares))
    best = max(candidates, key=lambda c: c["score"])  # first of equals: the grid's order decides ties
    document = {
        "dataset": dataset,
        "architecture": arch,
        "task": task or "all",
        "seed": seed,
        "grid": grid(settings),
        "epochs": int(cfg.get("epochs") or settings.training["epochs"]),
        "candidates": candidates,
        "chosen": best["point"],
        "chosen_score": best["score"],
        "rule": "mean over tasks of the share of the gap to a perfect validation score closed, "
        "from the grid's worst point; split: validation only",
    }
    return [_write(out, document)]


def _write(path: Path, document: dict[str, Any]) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(document, indent=1))
    tmp.replace(path)
    return path


def _tasks(settings: DatasetSettings, task: str | None):
    from ctan.manifest import read_manifest
    from ctan.tasks import dataset_tasks

    return dataset_tasks(settings, read_manifest(settings.preprocessed_dir), only=task)
