"""`ctan compare`: the architecture comparison with honest statistics, as a Markdown report with plots.

What a reader of a MTL paper wants and a summary CSV does not give:

- per task and metric, mean ± std over seeds for every architecture;
- Δ_MTL against STL with a 95 % confidence interval from a *paired bootstrap over test cases*: one
  resample of test-case indices is applied to every architecture and every seed at once (paired: the
  same cases for the model and its STL baseline), each seed's Δ_MTL is computed against the STL run of
  that seed and the seeds' Δ are averaged (seeds are never pooled as if they were cases). The interval
  is the percentile interval of that average over the resamples;
- the paper's figures beside ours;
- the same for each external test set (``external_of``) of a dataset, beside its internal test split:
  do the models, trained on one site's cases, keep their Δ_MTL on another's?
- training cost measured in the same runs (step time, the share of each training step spent waiting
  for data, peak memory) and where every number came from (data hash, code version, MLflow run ids).

Metrics are recomputed from the per-case values that `ctan evaluate` keeps in metrics.json, by the
same aggregation it uses (`aggregate`); with every case once this reproduces metrics.json exactly,
which a test checks. A resample on which a metric is undefined (an AUC whose resample holds one class)
gives no Δ; the number of resamples with a Δ is reported; a test set of one case gives no interval.
The bootstrap is written out rather than taken from `scipy.stats.bootstrap` because that one cannot
drop such undefined resamples.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ctan.errors import CtanError
from ctan.layout import model_dir, networks
from ctan.metrics.classification import mean_recall, rank_auc
from ctan.results import evaluated_sets, json_numbers, read_metrics, strict_json

# The paper's headline: relative improvement over STL averaged over tasks and its four datasets
# (Kim, Purdie & McIntosh 2023, abstract). Per-dataset figures are not public.
RESAMPLES = 2000  # bootstrap resamples where params.yaml's `comparison.resamples` is not given
PAPER_DELTA_MTL = {"ctan": 4.67, "hps": 3.22, "mtan": -5.38}


# --- metrics from per-case values ----------------------------------------------------------------


def aggregate(metric: str, rows: Sequence[Mapping[str, Any]]) -> float:
    """One test-set metric from per-case rows, aggregated exactly as `ctan evaluate` does."""
    from ctan.metrics import segmentation as seg

    if metric in ("dose_score", "dice", "hd95"):
        return seg.nanmean(float(r.get(metric, math.nan)) for r in rows)
    if metric == "dvh_score":
        # The challenge pools every (patient, ROI, metric) error: patients weigh by their DVH count.
        if all("dvh_count" in r for r in rows):
            counts = np.array([r["dvh_count"] for r in rows], dtype=np.float64)
            scores = np.array([r["dvh_score"] for r in rows], dtype=np.float64)
            keep = (counts > 0) & np.isfinite(scores)
            return float((scores[keep] * counts[keep]).sum() / counts[keep].sum()) if keep.any() else math.nan
        return seg.nanmean(float(r["dvh_score"]) for r in rows)
    if metric == "jaccard_thresholded":
        return seg.thresholded_mean(float(r["jaccard"]) for r in rows)
    labels = np.array([int(r["label"]) for r in rows])
    probs = np.array([r["probability"] for r in rows], dtype=np.float64)
    if metric == "balanced_accuracy":
        return mean_recall(labels, probs.argmax(1))
    if metric == "auc_macro":
        aucs = [rank_auc(labels == k, probs[:, k]) for k in range(probs.shape[1])]
        finite = [a for a in aucs if math.isfinite(a)]
        return float(np.mean(finite)) if finite else math.nan
    score = probs[:, 0] if probs.ndim == 2 else probs
    if metric == "auc":
        return rank_auc(labels == 1, score)
    if metric == "auc_covid_positive":
        covid = np.array([int(r["covid"]) for r in rows]) == 1
        return rank_auc(labels[covid] == 1, score[covid])
    raise CtanError(None, f"no per-case aggregation for metric {metric!r}")


# The bootstrap recomputes classification metrics a few hundred thousand times. scikit-learn's input
# validation costs about 5 ms a call, most of a real run; these give the same values (the
# Mann-Whitney identity, ties counted as half, is what ROC AUC is) in about 0.1 ms. Tests check them
# against scikit-learn and against every metrics.json of the demo run.


def scored_cases(doc: Mapping[str, Any], path: Path | str = "") -> list[str]:
    """The case ids every task of one metrics.json was scored on (they must be the same)."""
    per_case = doc.get("per_case") or {}
    sets = {task: set(rows) for task, rows in per_case.items()}
    if not sets or set(doc["tasks"]) - set(sets):
        raise CtanError(path, "no per-case values for every task; re-run `ctan evaluate`")
    first = next(iter(sets.values()))
    if any(s != first for s in sets.values()):
        raise CtanError(path, "tasks were scored on different test cases")
    return sorted(first)


def metrics_on(doc: Mapping[str, Any], cases: Sequence[str]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of one evaluation recomputed on ``cases`` (repeats allowed)."""
    out = {}
    for task, metrics in doc["tasks"].items():
        rows = [doc["per_case"][task][c] for c in cases]
        out[task] = {m: aggregate(m, rows) for m in metrics}
    return out


def check_per_case(path: Path | str, doc: Mapping[str, Any]) -> None:
    """The test-set metrics of a metrics.json must be what its per-case values give: the intervals are
    resampled from those, the point estimates read from the metrics, and an edit of either alone would
    put an estimate outside its own interval."""
    again = metrics_on(doc, scored_cases(doc, path))
    for task, metrics in doc["tasks"].items():
        for metric, value in metrics.items():
            given, computed = float(value), again[task][metric]
            same = (math.isnan(given) and math.isnan(computed)) or math.isclose(
                given, computed, rel_tol=1e-9, abs_tol=1e-12
            )
            if not same:
                raise CtanError(
                    path,
                    f"tasks.{task}.{metric} is {given:.6g}, but its per-case values give {computed:.6g} "
                    "(edited?); run `ctan evaluate` for it again",
                )


# --- the paired bootstrap --------------------------------------------------------------------------


def paired_bootstrap_delta(
    docs: Mapping[tuple[str, int], Mapping[str, Any]],
    arch: str,
    seeds: Sequence[int],
    resamples: int = RESAMPLES,
    confidence: float = 0.95,
    rng_seed: int = 0,
    cache: dict[tuple[str, int], list] | None = None,
    primary: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Δ_MTL of ``arch`` vs STL on the primary metrics: the point estimate (mean over seeds of each
    seed's Δ), the std over seeds, and two percentile intervals (see the module doc):

    - ``ci_low``/``ci_high``, hierarchical: each resample draws seeds with replacement *and* test cases
      with replacement, so the interval also covers seed-to-seed variation (what a rerun with new seeds
      would see);
    - ``cases_ci_low``/``cases_ci_high``: test cases only, seeds fixed (the previous report's interval).

    The resamples depend only on ``rng_seed``, the number of cases and the number of seeds, so every
    architecture sees the same ones (paired); ``draws`` holds the hierarchical resamples for paired
    differences between architectures (`paired_difference`). Pass one ``cache`` dict for all
    architectures to recompute STL's metrics only once."""
    from ctan.metrics.mtl import delta_mtl, over_seeds

    cases = scored_cases(docs["stl", seeds[0]])
    for seed in seeds:
        for key in (("stl", seed), (arch, seed)):
            other = scored_cases(docs[key])
            if other != cases:
                lacks = ", ".join(sorted(set(cases) - set(other))[:3]) or "none"
                extra = ", ".join(sorted(set(other) - set(cases))[:3]) or "none"
                raise CtanError(
                    None,
                    f"{key[0]} seed {key[1]} was scored on other test cases than STL seed {seeds[0]} "
                    f"(lacks {lacks}; has in addition {extra})",
                )
    directions = docs[arch, seeds[0]]["higher_is_better"]

    rng = np.random.default_rng(rng_seed)
    n = len(cases)
    draws = [[cases[i] for i in rng.integers(0, n, n)] for _ in range(resamples)]
    seed_picks = np.random.default_rng([rng_seed, 1]).integers(0, len(seeds), (resamples, len(seeds)))
    cache = {} if cache is None else cache

    def resampled(key: tuple[str, int]) -> list:
        if key not in cache or len(cache[key]) != resamples:
            cache[key] = [metrics_on(docs[key], chosen) for chosen in draws]
        return cache[key]

    # Undefined relative changes on resamples are expected (counted below), not news: one silence
    # for the whole loop rather than a logger round trip per Δ.
    with _quiet_metrics_log():
        if n > 1:
            per_draw = np.array(
                [
                    [
                        delta_mtl(m, s, directions, primary)
                        for m, s in zip(resampled((arch, seed)), resampled(("stl", seed)), strict=True)
                    ]
                    for seed in seeds
                ]
            )  # (seeds, resamples)
        else:
            # One test case resampled is that case every time: a zero-width interval (and a detectable
            # difference of 0) would claim a certainty that one case cannot give. No interval instead.
            per_draw = np.full((len(seeds), resamples), math.nan)
        per_seed = [
            delta_mtl(docs[arch, s]["tasks"], docs["stl", s]["tasks"], directions, primary) for s in seeds
        ]
    cases_only = per_draw.mean(axis=0)  # NaN where any seed's Δ is undefined on that resample
    hierarchical = np.take_along_axis(per_draw.T, seed_picks, axis=1).mean(axis=1)
    cases_low, cases_high = _interval(cases_only, confidence)
    low, high = _interval(hierarchical, confidence)
    finite = hierarchical[np.isfinite(hierarchical)]
    mean, std, defined = over_seeds(per_seed)  # as the summary has it
    return {
        "delta_mtl": mean,
        "std_over_seeds": std if defined else 0.0,
        "seeds_with_delta": defined,
        "per_seed": per_seed,
        "ci_low": low,
        "ci_high": high,
        "cases_ci_low": cases_low,
        "cases_ci_high": cases_high,
        "confidence": confidence,
        "resamples": resamples,
        "resamples_with_delta": int(finite.size),
        "test_cases": n,
        "seeds": len(seeds),
        "detectable_pct": detectable_difference(finite, confidence),
        "draws": hierarchical,
    }


def _interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if not finite.size:
        return math.nan, math.nan
    alpha = (1 - confidence) / 2
    return float(np.quantile(finite, alpha)), float(np.quantile(finite, 1 - alpha))


def detectable_difference(draws: np.ndarray, confidence: float = 0.95, power: float = 0.8) -> float:
    """The smallest true difference this design detects with ``power`` at ``confidence`` (two-sided):
    (z_{1-α/2} + z_power) × the bootstrap standard error."""
    from scipy.stats import norm

    if draws.size < 2:
        return math.nan
    z = norm.ppf(1 - (1 - confidence) / 2) + norm.ppf(power)
    return float(z * np.std(draws, ddof=1))


def paired_difference(
    a: Mapping[str, Any], b: Mapping[str, Any], confidence: float = 0.95
) -> dict[str, float]:
    """Δ_MTL(a) − Δ_MTL(b) with a hierarchical-bootstrap interval from the *same* resamples (paired)."""
    diff = np.asarray(a["draws"]) - np.asarray(b["draws"])
    low, high = _interval(diff, confidence)
    finite = diff[np.isfinite(diff)]
    return {
        "difference": a["delta_mtl"] - b["delta_mtl"],
        "ci_low": low,
        "ci_high": high,
        "detectable_pct": detectable_difference(finite, confidence),
        "resamples_with_difference": int(finite.size),
    }


@contextmanager
def _quiet_metrics_log():
    logger = logging.getLogger("ctan.metrics")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# --- training cost ---------------------------------------------------------------------------------


def training_cost(settings, arch: str, seed: int) -> dict[str, float]:
    """From the run's history.json file(s): STL's task models are added up, as STL needs all of them."""
    keys = networks(arch, settings.tasks)
    epochs, seconds, steps, waits, peaks = 0, 0.0, [], [], []
    for key in keys:
        path = model_dir(settings, arch, seed, key) / "history.json"
        # `ctan train` on a finished run rewrites history.json from its checkpoint.
        rebuild = f"`ctan train --dataset {settings.name} --arch {arch} --seed {seed}" + (
            f" --task {key}`" if key else "`"
        )
        if not path.is_file():
            raise CtanError(path, f"missing; run {rebuild}")
        records = _history_records(path, rebuild)
        epochs = max(epochs, len(records))
        seconds += sum(r["seconds"] for r in records)
        steps += [r["step_seconds"] for r in records if "step_seconds" in r]
        # Epoch 1 fills the in-memory case cache from Zarr; later epochs show the steady state.
        waits += [r["data_wait_fraction"] for r in records[1:] or records]
        peaks += [r["peak_memory_mib"] for r in records if "peak_memory_mib" in r]
    return {
        "epochs": epochs,
        "train_minutes": seconds / 60,
        "step_seconds": float(np.median(steps)) if steps else math.nan,
        "data_wait_pct": 100 * float(np.mean(waits)) if waits else math.nan,
        "peak_memory_mib": float(max(peaks)) if peaks else math.nan,
    }


HISTORY_NUMBERS = ("seconds", "data_wait_fraction")
"""What every epoch record of a history.json must give for the cost table (the rest is optional)."""


def _history_records(path: Path, rebuild: str) -> list[dict[str, Any]]:
    """The epoch records of one history.json, refused (naming the file and the command that rebuilds
    it) when damaged, rather than a traceback or a cost table computed from part of it."""
    try:
        history = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CtanError(path, f"not a readable training history ({err}); rebuild it: {rebuild}") from None
    records = history.get("epochs") if isinstance(history, dict) else None
    if not isinstance(records, list) or not records:
        raise CtanError(path, f"no epoch records in the training history; rebuild it: {rebuild}")
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise CtanError(path, f"epoch record {number} is not an object; rebuild it: {rebuild}")
        for name in (*HISTORY_NUMBERS, "step_seconds", "peak_memory_mib"):
            value = record.get(name)
            required = name in HISTORY_NUMBERS
            if (required or name in record) and (
                isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
            ):
                problem = "lacks" if name not in record else f"has a non-number {value!r} for"
                raise CtanError(path, f"epoch record {number} {problem} {name}; rebuild it: {rebuild}")
    return records


# --- the report ------------------------------------------------------------------------------------


def compare(params: dict[str, Any], out_dir: Path) -> Path:
    """Write comparison.json, comparison.md and the figures into ``out_dir``; return the Markdown path."""
    from ctan.provenance import dvc_md5
    from ctan.summary import hyperparameters_text, primary_of

    run = params["run"]
    cfg = params.get("comparison") or {}
    resamples = int(cfg.get("resamples", RESAMPLES))
    confidence = float(cfg.get("confidence", 0.95))
    rng_seed = int(cfg.get("seed", 0))
    report: dict[str, Any] = {
        "datasets": {},
        "external": {},
        "paper_delta_mtl": PAPER_DELTA_MTL,
    }
    # An external set: its own results folder, its training set's models and tasks.
    for settings, trained_on in evaluated_sets(params):
        dataset, seeds = settings.name, list(settings.seeds)  # datasets.<name>.seeds or run.seeds
        read = read_metrics(settings, run["architectures"], trained_on)
        for path, doc in read.values():
            check_per_case(path, doc)
        docs = {key: doc for key, (_, doc) in read.items()}
        entry: dict[str, Any] = {
            "seeds": seeds,
            "data_hash": dvc_md5(settings.preprocessed_dir),
            "source_sha256": docs["stl", seeds[0]]["provenance"].get("source_sha256"),
            "test_cases": len(scored_cases(docs["stl", seeds[0]])),
            "metrics": {},
            "delta_mtl": {},
            "cost": {},
            "provenance": {},
        }
        resample_cache: dict[tuple[str, int], list] = {}
        primary = primary_of(docs["stl", seeds[0]])
        entry["primary_metrics"] = {t: list(m) for t, m in primary.items()}
        for arch in run["architectures"]:
            values: dict[str, dict[str, list[float]]] = {}
            for seed in seeds:
                for task, metrics in docs[arch, seed]["tasks"].items():
                    for metric, value in metrics.items():
                        values.setdefault(task, {}).setdefault(metric, []).append(float(value))
            entry["metrics"][arch] = {
                task: {
                    m: {
                        "mean": float(np.mean(v)),
                        "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                        "higher_is_better": bool(docs[arch, seeds[0]]["higher_is_better"][task][m]),
                    }
                    for m, v in ms.items()
                }
                for task, ms in values.items()
            }
            if arch != "stl":
                entry["delta_mtl"][arch] = paired_bootstrap_delta(
                    docs, arch, seeds, resamples, confidence, rng_seed, cache=resample_cache, primary=primary
                )
            if not trained_on:  # an external set's models are the training set's: no second cost table
                costs = [training_cost(settings, arch, s) for s in seeds]
                entry["cost"][arch] = {k: float(np.mean([c[k] for c in costs])) for k in costs[0]}
            entry.setdefault("hyperparameters", {})[arch] = {
                str(s): hyperparameters_text(docs[arch, s]["provenance"].get("tuning")) for s in seeds
            }
            entry["provenance"][arch] = {
                str(s): {
                    "git_commit": docs[arch, s]["provenance"]["git_commit"],
                    "git_dirty": docs[arch, s]["provenance"]["git_dirty"],
                    "mlflow_run_ids": docs[arch, s]["provenance"]["mlflow_run_ids"],
                }
                for s in seeds
            }
        entry["machines"] = machines_of(docs.values())
        deltas = entry["delta_mtl"]
        entry["paired_differences"] = {
            f"{a} - {b}": paired_difference(deltas[a], deltas[b], confidence)
            for a in deltas
            if a.startswith("ctan")
            for b in deltas
            if b != a and not b.startswith("ctan")
        }
        for d in deltas.values():
            d.pop("draws")
        if trained_on:
            report["external"][dataset] = {"trained_on": trained_on, **entry}
        else:
            report["datasets"][dataset] = entry
    archs = [a for a in run["architectures"] if a != "stl"]
    report["mean_delta_mtl"] = {
        a: float(np.mean([report["datasets"][d]["delta_mtl"][a]["delta_mtl"] for d in run["datasets"]]))
        for a in archs
    }
    from ctan.outputs import staged
    from ctan.plots import comparison_cost_figure, comparison_delta_figure, write_figure

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CtanError(out_dir, "is a file; --output is the folder to write the report into")
    md = out_dir / "comparison.md"
    files = (out_dir / "comparison.json", out_dir / "delta_mtl_ci.png", out_dir / "training_cost.png", md)
    # All four or none: each is written under a temporary name and renamed once all are complete.
    with staged(*files) as (json_tmp, delta_tmp, cost_tmp, md_tmp):
        json_tmp.write_text(strict_json(report))
        write_figure(comparison_delta_figure(report, files[1]), delta_tmp, files[1])
        write_figure(comparison_cost_figure(report), cost_tmp, files[2])
        md_tmp.write_text(render_markdown(report))
    return md


def _pm(mean: float, std: float, digits: int = 3) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}g} ± {std:.2g}" if std else f"{mean:.{digits}g}"


def _signed(value: float) -> str:
    return f"{value:+.2f}" if math.isfinite(value) else "n/a"


def _ci(low: float, high: float) -> str:
    return f"[{low:+.2f}, {high:+.2f}]" if math.isfinite(low) else "n/a"


def _table_head(*columns: str) -> list[str]:
    """A Markdown table's header and rule; built together, the rule always has the header's width."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def machines_of(docs: Iterable[Mapping[str, Any]]) -> dict[str, list[str]]:
    """The distinct machines that trained and evaluated a test set's models, one line each (results
    are bit-for-bit reproducible only on the same kind of machine). Empty where none were recorded."""
    from ctan.provenance import machine_text

    out: dict[str, list[str]] = {"training": [], "evaluation": []}
    for doc in docs:
        recorded = doc.get("provenance", {}).get("machine") or {}
        for m in (recorded.get("training") or {}).values():
            out["training"].append(machine_text(m))
        if recorded.get("evaluation"):
            out["evaluation"].append(machine_text(recorded["evaluation"]))
    return {k: sorted(set(v)) for k, v in out.items() if v}


def best_of(means: dict[str, float], higher_is_better: bool) -> set[str]:
    """The architectures to print in bold: every one tied for the best finite mean (not just the first
    of them in table order), and none where all of them tie (nothing stands out). Also the HTML table's."""
    finite = {a: v for a, v in means.items() if math.isfinite(v)}
    if not finite:
        return set()
    top = (max if higher_is_better else min)(finite.values())
    best = {a for a, v in finite.items() if math.isclose(v, top, rel_tol=1e-12, abs_tol=0.0)}
    return set() if len(best) == len(means) > 1 else best


def read_report(path: Path) -> dict[str, Any]:
    """A comparison.json as `ctan compare` wrote it, its spelled NaN and Infinity numbers again."""
    return json_numbers(json.loads(Path(path).read_text(encoding="utf-8")))


def render_markdown(report: Mapping[str, Any]) -> str:
    lines = [
        "<!-- written by `ctan compare`; numbers recomputed from results/*/metrics.json -->",
        "Cells: mean ± std over seeds. Δ_MTL: % vs STL of the same "
        "seed on each task's primary metrics (marked *), positive is better; 95 % interval: hierarchical "
        "paired bootstrap (seeds and test cases resampled); the test-case-only interval beside it; "
        "detectable: the smallest true Δ this design finds with 80 % power.",
        "",
    ]
    paper = report["paper_delta_mtl"]
    external = report.get("external") or {}
    for dataset, entry in [*report["datasets"].items(), *external.items()]:
        archs = list(entry["metrics"])
        trained_on = entry.get("trained_on")
        lines += [
            f"### {dataset}"
            + (f" (external test set; models trained on {trained_on})" if trained_on else ""),
            "",
            f"Seeds {', '.join(map(str, entry['seeds']))}; "
            f"{entry['test_cases']} test cases; data hash (DVC md5) `{entry['data_hash']}`"
            + (f"; source SHA-256 `{entry['source_sha256']}`" if entry.get("source_sha256") else "")
            + ".",
            *(
                f"{stage.capitalize()} on: {'; '.join(names)}."
                for stage, names in (entry.get("machines") or {}).items()
            ),
            "",
            *_table_head("task", "metric", *archs),
        ]
        stl = entry["metrics"]["stl"]
        primary = entry.get("primary_metrics", {})
        for task, metrics in stl.items():
            for metric, cell in metrics.items():
                arrow = ("↑" if cell["higher_is_better"] else "↓") + (
                    " *" if metric in primary.get(task, ()) else ""
                )
                means = {a: entry["metrics"][a][task][metric]["mean"] for a in archs}
                best = best_of(means, cell["higher_is_better"])
                cells = []
                for a in archs:
                    c = entry["metrics"][a][task][metric]
                    text = _pm(c["mean"], c["std"])
                    cells.append(f"**{text}**" if a in best else text)
                lines.append(f"| {task} | {metric} {arrow} | " + " | ".join(cells) + " |")
        lines += [
            "",
            *_table_head(
                "architecture",
                "Δ_MTL (%)",
                "95 % CI (seeds + cases)",
                "CI (cases only)",
                "detectable",
                "per seed",
                "paper (4-dataset mean)",
            ),
        ]
        for arch, d in entry["delta_mtl"].items():
            ci = _ci(d["ci_low"], d["ci_high"])
            if math.isfinite(d["ci_low"]) and d["resamples_with_delta"] < d["resamples"]:
                ci += f" ({d['resamples_with_delta']}/{d['resamples']} resamples defined)"
            cases_ci = _ci(d.get("cases_ci_low", math.nan), d.get("cases_ci_high", math.nan))
            detectable = d.get("detectable_pct", math.nan)
            detectable_text = f"±{detectable:.2f}" if math.isfinite(detectable) else "n/a"
            seeds_text = ", ".join(_signed(v) for v in d["per_seed"])
            defined = d.get("seeds_with_delta", len(d["per_seed"]))
            spread = f" ± {d['std_over_seeds']:.2f}" if defined > 1 else ""
            if defined < len(d["per_seed"]):
                spread += f" ({defined} of {len(d['per_seed'])} seeds defined)"
            paper_text = f"{paper[arch]:+.2f}" if arch in paper else "—"
            lines.append(
                f"| {arch} | {_signed(d['delta_mtl'])}{spread} | {ci} | {cases_ci} | {detectable_text} | "
                f"{seeds_text} | {paper_text} |"
            )
        if entry.get("paired_differences"):
            lines += [
                "",
                *_table_head(
                    "paired difference", "Δ_MTL difference (%)", "95 % CI (seeds + cases)", "detectable"
                ),
            ]
            for name, d in entry["paired_differences"].items():
                detectable = d["detectable_pct"]
                detectable_text = f"±{detectable:.2f}" if math.isfinite(detectable) else "n/a"
                ci = _ci(d["ci_low"], d["ci_high"])
                lines.append(f"| {name} | {_signed(d['difference'])} | {ci} | {detectable_text} |")
        if entry["cost"]:  # an external test set's models are its training set's: no cost of its own
            lines += [
                "",
                *_table_head(
                    "architecture",
                    "epochs",
                    "training (min, all seeds' mean)",
                    "step (s, median)",
                    "data wait (%)",
                    "peak memory (MiB)",
                ),
            ]
        for arch, c in entry["cost"].items():
            lines.append(
                f"| {arch} | {c['epochs']:.0f} | {c['train_minutes']:.1f} | {c['step_seconds']:.3f} | "
                f"{c['data_wait_pct']:.1f} | {c['peak_memory_mib']:.0f} |"
            )
        if entry.get("hyperparameters"):
            lines += [
                "",
                *_table_head("architecture", "hyperparameters (per network; tuned: @ validation score)"),
            ]
            for arch, by_seed in entry["hyperparameters"].items():
                lines.append(f"| {arch} | {'; '.join(sorted(set(by_seed.values()))) or '—'} |")
        lines += ["", "<details><summary>MLflow run ids and code versions</summary>", ""]
        lines += _table_head("architecture", "seed", "git commit", "MLflow run id(s)")
        for arch, by_seed in entry["provenance"].items():
            for seed, p in by_seed.items():
                runs = ", ".join(f"{k}: `{v}`" for k, v in sorted(p["mlflow_run_ids"].items()))
                dirty = " (dirty)" if p["git_dirty"] else ""
                lines.append(f"| {arch} | {seed} | `{p['git_commit'][:10]}`{dirty} | {runs} |")
        lines += ["", "</details>", ""]
    if external:
        lines += [
            "### Internal and external test sets",
            "",
            "Δ_MTL (%) of the same models on their training dataset's test split and on each external test "
            "set, with the 95 % interval (seeds + cases).",
            "",
            *_table_head("trained on", "tested on", "cases", *report["mean_delta_mtl"]),
        ]
        for dataset, entry in report["datasets"].items():
            tested = [(dataset + " (internal)", entry)] + [
                (f"{name} (external)", e) for name, e in external.items() if e["trained_on"] == dataset
            ]
            for name, e in tested:
                cells = [
                    f"{_signed(d['delta_mtl'])} {_ci(d['ci_low'], d['ci_high'])}"
                    for d in (e["delta_mtl"][a] for a in report["mean_delta_mtl"])
                ]
                lines.append(f"| {dataset} | {name} | {e['test_cases']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["### Mean over datasets", "", *_table_head("architecture", "Δ_MTL (%) here", "paper")]
    for arch, value in report["mean_delta_mtl"].items():
        paper_text = f"{paper[arch]:+.2f}" if arch in paper else "—"
        lines.append(f"| {arch} | {_signed(value)} | {paper_text} |")
    lines.append("")
    return "\n".join(lines)
