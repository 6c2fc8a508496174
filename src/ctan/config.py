"""Loading and validating params.yaml, and the per-dataset view every command works from."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import math
import re
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from ctan.errors import CtanError
from ctan.layout import SINGLE_TASK
from ctan.workspace import check_name, inside

SCHEMA = files("ctan") / "data" / "params.schema.yaml"


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge like Snakemake's --configfile: nested dicts merge, everything else replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit


def _validator(schema: dict[str, Any]) -> jsonschema.protocols.Validator:
    """The schema's validator, with "integer" meaning a whole number written as one: JSON Schema counts
    2.0 as an integer, which `range(epochs)` then refuses with a traceback."""
    base = jsonschema.validators.validator_for(schema)
    strict = base.TYPE_CHECKER.redefine(
        "integer", lambda _, v: isinstance(v, int) and not isinstance(v, bool)
    )
    return jsonschema.validators.extend(base, type_checker=strict)(schema)


def validate(params: dict[str, Any], source: str = "params") -> dict[str, Any]:
    """Validate against the schema, then what a schema cannot say; the error names the offending key."""
    schema = yaml.safe_load(SCHEMA.read_text())
    try:
        _validator(schema).validate(params)
    except jsonschema.ValidationError as err:
        where, problem = _explain(err)
        raise CtanError(source, f"invalid parameter at {where}: {problem}") from None
    for where, value in _leaves(params):
        if isinstance(value, float) and not math.isfinite(value):
            raise CtanError(source, f"invalid parameter at {where}: {value} is not a finite number")
        if where.split("/")[-1] in ("seed", "seeds") or "/seeds/" in where:
            if isinstance(value, int) and value > MAX_SEED:
                raise CtanError(source, f"invalid parameter at {where}: {value} exceeds {MAX_SEED}")
    for name, entry in params.get("datasets", {}).items():
        window = (entry.get("preprocess") or {}).get("ct_window")
        if window and window[0] >= window[1]:
            raise CtanError(
                source,
                f"invalid parameter at datasets/{name}/preprocess/ct_window: {window} is not [low, high] "
                "in HU with low < high",
            )
    _check_paths_apart(params.get("paths", {}), source)
    _check_paths_are_folders(params.get("paths", {}), source)
    # no torch: the registry imports an architecture when built
    from ctan.models import ARCHITECTURES, attention_heads_problem, uses_attention_heads

    unknown = [a for a in params["run"]["architectures"] if a not in ARCHITECTURES]
    if unknown:
        close = difflib.get_close_matches(unknown[0], ARCHITECTURES, n=1, cutoff=0.6)
        raise CtanError(
            source,
            f"invalid parameter at run/architectures: {', '.join(map(repr, unknown))} "
            f"(known: {', '.join(ARCHITECTURES)})" + (f"; did you mean {close[0]!r}?" if close else ""),
        )
    if SINGLE_TASK not in params["run"]["architectures"]:  # else found by `ctan summarize`, after training
        raise CtanError(
            source,
            f"invalid parameter at run/architectures: {params['run']['architectures']} has no "
            f"{SINGLE_TASK!r}: every comparison (Δ_MTL, summary.csv, ctan compare) is relative to "
            f"single-task learning; add {SINGLE_TASK} (one model alone trains with "
            "`ctan train --arch <name>`, whatever run.architectures holds)",
        )
    if any(uses_attention_heads(a) for a in params["run"]["architectures"]):
        for name in params["run"]["datasets"]:
            own = (params["datasets"].get(name) or {}).get("model") or {}
            model = deep_merge(params.get("model", {}), own)
            sizes = [model.get(k) for k in ("width", "depth", "attention_heads")]
            problem = None if None in sizes else attention_heads_problem(*sizes)
            if problem:
                key = "datasets/" + name + "/model" if own else "model"
                raise CtanError(source, f"invalid parameter at {key}: {problem}")
    for i, name in enumerate(params["run"]["datasets"]):
        if name not in params["datasets"]:
            raise CtanError(
                source,
                f"invalid parameter at run/datasets/{i}: {name!r} is not defined under datasets: "
                f"(defined: {', '.join(params['datasets'])}); fix the name or add its entry",
            )
        if params["datasets"][name].get("external_of"):
            raise CtanError(
                source,
                f"run.datasets names {name!r}, an external test set of "
                f"{params['datasets'][name]['external_of']!r}: it is never trained on; it is evaluated "
                "whenever its training dataset is in run.datasets",
            )
    for name, entry in params["datasets"].items():
        if entry.get("external_of"):
            check_external(params, name, source)
        else:
            _check_grid(params, name, source)
    return params


# Keys people write for ours (other tools' names); difflib finds plain misspellings.
_KEY_ALIASES = {
    "learning_rate": "lr",
    "lr_rate": "lr",
    "num_epochs": "epochs",
    "n_epochs": "epochs",
    "epoch": "epochs",
    "batchsize": "batch_size",
    "bs": "batch_size",
    "seed": "seeds",
    "dataset": "datasets",
    "architecture": "architectures",
    "arch": "architectures",
    "archs": "architectures",
    "optimiser": "optimizer",
}


def _explain(err: jsonschema.ValidationError) -> tuple[str, str]:
    """Where a schema error is (``a/b/c``) and what to do about it, in words a user acts on."""
    path = [str(p) for p in err.absolute_path]
    where = "/".join(path) or "(top level)"
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        known = list((err.schema.get("properties") or {}).keys())
        unknown = [k for k in err.instance if k not in known]
        if known and unknown:
            key = str(unknown[0])
            guess = _KEY_ALIASES.get(key.lower())
            if guess not in known:
                close = difflib.get_close_matches(key.lower(), known, n=1, cutoff=0.6)
                guess = close[0] if close else None
            hint = f"did you mean {guess!r}? " if guess else ""
            return "/".join([*path, key]), (
                f"unknown key {key!r} ({hint}the keys allowed here: {', '.join(known)})"
            )
    if err.validator == "type":
        wanted = err.validator_value if isinstance(err.validator_value, list) else [err.validator_value]
        value = err.instance
        if isinstance(value, str) and {"number", "integer"} & set(wanted):
            try:
                number = float(value)
            except ValueError:
                number = None
            if number is not None and math.isfinite(number):
                if "e" in value.lower():  # quoted or not: YAML 1.1 reads 1e-3 as text
                    why = "YAML 1.1 (PyYAML, Snakemake) reads a number like 1e-3, without a dot, as text"
                    if "number" in wanted:
                        fix = f"write {number!r} or {_yaml_float(value)}"
                    else:
                        fix = f"write {int(number)}" if number.is_integer() else "write a whole number"
                else:
                    fix = f"write {value.strip()} without quotes"
                    why = "quoted values are text"
                return where, f"{value!r} is text, not a number: {why}; {fix}"
        if "array" in wanted and not isinstance(value, (list, dict)):
            return where, f"{value!r} is not a list; write [{_yaml_scalar(value)}] for a list of one"
    return where, err.message


def _yaml_float(text: str) -> str:
    """``1e-3`` as YAML 1.1 reads it as a float: ``1.0e-3``."""
    mantissa, _, exponent = text.strip().lower().partition("e")
    if "." not in mantissa:
        mantissa += ".0"
    return f"{mantissa}e{exponent}"


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


def _section(params: dict[str, Any], name: str, section: str, key: str) -> tuple[Any, str]:
    """``key`` of ``section`` as dataset ``name`` sees it, and where it is set (for the error)."""
    own = (params["datasets"][name].get(section) or {}).get(key, _UNSET)
    if own is not _UNSET:
        return own, f"datasets/{name}/{section}/{key}"
    return (params.get(section) or {}).get(key), f"{section}/{key} (for {name})"


_UNSET = object()


def _check_grid(params: dict[str, Any], name: str, source: str) -> None:
    """A patch no larger than a fixed preprocess shape: said here, before hours of preprocessing, not
    as a training on padding (~40x slower). (Sizes need not be multiples of 2**depth: the model pads.)"""
    shape = (params["datasets"][name].get("preprocess") or {}).get("shape")
    if not shape:
        return  # the native grid: case sizes vary, and are known only once preprocessed
    patch, patch_key = _section(params, name, "training", "patch_size")
    if len(shape) == 3 and patch is not None:  # 3 sizes: the schema says so
        larger = [i for i, (p, n) in enumerate(zip(patch, shape, strict=True)) if p > n]
        if larger:
            raise CtanError(
                source,
                f"invalid parameter at {patch_key}: {patch} is larger than the preprocessed shape {shape} "
                f"on axis {', '.join(map(str, larger))}, so every patch would be mostly zero padding; "
                "choose a patch_size no larger than the shape, or null for the whole volume",
            )


def _leaves(value: Any, where: str = "") -> list[tuple[str, Any]]:
    """(key path, value) of every scalar in nested dicts and lists."""
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in _leaves(v, f"{where}/{k}" if where else str(k))]
    if isinstance(value, list):
        return [leaf for i, v in enumerate(value) for leaf in _leaves(v, f"{where}/{i}")]
    return [(where, value)]


def _check_paths_apart(paths: dict[str, str], source: str) -> None:
    """No folder of ``paths:`` inside another or the same: preprocess --force replaces its output
    folder and evaluate its results folder, so an overlap would delete the downloads or the models."""
    resolved = {key: Path(value).resolve() for key, value in paths.items()}
    for key, path in resolved.items():
        for other, there in resolved.items():
            if key != other and (path == there or path.is_relative_to(there)):
                how = "is the same folder as" if path == there else "lies inside"
                raise CtanError(
                    source,
                    f"invalid parameter at paths/{key}: {paths[key]} {how} paths/{other} ({paths[other]}); "
                    "each stage needs a folder of its own (one replaces its output folder when it reruns)",
                )


def _check_paths_are_folders(paths: dict[str, str], source: str) -> None:
    """Each folder of ``paths:`` is a folder, or can be made: not a file, nor under one (every stage
    would otherwise fail at its first write, after its work, with a NotADirectoryError)."""
    for key, value in paths.items():
        path = Path(value)
        for part in (path, *path.parents):
            if part.exists() and not part.is_dir():
                where = "is a file" if part == path else f"lies under {part}, which is a file"
                raise CtanError(
                    source,
                    f"invalid parameter at paths/{key}: {value} {where}, not a folder; move the file away "
                    f"or set paths.{key} to a folder (it is made where missing)",
                )


# Keys an external test set takes from its training dataset and may therefore not set itself.
FROM_TRAINING = ("preprocess", "split", "primary_metrics", "training", "model", "tuning", "seeds")


def check_external(params: dict[str, Any], name: str, source: str = "params") -> None:
    """An external test set names a known training dataset of the same format and tasks (or none)."""
    entry = params["datasets"][name]
    of = entry["external_of"]
    where = f"datasets.{name}.external_of"
    if of not in params["datasets"]:
        known = ", ".join(sorted(n for n, e in params["datasets"].items() if not e.get("external_of")))
        raise CtanError(source, f"{where} names {of!r}, which is not under datasets: ({known})")
    training = params["datasets"][of]
    if training.get("external_of"):
        raise CtanError(
            source, f"{where} names {of!r}, itself an external test set; name the dataset it was trained on"
        )
    if entry["format"] != training["format"]:
        raise CtanError(
            source,
            f"datasets.{name}.format is {entry['format']}, but its training dataset {of} is "
            f"{training['format']}: an external test set has the format its models were trained on",
        )
    if "tasks" in entry and list(entry["tasks"]) != list(training["tasks"]):
        raise CtanError(
            source,
            f"datasets.{name}.tasks {list(entry['tasks'])} differ from the tasks of its training dataset "
            f"{of} {list(training['tasks'])}: leave tasks out (they are taken from {of})",
        )
    own = [k for k in FROM_TRAINING if k in entry]
    if own:
        raise CtanError(
            source,
            f"datasets.{name} sets {', '.join(own)}, which an external test set takes from its training "
            f"dataset {of} (preprocessed with {of}'s plan, evaluated with its models): remove them",
        )


def external_sets(params: dict[str, Any], dataset: str) -> list[str]:
    """The external test sets of ``dataset``: every entry with ``external_of: <dataset>``, in order."""
    return [n for n, e in params["datasets"].items() if e.get("external_of") == dataset]


def load_params(paths: list[str | Path] | None = None) -> dict[str, Any]:
    """Read and deep-merge parameter files in order (params.yaml first), then validate."""
    paths = [Path(p) for p in (paths or ["params.yaml"])]
    merged: dict[str, Any] = {}
    loaded: list[tuple[Path, dict[str, Any]]] = []
    for path in paths:
        data = read_params_file(path)
        merged = deep_merge(merged, data)
        loaded.append((path, data))
    try:
        return validate(merged, source=", ".join(map(str, paths)))
    except CtanError as err:
        found = _INVALID_AT.match(err.problem)
        setter = _setting_file(loaded, found.group(1).split("/")) if found and len(loaded) > 1 else None
        if setter is None:
            raise
        raise CtanError(setter, err.problem) from None


def read_params_file(path: Path) -> dict[str, Any]:
    """One parameter file as a mapping; CtanError (naming the file, the line and the fix) for a file
    that is missing, a folder, not text, not YAML, empty, not a mapping, or repeats a key."""
    if path.is_dir():
        raise CtanError(path, "is a folder, not a parameter file; give a YAML file such as params.yaml")
    if not path.is_file():
        raise CtanError(path, "parameter file not found (run from the repository root or pass --params)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CtanError(
            path,
            f"not a text file (byte {err.object[err.start]:#04x} at offset {err.start} is not UTF-8); "
            "give a YAML parameter file",
        ) from None
    except OSError as err:
        raise CtanError(path, f"cannot read: {err.strerror or err}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise CtanError(path, f"not valid YAML: {_yaml_problem(err)}") from None
    if data is None:
        raise CtanError(
            path,
            "holds no parameters (empty, or only comments); give the file of parameters you meant, "
            "or leave this --params out",
        )
    if not isinstance(data, dict):
        raise CtanError(
            path,
            f"expected a mapping of parameters (key: value) at the top level, found a {type(data).__name__}",
        )
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping: PyYAML keeps the last silently, so a
    second `training:` block would replace the first without a word."""

    def construct_mapping(self, node, deep=False):  # noqa: ANN001 - PyYAML's signature
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`, resolved by SafeLoader
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} appears twice in one mapping (lines {first.line + 1} and "
                    f"{key_node.start_mark.line + 1}); YAML would keep only the second: merge them",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _UniqueKeyLoader.construct_mapping
)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error as ``line L, column C: problem (context)``, with the fix for tabs."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    context = getattr(err, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    text = f"{where}{problem}" + (f" ({context})" if context else "")
    if "'\\t'" in problem:
        text += "; YAML does not allow tabs for indentation: indent with spaces"
    return text


# One key's problem (a check across keys, "model/depth (for D)", names every file).
_INVALID_AT = re.compile(r"invalid parameter at ([^\s:]+):")


def _setting_file(loaded: list[tuple[Path, dict[str, Any]]], keys: list[str]) -> Path | None:
    """The file whose value of ``keys`` the merge kept: the last one setting the longest prefix of them
    (lists replace, so run/seeds/1 is set by whichever file last set run/seeds)."""
    for n in range(len(keys), 0, -1):
        setters = [path for path, data in loaded if _has(data, keys[:n])]
        if setters:
            return setters[-1]
    return None


def _has(data: Any, keys: list[str]) -> bool:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return False
        data = data[key]
    return True


def params_hash(section: Any) -> str:
    """Stable hash of a parameter section, for provenance."""
    blob = json.dumps(section, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class DatasetSettings:
    """Everything one dataset's commands need, with global training/model defaults merged in."""

    name: str
    format: str
    source: str
    sha256: str | None
    subdir: str | None
    demo: dict[str, Any]
    tasks: tuple[str, ...]
    primary_metrics: dict[str, list[str]]
    split: dict[str, Any]
    preprocess: dict[str, Any]
    training: dict[str, Any]
    model: dict[str, Any]
    tuning: dict[str, Any]
    seeds: tuple[int, ...]  # datasets.<name>.seeds, else run.seeds; an external set: its training set's
    raw_dir: Path
    preprocessed_dir: Path
    models_dir: Path
    results_dir: Path
    # External test set: the training dataset whose plan, tasks and models it uses (None: a training set).
    external_of: str | None = None

    def trainable(self) -> DatasetSettings:
        """Itself, unless it is an external test set, which training and tuning never read."""
        if self.external_of:
            raise CtanError(
                None,
                f"{self.name} is an external test set of {self.external_of}: it is never trained or tuned "
                f"on; train {self.external_of}, then evaluate with --dataset {self.external_of} "
                f"--on {self.name}",
            )
        return self

    @property
    def raw_section(self) -> dict[str, Any]:
        """Parameters that decide the raw data (download stage)."""
        return {"format": self.format, "source": self.source, "sha256": self.sha256, "demo": self.demo}

    @property
    def data_section(self) -> dict[str, Any]:
        """Parameters that decide the preprocessed stores."""
        section = {
            **self.raw_section,
            "subdir": self.subdir,
            "split": self.split,
            "preprocess": self.preprocess,
        }
        return {**section, "external_of": self.external_of} if self.external_of else section


def _digest(sha256: str | None) -> str | None:
    """A pinned SHA-256 as `ctan download --sha256` takes it too: either case, stored lower-case (the
    parameters hash must not change with the case the digest was pasted in)."""
    return sha256.lower() if isinstance(sha256, str) else sha256


def dataset_settings(params: dict[str, Any], name: str) -> DatasetSettings:
    check_name("dataset", name)
    if name not in params["datasets"]:
        known = ", ".join(sorted(params["datasets"]))
        close = difflib.get_close_matches(name, list(params["datasets"]), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise CtanError(None, f"unknown dataset {name!r}; params define: {known}{hint}")
    ds = params["datasets"][name]
    paths = {"raw": "data/raw", "preprocessed": "data/preprocessed", "models": "models", "results": "results"}
    paths.update(params.get("paths", {}))
    if ds.get("external_of"):
        # Everything but the data itself comes from the training dataset: tasks, its preprocessing plan,
        # the models evaluated (its models folder). Results go beside the training set's own.
        check_external(params, name)
        training = dataset_settings(params, ds["external_of"])
        return dataclasses.replace(
            training,
            name=name,
            source=ds["source"],
            sha256=_digest(ds.get("sha256")),
            subdir=ds.get("subdir"),
            demo=dict(ds.get("demo", {})),
            split={},
            raw_dir=inside(paths["raw"], name),
            preprocessed_dir=inside(paths["preprocessed"], name),
            results_dir=inside(paths["results"], training.name, "external", name),
            external_of=training.name,
        )
    return DatasetSettings(
        name=name,
        format=ds["format"],
        source=ds["source"],
        sha256=_digest(ds.get("sha256")),
        subdir=ds.get("subdir"),
        demo=dict(ds.get("demo", {})),
        tasks=tuple(ds["tasks"]),
        primary_metrics=dict(ds.get("primary_metrics", {})),
        split=dict(ds.get("split", {})),
        preprocess=dict(ds.get("preprocess", {})),
        training=deep_merge(params["training"], ds.get("training", {})),
        model=deep_merge(params["model"], ds.get("model", {})),
        tuning=deep_merge(params.get("tuning") or {}, ds.get("tuning", {})),
        seeds=tuple(ds.get("seeds") or (params.get("run") or {}).get("seeds") or (0,)),
        raw_dir=inside(paths["raw"], name),
        preprocessed_dir=inside(paths["preprocessed"], name),
        models_dir=inside(paths["models"], name),
        results_dir=inside(paths["results"], name),
    )
