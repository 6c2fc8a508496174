"""A run's results as `ctan summarize` and `ctan compare` read them: every test set evaluated (each
dataset's own test split and its external test sets) and one metrics.json per architecture and seed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ctan.config import DatasetSettings, dataset_settings, external_sets
from ctan.errors import CtanError
from ctan.layout import SINGLE_TASK, metrics_path

Docs = dict[tuple[str, int], tuple[Path, dict[str, Any]]]


def evaluated_sets(params: dict[str, Any]) -> list[tuple[DatasetSettings, str | None]]:
    """(settings, trained_on) of every test set of the run; ``trained_on`` is None for a dataset's own.

    Refuses a run without STL: every comparison is relative to it."""
    run = params["run"]
    if SINGLE_TASK not in run["architectures"]:
        raise CtanError(
            None, f"run.architectures must include {SINGLE_TASK}: every comparison is relative to it"
        )
    out: list[tuple[DatasetSettings, str | None]] = [
        (dataset_settings(params, d), None) for d in run["datasets"]
    ]
    out += [(dataset_settings(params, e), d) for d in run["datasets"] for e in external_sets(params, d)]
    return out


def read_metrics(settings: DatasetSettings, archs: list[str], trained_on: str | None = None) -> Docs:
    """{(arch, seed): (path, metrics.json)} for every architecture and the test set's seeds; a missing
    file names the command that makes it."""
    docs: Docs = {}
    for arch in archs:
        for seed in settings.seeds:
            path = metrics_path(settings.results_dir, arch, seed)
            if not path.is_file():
                on = f" --on {settings.name}" if trained_on else ""
                raise CtanError(
                    path,
                    f"missing; run `ctan evaluate --dataset {trained_on or settings.name} --arch {arch} "
                    f"--seed {seed}{on}`",
                )
            docs[arch, seed] = path, json.loads(path.read_text())
    return docs
