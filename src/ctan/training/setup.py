"""What a training or evaluation job is about: its tasks (sized from the data), folders and run name."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ctan.config import DatasetSettings
from ctan.errors import CtanError
from ctan.tasks import Task
from ctan.workspace import inside


def read_manifest(settings: DatasetSettings) -> dict[str, Any]:
    path = settings.preprocessed_dir / "manifest.json"
    if not path.is_file():
        raise CtanError(path, f"missing; run `ctan preprocess {settings.name}` first")
    return json.loads(path.read_text())


def resolve_tasks(settings: DatasetSettings, manifest: dict[str, Any], only: str | None = None) -> list[Task]:
    """The dataset's configured tasks, with channel/class counts taken from the preprocessed data.

    Bring-your-own cases define their own structures, so the count is known only after preprocessing.
    """
    from ctan.datasets import get_reader

    reader = get_reader(settings.format)
    names = list(settings.tasks)
    if only is not None:
        if only not in names:
            raise CtanError(None, f"task {only!r} is not a task of {settings.name} ({', '.join(names)})")
        names = [only]
    tasks = []
    for name in names:
        if name not in reader.TASKS:
            raise CtanError(
                None, f"format {settings.format} offers no task {name!r} ({', '.join(reader.TASKS)})"
            )
        task = reader.TASKS[name]
        if task.target == "structures":
            task = dataclasses.replace(task, channels=len(manifest["structure_names"]))
        if name in settings.primary_metrics:
            task = dataclasses.replace(task, primary_metrics=_primary_override(settings, task))
        if task.kind == "classification" and task.target == "diagnosis" and manifest.get("class_names"):
            classes = manifest["class_names"]
            task = dataclasses.replace(task, classes=len(classes), class_names=tuple(classes))
        tasks.append(task)
    return tasks


def _primary_override(settings: DatasetSettings, task: Task) -> tuple[str, ...]:
    chosen = tuple(settings.primary_metrics[task.name])
    unknown = [m for m in chosen if m not in task.metrics]
    if unknown or not chosen:
        raise CtanError(
            None,
            f"datasets.{settings.name}.primary_metrics.{task.name}: {', '.join(unknown) or 'empty'} "
            f"not among the task's metrics ({', '.join(task.metrics)})",
        )
    return chosen


def run_dir(root: Path, arch: str, seed: int, task: str | None = None) -> Path:
    """``root/<arch>/seed<seed>[/<task>]``: where one job's files live, kept inside ``root``."""
    return inside(root, arch, f"seed{seed}", *([task] if task else []))


def model_dir(settings: DatasetSettings, arch: str, seed: int, task: str | None = None) -> Path:
    return run_dir(settings.models_dir, arch, seed, task)


def results_dir(settings: DatasetSettings, arch: str, seed: int) -> Path:
    return run_dir(settings.results_dir, arch, seed)


def task_to_dict(task: Task) -> dict[str, Any]:
    """Plain types only, so checkpoints load with torch.load(weights_only=True)."""
    out = dataclasses.asdict(task)
    out["class_names"] = list(task.class_names)
    out["metrics"] = list(task.metrics)
    out["primary_metrics"] = list(task.primary_metrics)
    return out


def task_from_dict(data: dict[str, Any]) -> Task:
    known = {f.name for f in dataclasses.fields(Task)}
    data = {k: v for k, v in data.items() if k in known}  # checkpoints from before a field was dropped
    tuples = {k: tuple(data.get(k, ())) for k in ("class_names", "metrics", "primary_metrics")}
    return Task(**{**data, **tuples})
