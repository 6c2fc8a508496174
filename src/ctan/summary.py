"""`ctan summarize`: results/summary.csv — every metric against STL, Δ_MTL, and the provenance of each row.

Rows:
- ``metric``: dataset × architecture × seed × task × metric, with the STL value of the same seed and the
  relative change in % (signed so that positive is better);
- ``delta_mtl``: dataset × architecture, Δ_MTL (Maninis et al. 2019) mean and std over seeds, each seed's
  Δ computed against the STL run of the same seed, on each task's primary metrics only (``in_delta``
  marks them among the metric rows; HD95 and the like are reported, not averaged in).
Every row carries the data hash (DVC's md5 of the preprocessed folder, as in dvc.lock), its content
hash, the source archive's SHA-256, the code version, the parameters
hash, the MLflow run id(s) and the model files' hashes, which `ctan audit` re-checks.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ctan.config import dataset_settings, params_hash
from ctan.errors import CtanError
from ctan.provenance import dvc_md5
from ctan.training.setup import primary_metrics, results_dir

COLUMNS = [
    "row_type",
    "dataset",
    "architecture",
    "seed",
    "task",
    "metric",
    "value",
    "std",
    "n_seeds",
    "higher_is_better",
    "stl_value",
    "relative_change_pct",
    "in_delta",
    "data_hash",
    "data_content_hash",
    "data_path",
    "source_sha256",
    "git_commit",
    "git_dirty",
    "params_hash",
    "hyperparameters",
    "mlflow_run_id",
    "model_sha256",
]


def summarize(params: dict[str, Any], output: Path) -> Path:
    from ctan.metrics.mtl import delta_mtl, relative_change

    run = params["run"]
    if "stl" not in run["architectures"]:
        raise CtanError(None, "run.architectures must include stl: every comparison is relative to it")
    rows: list[dict[str, Any]] = []
    for dataset in run["datasets"]:
        settings = dataset_settings(params, dataset)
        p_hash = params_hash(
            {"data": settings.data_section, "training": settings.training, "model": settings.model}
        )
        data_md5 = dvc_md5(settings.preprocessed_dir)
        primary = primary_metrics(settings)
        docs = {}
        for arch in run["architectures"]:
            for seed in run["seeds"]:
                path = results_dir(settings, arch, seed) / "metrics.json"
                if not path.is_file():
                    raise CtanError(
                        path, f"missing; run `ctan evaluate --dataset {dataset} --arch {arch} --seed {seed}`"
                    )
                docs[arch, seed] = json.loads(path.read_text())
        for arch in run["architectures"]:
            deltas = []
            for seed in run["seeds"]:
                doc, stl = docs[arch, seed], docs["stl", seed]
                prov = doc["provenance"]
                common = {
                    "dataset": dataset,
                    "architecture": arch,
                    "data_hash": data_md5,
                    "data_content_hash": prov["data_hash"],
                    "data_path": str(settings.preprocessed_dir),
                    "source_sha256": prov.get("source_sha256") or "",
                    "git_commit": prov["git_commit"],
                    "git_dirty": prov["git_dirty"],
                    "params_hash": p_hash,
                    "hyperparameters": hyperparameters_text(prov.get("tuning")),
                    "mlflow_run_id": ";".join(f"{k}={v}" for k, v in sorted(prov["mlflow_run_ids"].items())),
                    "model_sha256": ";".join(f"{k}={v}" for k, v in sorted(prov["model_sha256"].items())),
                }
                for task, metrics in doc["tasks"].items():
                    for metric, value in metrics.items():
                        hib = doc["higher_is_better"][task][metric]
                        ref = stl["tasks"][task][metric]
                        rows.append(
                            {
                                **common,
                                "row_type": "metric",
                                "seed": seed,
                                "task": task,
                                "metric": metric,
                                "value": value,
                                "n_seeds": 1,
                                "higher_is_better": hib,
                                "stl_value": ref,
                                "relative_change_pct": relative_change(value, ref, hib),
                                "in_delta": metric in primary.get(task, ()),
                            }
                        )
                deltas.append(delta_mtl(doc["tasks"], stl["tasks"], doc["higher_is_better"], primary))
                last_common = common
            finite = [d for d in deltas if math.isfinite(d)]
            rows.append(
                {
                    **last_common,
                    "row_type": "delta_mtl",
                    "seed": "all",
                    "task": "all",
                    "metric": "delta_mtl_pct",
                    "value": float(np.mean(finite)) if finite else float("nan"),
                    "std": float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0,
                    "n_seeds": len(finite),
                    "higher_is_better": True,
                    "mlflow_run_id": "",
                    "model_sha256": "",
                }
            )
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _fmt(row.get(c, "")) for c in COLUMNS})
    tmp.replace(output)
    return output


def hyperparameters_text(tuning: dict[str, Any] | None) -> str:
    """``lr=0.001`` (given) or ``all:lr=0.001@0.42`` (tuned: chosen value and its validation score)."""
    if not tuning:
        return ""
    if not tuning.get("tuned"):
        return ";".join(
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in tuning["values"].items()
        )
    parts = []
    for network, record in sorted((k, v) for k, v in tuning.items() if k != "tuned"):
        values = ",".join(f"{k}={v:g}" for k, v in record["chosen"].items())
        parts.append(f"{network}:{values}@{record['validation_score']:.3g}")
    return ";".join(parts)


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return value
