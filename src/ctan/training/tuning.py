"""`ctan tune`: hyperparameters chosen on the validation split, the same budget for every model.

Every architecture — and each STL network separately — trains once per point of the grid in
``tuning:`` (params.yaml; a dataset entry may override it) on the training split, and is scored on the
validation split only, at the epoch the usual selection rule keeps (`ctan.training.selection`). The
winner is the point that closes the largest mean share of each task's gap to a perfect score,
measured from the worst point of the grid; for one task that is simply its best validation metric.
The choice is written to ``models/<dataset>/<arch>/tuning[/<task>]/choice.json``; `ctan train`
applies it, and `ctan evaluate` copies it into metrics.json's provenance.

A grid with one value per key needs no tuning jobs: the value is used as given.

choice.json records what the choice depends on (``depends_on``: the grid, the tuning epochs and seed,
the other training settings and the model settings the tuning runs used, the task definitions, the
preprocessed data's ``data_hash`` and the training code's hash, `checkpoint.code_hash`: the files whose
edit reruns tuning in Snakemake and DVC, so that `ctan train` run by hand agrees with the engines);
`ctan train` refuses a choice made for anything else, and a damaged
one, with a one-line error naming the file and the `ctan tune` command that redoes it. A grid point
whose training diverges (the trainer's ``NonFiniteLoss``) is recorded as failed, ranked below every
trained point; the tuning fails only if every point diverges.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ctan.config import DatasetSettings, dataset_settings, params_hash
from ctan.errors import CtanError
from ctan.layout import check_task_option, choice_path, per_task
from ctan.training.selection import gap_closed, selection_metric, selection_metric_name

KEYS = ("lr",)  # training keys a grid may hold


def grid(settings: DatasetSettings) -> dict[str, list[Any]]:
    """``{training key: values}`` of the grid. A key with fewer than two values is not tuned: training
    uses its ``training:`` value, so that is the grid's one value (and what provenance records)."""
    out = {}
    for k in KEYS:
        values = list(settings.tuning.get(k) or [])
        out[k] = values if len(values) > 1 else [settings.training[k]]
    return out


def needs_tuning(settings: DatasetSettings) -> bool:
    return any(len(values) > 1 for values in grid(settings).values())


def tuned_values(
    settings: DatasetSettings, arch: str, task: str | None = None, same_code: bool = True
) -> dict[str, Any]:
    """The training values a job must use: the tuning choice where the grid has several points, else
    the ``training:`` values (the grid's one point).

    CtanError, naming choice.json and the `ctan tune` command to run, where the choice is missing,
    damaged, or was made for other settings or data than the current ones, or (``same_code``, for a
    training about to apply it) with other training code. Evaluation reads only which values a model was
    trained with, so a code edit since does not concern it."""
    if not needs_tuning(settings):
        return {k: values[0] for k, values in grid(settings).items()}
    path = choice_path(settings, arch, task)
    how = _tune_command(settings, arch, task)
    if not path.is_file():
        raise CtanError(path, f"missing: the tuning grid has several points; run `{how}` first")
    try:
        choice = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CtanError(path, f"unreadable tuning choice ({err}); run `{how}` again") from None
    if not isinstance(choice, dict):
        raise CtanError(path, f"not a tuning choice (not a JSON object); run `{how}` again")
    missing = [k for k in ("grid", "chosen", "chosen_score", "candidates") if k not in choice]
    if missing:
        raise CtanError(path, f"not a tuning choice (missing {', '.join(missing)}); run `{how}` again")
    if "depends_on" not in choice:
        raise CtanError(
            path,
            f"records nothing of the settings and data it was made for (an older ctan); run `{how}` again",
        )
    now = _depends_on(settings, arch, task)
    if not same_code:
        now.pop("training_code")
    changes = _changes(choice["depends_on"], now)
    if changes:
        what = "; ".join(changes)
        raise CtanError(path, f"stale: made for other settings or data ({what}); run `{how}` again")
    chosen = _check_chosen(path, choice, grid(settings), how)
    return chosen


def _tune_command(settings: DatasetSettings, arch: str, task: str | None) -> str:
    return f"ctan tune --dataset {settings.name} --arch {arch}" + (f" --task {task}" if task else "")


def _depends_on(settings: DatasetSettings, arch: str, task: str | None) -> dict[str, Any]:
    """What a tuning choice depends on: the grid and the tuning runs' settings, tasks, data and code.

    ``training``: the settings every tuning run used, but the tuned keys (the grid) and the epochs
    (``tuning.epochs``: each run's epochs, the training epochs where it is null). JSON-normalised, so
    that it compares equal to its copy read back from choice.json."""
    from ctan.manifest import read_manifest
    from ctan.training.checkpoint import code_hash  # torch: not for the Snakefile, which imports this module

    cfg = settings.tuning
    manifest = read_manifest(settings.preprocessed_dir)
    training = {k: v for k, v in settings.training.items() if k not in KEYS and k != "epochs"}
    document = {
        "dataset": settings.name,
        "architecture": arch,
        "task": task or "all",
        "tuning": {
            "grid": grid(settings),
            "epochs": int(cfg.get("epochs") or settings.training["epochs"]),
            "seed": int(cfg.get("seed", 0)),
        },
        "training": training,
        "model": settings.model,
        "tasks": [t.to_dict() for t in _tasks(settings, task, manifest)],
        "data_hash": manifest["data_hash"],
        "training_code": code_hash(),
    }
    return json.loads(json.dumps(document))


def _changes(recorded: Any, current: dict[str, Any]) -> list[str]:
    """What differs between the recorded ``depends_on`` and the current one, key by key."""
    if not isinstance(recorded, dict):
        return ["depends_on is not a JSON object"]
    out = []
    for key, now in current.items():
        was = recorded.get(key)
        if was == now:
            continue
        if key == "data_hash":
            out.append("the preprocessed data changed (data_hash)")
        elif key == "training_code":
            out.append(
                "the training code changed (ctan's training, models, loader or task code"
                + (", or it was made by an older ctan)" if was is None else ")")
            )
        elif key == "tasks":
            out.append("the task definitions changed")
        elif isinstance(now, dict) and isinstance(was, dict):
            for sub in sorted(set(now) | set(was)):
                if was.get(sub) != now.get(sub):
                    out.append(f"{key}.{sub}: {_short(was.get(sub))} -> {_short(now.get(sub))}")
        else:
            out.append(f"{key}: {_short(was)} -> {_short(now)}")
    return out


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_chosen(path: Path, choice: dict[str, Any], g: dict[str, list[Any]], how: str) -> dict[str, Any]:
    """The ``chosen`` point, checked: a point of the grid, and the trained candidate with the best score."""
    chosen = choice["chosen"]
    if not isinstance(chosen, dict) or set(chosen) != set(g):
        raise CtanError(path, f"damaged: chosen must hold exactly {', '.join(sorted(g))}; run `{how}` again")
    for key, value in chosen.items():
        if not _is_number(value) or value not in g[key]:
            raise CtanError(
                path,
                f"damaged: chosen {key}={_short(value)} is not a point of the grid {g[key]}; "
                f"run `{how}` again",
            )
    candidates = choice["candidates"]
    if not isinstance(candidates, list) or not all(
        isinstance(c, dict)
        and isinstance(c.get("point"), dict)
        and (c.get("score") is None or _is_number(c["score"]))
        for c in candidates
    ):
        raise CtanError(path, f"damaged: candidates are not a list of scored grid points; run `{how}` again")
    trained = [c for c in candidates if c.get("score") is not None and not c.get("failed")]
    if not trained or not _is_number(choice["chosen_score"]):
        raise CtanError(path, f"damaged: no trained candidate or no chosen_score; run `{how}` again")
    best = max(trained, key=lambda c: c["score"])  # first of equals, as `tune` picks
    if best["point"] != chosen or best["score"] != choice["chosen_score"]:
        raise CtanError(path, f"damaged: chosen is not the best-scoring candidate; run `{how}` again")
    return dict(chosen)


def _points(settings: DatasetSettings) -> list[dict[str, Any]]:
    g = grid(settings)
    points: list[dict[str, Any]] = [{}]
    for key, values in g.items():
        points = [{**p, key: v} for p in points for v in values]
    return points


def _point_name(point: dict[str, Any]) -> str:
    """A grid point's folder name: floats as their shortest exact form (0.001 stays ``lr0.001``), so two
    points never share a folder (6 significant digits made 0.0010000001 and 0.001 overwrite each other)."""
    return "_".join(f"{k}{v!r}" if isinstance(v, float) else f"{k}{v}" for k, v in point.items())


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
        depends_on = _depends_on(settings, arch, task)
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
                    "depends_on": depends_on,
                    "depends_on_hash": params_hash(depends_on),
                },
            )
        ]
    depends_on = _depends_on(settings, arch, task)  # before training: a missing manifest fails fast
    out.unlink(missing_ok=True)  # a tuning that fails leaves no choice behind, not the previous one
    candidates = []
    for point in _points(settings):
        overrides = {**point}
        if cfg.get("epochs"):
            overrides["epochs"] = int(cfg["epochs"])
        trial = copy.deepcopy(params)
        entry = trial["datasets"][dataset]
        entry["training"] = {**entry.get("training", {}), **overrides}
        folder = out.parent / _point_name(point)
        try:
            (model_folder,) = train(
                trial, dataset, arch, seed, task=task, device=device, out=folder, tuned=False
            )
        except CtanError as err:
            if not _diverged(err):
                raise
            print(f"tuning {folder}: diverged ({err.problem}); recorded as failed", file=sys.stderr)
            candidates.append(
                {
                    "point": point,
                    "failed": f"non-finite loss: {err.problem}",
                    "best_epoch": None,
                    "val_metrics": None,
                    "score": None,
                }
            )
            continue
        history = json.loads((model_folder / "history.json").read_text())
        kept = history["epochs"][history["best_epoch"] - 1]
        candidates.append(
            {"point": point, "best_epoch": history["best_epoch"], "val_metrics": kept["val_metrics"]}
        )

    trained = [c for c in candidates if not c.get("failed")]
    if not trained:
        raise CtanError(
            out,
            f"every point of the tuning grid diverged (non-finite loss; first: {candidates[0]['failed']}); "
            "try smaller values in tuning.lr",
        )
    tasks = _tasks(settings, task)
    for c in trained:
        shares = []
        for t in tasks:
            _, higher = selection_metric(t)
            # Every grid point is scored on the same validation split: the same metric for all.
            name = selection_metric_name(t, trained[0]["val_metrics"][t.name])
            values = [d["val_metrics"][t.name][name] for d in trained]
            worst = min(values) if higher else max(values)
            shares.append(gap_closed(c["val_metrics"][t.name][name], worst, higher))
        c["score"] = float(np.mean(shares))
    # First of equals: the grid's order decides ties. A diverged point (score None) ranks below all.
    best = max(trained, key=lambda c: c["score"])
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
        "from the grid's worst trained point; a diverged point (failed) ranks below every trained one; "
        "split: validation only",
        "depends_on": depends_on,
        "depends_on_hash": params_hash(depends_on),
    }
    return [_write(out, document)]


def _write(path: Path, document: dict[str, Any]) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(document, indent=1))
    tmp.replace(path)
    return path


def _tasks(settings: DatasetSettings, task: str | None, manifest: dict[str, Any] | None = None):
    from ctan.manifest import read_manifest
    from ctan.tasks import dataset_tasks

    if manifest is None:
        manifest = read_manifest(settings.preprocessed_dir)
    return dataset_tasks(settings, manifest, only=task)


def _diverged(err: BaseException) -> bool:
    """Whether a tuning run failed because its loss became non-finite (the trainer's NonFiniteLoss;
    imported here because the trainer imports this module)."""
    from ctan.training.trainer import NonFiniteLoss

    return isinstance(err, NonFiniteLoss)
