"""Where a run's artefacts live: one map for the package and the Snakefile alike.

    models/<dataset>/<arch>/seed<k>/model.pt              a multi-task model, one per training job
    models/<dataset>/stl/seed<k>/<task>/model.pt           STL: one network per task, each its own job
    models/<dataset>/<arch>/tuning[/<task>]/choice.json    the learning rate (etc.) `ctan tune` chose
    results/<dataset>/<arch>/seed<k>/metrics.json          one evaluation (STL: all its tasks together)
    results/<dataset>/external/<set>/<arch>/seed<k>/       the same models on an external test set

Every folder is built with `ctan.workspace.inside`, so no name from the parameters leaves its root.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ctan.errors import CtanError
from ctan.workspace import inside

if TYPE_CHECKING:
    from ctan.config import DatasetSettings

SINGLE_TASK = "stl"


def per_task(arch: str) -> bool:
    """STL trains, tunes and stores one network per task; every other architecture one for all tasks."""
    return arch == SINGLE_TASK


def networks(arch: str, tasks: Iterable[str]) -> list[str | None]:
    """The networks one model of ``arch`` consists of: each task's for STL, else one (``None``)."""
    return list(tasks) if per_task(arch) else [None]


def check_task_option(arch: str, task: str | None, dataset: str, verb: str = "trains") -> None:
    """``--task`` picks one STL network; a multi-task model has no per-task network to pick."""
    if task is not None and not per_task(arch):
        raise CtanError(
            None, f"--task is for --arch {SINGLE_TASK} only; {arch} {verb} all tasks of {dataset} together"
        )


def run_dir(root: Path, arch: str, seed: int, task: str | None = None) -> Path:
    """``root/<arch>/seed<seed>[/<task>]``: where one job's files live, kept inside ``root``."""
    return inside(root, arch, f"seed{seed}", *([task] if task else []))


def model_dir(settings: DatasetSettings, arch: str, seed: int, task: str | None = None) -> Path:
    return run_dir(settings.models_dir, arch, seed, task)


def model_files(settings: DatasetSettings, arch: str, seed: int, name: str = "model.pt") -> list[Path]:
    """One file (model.pt, history.json, ...) of every network of a model, in task order."""
    return [model_dir(settings, arch, seed, t) / name for t in networks(arch, settings.tasks)]


def results_dir(settings: DatasetSettings, arch: str, seed: int) -> Path:
    return run_dir(settings.results_dir, arch, seed)


def metrics_path(results_root: Path, arch: str, seed: int) -> Path:
    """The metrics.json of one evaluation under a dataset's (or external set's) results folder."""
    return run_dir(Path(results_root), arch, seed) / "metrics.json"


def choice_path(settings: DatasetSettings, arch: str, task: str | None = None) -> Path:
    """Where `ctan tune` writes its choice for one network (STL: per task)."""
    out = inside(settings.models_dir, arch, "tuning")
    return (inside(out, task) if task else out) / "choice.json"
