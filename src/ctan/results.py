"""A run's results as `ctan summarize` and `ctan compare` read them: every test set evaluated (each
dataset's own test split and its external test sets) and one metrics.json per architecture and seed."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ctan.config import DatasetSettings, dataset_settings, external_sets
from ctan.errors import CtanError
from ctan.layout import SINGLE_TASK, metrics_path
from ctan.manifest import read_manifest

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
    file names the command that makes it. Each document is checked (`read_docs`), and must have been
    evaluated on the data now in the preprocessed folder."""
    for arch in archs:
        for seed in settings.seeds:
            path = metrics_path(settings.results_dir, arch, seed)
            if not path.is_file():
                raise CtanError(
                    path, f"missing; run `{evaluate_command(settings.name, trained_on, arch, seed)}`"
                )
    docs = read_docs(settings.results_dir, settings.name, trained_on, archs, list(settings.seeds))
    now = read_manifest(settings.preprocessed_dir)["data_hash"]
    for (arch, seed), (path, doc) in docs.items():
        if doc["provenance"]["data_hash"] != now:
            raise CtanError(
                path,
                f"evaluated on data {doc['provenance']['data_hash'][:12]}, but {settings.preprocessed_dir} "
                f"now holds {now[:12]}; run `{evaluate_command(settings.name, trained_on, arch, seed)}`",
            )
    return docs


def evaluate_command(dataset: str, trained_on: str | None, arch: str, seed: int) -> str:
    """The command that writes the metrics.json of ``arch`` and ``seed`` on test set ``dataset``."""
    on = f" --on {dataset}" if trained_on else ""
    return f"ctan evaluate --dataset {trained_on or dataset} --arch {arch} --seed {seed}{on}"


def read_docs(
    results_dir: Path, dataset: str, trained_on: str | None, archs: list[str], seeds: list[int]
) -> Docs:
    """The metrics.json of every architecture and seed of one test set, as summarize, compare and audit
    read them: each a well-formed document of the run its folder names (a file copied from another
    architecture, seed or dataset is refused), and all of them from one evaluation set-up (the same
    tasks, metrics, primary metrics and data)."""
    docs: Docs = {}
    for arch in archs:
        for seed in seeds:
            path = metrics_path(results_dir, arch, seed)
            fix = f"run `{evaluate_command(dataset, trained_on, arch, seed)}`"
            doc = load_metrics(path, fix)
            expected = {
                "dataset": dataset,
                "trained_on": trained_on or dataset,
                "architecture": arch,
                "seed": seed,
            }
            found = {k: doc[k] for k in expected}
            if found != expected:
                said = ", ".join(f"{k} {found[k]!r}" for k in expected if found[k] != expected[k])
                want = ", ".join(f"{k} {expected[k]!r}" for k in expected if found[k] != expected[k])
                raise CtanError(path, f"records {said} where its folder is for {want} (copied?); {fix}")
            docs[arch, seed] = path, doc
    _check_one_setup(docs)
    return docs


# What every metrics.json of one test set must share: the scoring set-up and the data scored.
_SETUP = {
    "tasks and metrics": lambda d: {t: sorted(m) for t, m in d["tasks"].items()},
    "primary metrics": lambda d: d["primary_metrics"],
    "higher_is_better": lambda d: d["higher_is_better"],
    "data content hash": lambda d: d["provenance"]["data_hash"],
}


def _check_one_setup(docs: Docs) -> None:
    if not docs:
        return
    (ref_path, ref), *rest = docs.values()
    for path, doc in rest:
        for what, get in _SETUP.items():
            if get(doc) != get(ref):
                raise CtanError(
                    path,
                    f"has {what} {_short(get(doc))}, but {ref_path} has {_short(get(ref))}: the results "
                    "of one test set must come from one evaluation; run `ctan evaluate` for both again",
                )


def _short(value: Any, limit: int = 80) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "..."


# NaN (a Dice or HD95 with both masks empty, a structure nobody contoured) and inf (HD95 with one mask
# empty) are written as these strings in metrics.json and comparison.json, as protobuf's JSON mapping
# does: bare NaN and Infinity are not JSON, and jq, R's jsonlite and browsers refuse a file that holds
# them. Reading decodes them in number fields only.
NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_NUMBER_SECTIONS = ("tasks", "details", "per_case")


def strict_json(document: dict[str, Any]) -> str:
    """``document`` as strict JSON text, non-finite numbers spelled as in `NON_FINITE`."""

    def strict(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strict(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [strict(v) for v in value]
        if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # a numpy scalar
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
        return value

    return json.dumps(strict(document), indent=1, allow_nan=False)


def json_numbers(value: Any) -> Any:
    """``value`` read from `strict_json`'s text, with the spelled non-finite values as floats again."""
    if isinstance(value, dict):
        return {k: json_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_numbers(v) for v in value]
    return NON_FINITE.get(value, value) if isinstance(value, str) else value


def load_metrics(path: Path, fix: str) -> dict[str, Any]:
    """A metrics.json as `ctan evaluate` writes it; a damaged or hand-edited one is an error naming the
    file and ``fix`` (a number that is a string or a boolean would otherwise enter the summary)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise CtanError(path, f"unreadable ({err.strerror}); {fix}") from None
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise CtanError(path, f"not a readable metrics.json ({type(err).__name__}); {fix}") from None
    if isinstance(doc, dict):  # files of ctan before 2026-12-04 hold bare NaN, which json reads too
        doc.update({k: json_numbers(doc[k]) for k in _NUMBER_SECTIONS if k in doc})
    problem = _form_problem(doc)
    if problem:
        raise CtanError(path, f"{problem}; {fix}")
    return doc


_FIELDS: dict[str, type | tuple[type, ...]] = {
    "dataset": str,
    "architecture": str,
    "seed": int,
    "tasks": dict,
    "higher_is_better": dict,
    "primary_metrics": dict,
    "provenance": dict,
}
_PROVENANCE = {
    "data_hash": str,
    "git_commit": str,
    "git_dirty": bool,
    "mlflow_run_ids": dict,
    "model_sha256": dict,
}


def _form_problem(doc: Any) -> str | None:
    """What makes ``doc`` not a metrics.json of this ctan, or None."""
    if not isinstance(doc, dict):
        return f"not a metrics.json (a JSON {type(doc).__name__}, not an object)"
    if "tasks" in doc and "primary_metrics" not in doc:
        return "has no primary_metrics (written by an older ctan)"
    for key, kind in _FIELDS.items():
        if key not in doc:
            return f"has no {key}"
        if not isinstance(doc[key], kind) or (kind is int and isinstance(doc[key], bool)):
            return f"{key} is not a {kind.__name__}"
    if not isinstance(doc.get("trained_on", doc["dataset"]), str):
        return "trained_on is not a str"
    doc.setdefault("trained_on", doc["dataset"])
    prov = doc["provenance"]
    for key, kind in _PROVENANCE.items():
        if not isinstance(prov.get(key), kind):
            return f"provenance.{key} is missing or not a {kind.__name__}"
    tasks, hib, primary = doc["tasks"], doc["higher_is_better"], doc["primary_metrics"]
    if not tasks:
        return "has no tasks"
    if set(hib) != set(tasks) or set(primary) != set(tasks):
        return f"higher_is_better and primary_metrics must cover the tasks {sorted(tasks)}"
    for task, metrics in tasks.items():
        if not isinstance(metrics, dict) or not metrics:
            return f"tasks.{task} is not a set of metrics"
        for metric, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return f"tasks.{task}.{metric} is not a number ({_short(repr(value), 40)})"
            if not isinstance(hib[task], dict) or not isinstance(hib[task].get(metric), bool):
                return f"higher_is_better.{task}.{metric} is missing or not true/false"
        chosen = primary[task]
        if not isinstance(chosen, list) or not chosen or any(m not in metrics for m in chosen):
            return f"primary_metrics.{task} must name some of its metrics ({', '.join(metrics)})"
    return None
