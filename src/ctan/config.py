"""Loading and validating params.yaml, and the per-dataset view every command works from."""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from ctan.errors import CtanError
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


def validate(params: dict[str, Any], source: str = "params") -> dict[str, Any]:
    """Validate against the schema; the error names the offending key path."""
    schema = yaml.safe_load(SCHEMA.read_text())
    try:
        jsonschema.validate(params, schema)
    except jsonschema.ValidationError as err:
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        raise CtanError(source, f"invalid parameter at {where}: {err.message}") from None
    for name in params["run"]["datasets"]:
        if name not in params["datasets"]:
            raise CtanError(source, f"run.datasets names {name!r}, which is not under datasets:")
    return params


def load_params(paths: list[str | Path] | None = None) -> dict[str, Any]:
    """Read and deep-merge parameter files in order (params.yaml first), then validate."""
    paths = [Path(p) for p in (paths or ["params.yaml"])]
    merged: dict[str, Any] = {}
    for path in paths:
        if not path.is_file():
            raise CtanError(path, "parameter file not found (run from the repository root or pass --params)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise CtanError(path, f"not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise CtanError(path, "expected a mapping at the top level")
        merged = deep_merge(merged, data)
    return validate(merged, source=", ".join(map(str, paths)))


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
    raw_dir: Path
    preprocessed_dir: Path
    models_dir: Path
    results_dir: Path

    @property
    def raw_section(self) -> dict[str, Any]:
        """Parameters that decide the raw data (download stage)."""
        return {"format": self.format, "source": self.source, "sha256": self.sha256, "demo": self.demo}

    @property
    def data_section(self) -> dict[str, Any]:
        """Parameters that decide the preprocessed stores."""
        return {**self.raw_section, "subdir": self.subdir, "split": self.split, "preprocess": self.preprocess}


def dataset_settings(params: dict[str, Any], name: str) -> DatasetSettings:
    check_name("dataset", name)
    if name not in params["datasets"]:
        known = ", ".join(sorted(params["datasets"]))
        raise CtanError(None, f"unknown dataset {name!r}; params define: {known}")
    ds = params["datasets"][name]
    paths = {"raw": "data/raw", "preprocessed": "data/preprocessed", "models": "models", "results": "results"}
    paths.update(params.get("paths", {}))
    return DatasetSettings(
        name=name,
        format=ds["format"],
        source=ds["source"],
        sha256=ds.get("sha256"),
        subdir=ds.get("subdir"),
        demo=dict(ds.get("demo", {})),
        tasks=tuple(ds["tasks"]),
        primary_metrics=dict(ds.get("primary_metrics", {})),
        split=dict(ds.get("split", {})),
        preprocess=dict(ds.get("preprocess", {})),
        training=deep_merge(params["training"], ds.get("training", {})),
        model=deep_merge(params["model"], ds.get("model", {})),
        tuning=deep_merge(params.get("tuning") or {}, ds.get("tuning", {})),
        raw_dir=inside(paths["raw"], name),
        preprocessed_dir=inside(paths["preprocessed"], name),
        models_dir=inside(paths["models"], name),
        results_dir=inside(paths["results"], name),
    )
