# Shared by every rule: the validated config, the parameter files the `ctan` CLI must read, paths,
# wildcard constraints, input functions, and the MLflow store created once before any job starts.
# Rules only ever call the `ctan` CLI; everything here decides *which* jobs run, never what they compute.
# Each job's log starts with `SLURM_JOB_ID=<id|none> host=<name>`: which cluster job made a result.

import os
import re
import shlex
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from ctan.models import ARCHITECTURES
from ctan.config import dataset_settings, external_sets
from ctan.layout import SINGLE_TASK, choice_path, model_files
from ctan.config import load_params
from ctan.provenance import stage_code as provenance_stage_code
from ctan.config import validate as validate_params


report: "../report/workflow.rst"


if workflow.config_settings.config:
    raise WorkflowError(
        "--config values cannot reach the ctan CLI, which reads parameter files: put the overrides in a "
        "YAML file and pass it with --configfile (docs/pipeline.md)."
    )


def parameter_files() -> list[str]:
    """The files Snakemake merged into `config`, in merge order (the Snakefile's `configfile:`, then each
    --configfile), relative to the working directory where possible so commands read the same in any clone."""
    given = [Path(p).resolve() for p in workflow.config_settings.configfiles]
    declared = [Path(p).resolve() for p in workflow.configfiles]
    ordered = [p for p in declared if p not in given] + given
    cwd = Path.cwd().resolve()
    return [str(p.relative_to(cwd)) if p.is_relative_to(cwd) else str(p) for p in ordered]


class ParamArgs:
    """`--params FILE ...` for every `ctan` call, so jobs see exactly the config Snakemake sees.

    Deliberately not a builtin type: Snakemake leaves such values out of its params rerun trigger.
    Which files hold the parameters is not itself a parameter; each rule's `params.settings` holds
    the values that job depends on, so switching or editing a file reruns only the affected jobs.
    """

    def __init__(self, files: list[str]):
        self.files = tuple(files)

    def __str__(self) -> str:
        return " ".join(f"--params {shlex.quote(f)}" for f in self.files)


# The parameter files as the `ctan` CLI reads them first: an error names the file that set the bad
# value, with the CLI's hints (a misspelt key's suggestion, YAML 1.1's `1e-3` read as text); then the
# merged config Snakemake holds: JSON Schema (names the offending key) and ctan's cross-checks.
load_params(parameter_files())
validate(config, "../schemas/params.schema.yaml")
validate_params(config, source="snakemake config")

PARAMS = ParamArgs(parameter_files())
PATHS = {"raw": "data/raw", "preprocessed": "data/preprocessed", "models": "models", "results": "results"}
PATHS.update(config["paths"])
RAW, PREPROCESSED, MODELS, RESULTS = (PATHS[k] for k in ("raw", "preprocessed", "models", "results"))
RUN = config["run"]
LOGS = "logs"
# External test sets ({training dataset: [external sets]}): evaluated whenever their training set runs.
EXTERNAL = {d: external_sets(config, d) for d in RUN["datasets"]}
EXTERNAL_NAMES = [e for d in config["datasets"] for e in external_sets(config, d)]
# Training datasets and external test sets, as wildcard patterns (one preprocess rule each).
TRAINING_RE = "|".join(re.escape(n) for n in config["datasets"] if n not in EXTERNAL_NAMES) or "(?!)"
EXTERNAL_RE = "|".join(re.escape(name) for name in EXTERNAL_NAMES) or "(?!)"

# Names become folder names: the schema admits only plain identifiers as dataset names (as the CLI
# does; ctan.workspace), and each wildcard matches exactly the configured names, so no `..` or `/`
# can reach a path. Seeds are non-negative integers.
wildcard_constraints:
    dataset="|".join(re.escape(name) for name in config["datasets"]),
    arch="|".join(ARCHITECTURES),
    seed=r"\d+",
    task="|".join(sorted({t for d in config["datasets"].values() for t in d.get("tasks", [])})),
    external=EXTERNAL_RE,


# Multi-task architectures train one model per job; STL trains one model per task.
MTL_ARCH = "|".join(a for a in ARCHITECTURES if a != SINGLE_TASK)


def has_dose(dataset: str) -> bool:
    """Whether a dataset predicts dose (its evaluation also draws the DVH figure)."""
    from ctan.datasets import get_reader

    s = settings(dataset)
    tasks = get_reader(s.format).TASKS
    return any(t in tasks and tasks[t].kind == "regression" for t in s.tasks)


def one_of(names: list[str]) -> str:
    """A wildcard constraint matching exactly these names (nothing at all when there are none)."""
    return "|".join(re.escape(n) for n in names) or "(?!)"

# Source code whose change changes a stage's results: ctan.provenance.STAGE_CODE (the same files as
# dvc.yaml's deps, and for train the files behind a checkpoint's and a tuning choice's code hash).
# Editing one reruns that stage, as `dvc repro` would.
PACKAGE = Path(workflow.basedir) / "src" / "ctan"


def stage_code(stage: str) -> list[str]:
    return [os.path.relpath(f) for f in provenance_stage_code(stage, PACKAGE)]


def settings(dataset: str):
    return dataset_settings(config, dataset)


def download_settings(wildcards) -> dict:
    return settings(wildcards.dataset).raw_section


def preprocess_settings(wildcards) -> dict:
    s = settings(wildcards.dataset)
    return {**s.data_section, "tasks": list(s.tasks)}


def train_settings(wildcards) -> dict:
    """What one training job depends on: its task(s) and the dataset's merged training/model settings."""
    s = settings(wildcards.dataset)
    tasks = [wildcards.task] if "task" in wildcards.keys() else list(s.tasks)
    return {"tasks": tasks, "training": s.training, "model": s.model}


def tune_settings(wildcards) -> dict:
    """What one tuning job depends on: its training settings and the grid."""
    return {**train_settings(wildcards), "tuning": settings(wildcards.dataset).tuning}


def tuning_choice(wildcards) -> list[str]:
    """The tuning choice a final training job applies; none where the grid has a single point."""
    from ctan.training.tuning import needs_tuning

    s = settings(wildcards.dataset)
    if not needs_tuning(s):
        return []
    arch = getattr(wildcards, "arch", SINGLE_TASK)  # train_stl has no arch wildcard
    return [str(choice_path(s, arch, getattr(wildcards, "task", None)))]


def evaluate_settings(wildcards) -> dict:
    s = settings(wildcards.dataset)
    return {"tasks": list(s.tasks), "primary_metrics": s.primary_metrics}


def training_raw(wildcards) -> list[str]:
    """An external test set is checked against its training dataset's download (structures, classes)."""
    return [f"{RAW}/{settings(wildcards.dataset).external_of}"]


def trained_models(wildcards) -> list[str]:
    """MTL: the one model; STL: one model per task of the dataset (ctan.layout)."""
    return [str(p) for p in model_files(settings(wildcards.dataset), wildcards.arch, int(wildcards.seed))]


def all_metrics() -> list[str]:
    """Every evaluation: each dataset's test split, and each of its external test sets."""
    internal = [
        f"{RESULTS}/{dataset}/{arch}/seed{seed}/metrics.json"
        for dataset in RUN["datasets"]
        for arch in RUN["architectures"]
        for seed in settings(dataset).seeds
    ]
    external = [
        f"{RESULTS}/{dataset}/external/{name}/{arch}/seed{seed}/metrics.json"
        for dataset, names in EXTERNAL.items()
        for name in names
        for arch in RUN["architectures"]
        for seed in settings(dataset).seeds
    ]
    return internal + external


def all_histories() -> list[str]:
    """Every training job's history.json (STL: one per task): the cost figures of `ctan compare`."""
    out = []
    for dataset in RUN["datasets"]:
        for arch in RUN["architectures"]:
            for seed in settings(dataset).seeds:
                out += [str(p) for p in model_files(settings(dataset), arch, seed, "history.json")]
    return out


onstart:
    # Parallel jobs racing to create a new SQLite MLflow store crash (shared/notes/pitfalls.md).
    Path(LOGS).mkdir(exist_ok=True)
    shell(f"ctan init-tracking {PARAMS} > {LOGS}/init-tracking.log 2>&1")
