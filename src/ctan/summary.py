"""`ctan summarize`: results/summary.csv — every metric against STL, Δ_MTL, and the provenance of each row.

Rows:
- ``metric``: dataset × architecture × seed × task × metric, with the STL value of the same seed and the
  relative change in % (signed so that positive is better);
- ``delta_mtl``: dataset × architecture, Δ_MTL (Maninis et al. 2019) mean and std over seeds, each seed's
  Δ computed against the STL run of the same seed, on each task's primary metrics only (``in_delta``
  marks them among the metric rows; HD95 and the like are reported, not averaged in).
External test sets (``external_of: <dataset>``) of every dataset in ``run.datasets`` get the same rows,
``dataset`` naming the external set and ``trained_on`` the dataset its models were trained on (for the
internal test split the two are the same), with the external set's own data hash and source SHA-256.
Every row carries the data hash (DVC's md5 of the preprocessed folder, as in dvc.lock), its content
hash, the raw folder and the source archive's SHA-256, the code version, the parameters
hash, the MLflow run id(s), the model files' hashes, and the SHA-256 of every metrics.json the row was
computed from (its own and STL's; for Δ_MTL every seed's). `ctan audit` re-checks all of them and
recomputes every row from those files with `dataset_rows`, the same code that wrote them.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from ctan.config import DatasetSettings, params_hash
from ctan.errors import CtanError
from ctan.outputs import staged
from ctan.provenance import dvc_md5, file_sha256
from ctan.results import evaluated_sets, read_metrics

COLUMNS = [
    "row_type",
    "dataset",
    "trained_on",
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
    "raw_path",
    "source_sha256",
    "git_commit",
    "git_dirty",
    "params_hash",
    "hyperparameters",
    "mlflow_run_id",
    "model_sha256",
    "results_path",
    "metrics_sha256",
]


def summarize(params: dict[str, Any], output: Path) -> Path:
    archs = list(params["run"]["architectures"])
    rows: list[dict[str, Any]] = []
    for settings, trained_on in evaluated_sets(params):
        where = {
            "data_hash": dvc_md5(settings.preprocessed_dir),
            "data_path": str(settings.preprocessed_dir),
            "raw_path": str(settings.raw_dir),
            "results_path": str(settings.results_dir),
            "params_hash": settings_hash(settings),
        }
        docs = read_metrics(settings, archs, trained_on)
        rows += dataset_rows(settings.name, archs, list(settings.seeds), docs, where)
    with staged(output) as (tmp,), open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(format_row(row))
    return output


def settings_hash(settings: DatasetSettings) -> str:
    """The ``params_hash`` of a test set's rows: its data, training and model settings."""
    return params_hash(
        {"data": settings.data_section, "training": settings.training, "model": settings.model}
    )


def dataset_rows(
    dataset: str,
    architectures: list[str],
    seeds: list[int],
    docs: dict[tuple[str, int], tuple[Path, dict[str, Any]]],
    where: dict[str, str],
) -> list[dict[str, Any]]:
    """One dataset's rows from its metrics.json documents ``{(arch, seed): (path, doc)}``.

    ``where`` holds what the documents do not: data_hash, data_path, raw_path, results_path, params_hash.
    """
    from ctan.metrics.mtl import delta_mtl, over_seeds, relative_change

    rows: list[dict[str, Any]] = []
    digests = {key: file_sha256(path) for key, (path, _) in docs.items()}

    def behind(*keys: tuple[str, int]) -> str:
        return ";".join(f"{docs[k][0]}={digests[k]}" for k in dict.fromkeys(keys))

    for arch in architectures:
        deltas = []
        for seed in seeds:
            doc, stl = docs[arch, seed][1], docs["stl", seed][1]
            prov = doc["provenance"]
            primary = primary_of(doc)
            common = {
                "dataset": dataset,
                "trained_on": doc.get("trained_on") or dataset,
                "architecture": arch,
                "data_hash": where["data_hash"],
                "data_content_hash": prov["data_hash"],
                "data_path": where["data_path"],
                "raw_path": where["raw_path"],
                "source_sha256": prov.get("source_sha256") or "",
                "git_commit": prov["git_commit"],
                "git_dirty": prov["git_dirty"],
                "params_hash": where["params_hash"],
                "hyperparameters": hyperparameters_text(prov.get("tuning")),
                "mlflow_run_id": ";".join(f"{k}={v}" for k, v in sorted(prov["mlflow_run_ids"].items())),
                "model_sha256": ";".join(f"{k}={v}" for k, v in sorted(prov["model_sha256"].items())),
                "results_path": where["results_path"],
                "metrics_sha256": behind((arch, seed), ("stl", seed)),
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
                            "in_delta": metric in primary[task],
                        }
                    )
            deltas.append(delta_mtl(doc["tasks"], stl["tasks"], doc["higher_is_better"], primary))
            last_common = common
        mean, std, n_seeds = over_seeds(deltas)
        rows.append(
            {
                **last_common,
                "row_type": "delta_mtl",
                "seed": "all",
                "task": "all",
                "metric": "delta_mtl_pct",
                "value": mean,
                "std": std if n_seeds else 0.0,
                "n_seeds": n_seeds,
                "higher_is_better": True,
                "mlflow_run_id": "",
                "model_sha256": "",
                "metrics_sha256": behind(*((a, seed) for seed in seeds for a in (arch, "stl"))),
            }
        )
    return rows


def primary_of(doc: dict[str, Any]) -> dict[str, list[str]]:
    """The metrics of each task that enter Δ_MTL, as `ctan evaluate` recorded them from the task records."""
    if "primary_metrics" not in doc:
        raise CtanError(
            None, "a metrics.json without primary_metrics predates them; run `ctan evaluate` again"
        )
    return doc["primary_metrics"]


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


def format_row(row: dict[str, Any]) -> dict[str, str]:
    """A row as summary.csv holds it: every column, numbers to 6 significant digits."""
    return {c: "" if row.get(c) is None else str(_fmt(row.get(c, ""))) for c in COLUMNS}


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return value
