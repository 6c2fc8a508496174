"""Figures and tables for the Snakemake report and the docs: learning curves, example predictions,
Δ_MTL per dataset and architecture, and the per-task metric table.

Each function reads plain data and writes one file. Figures are built on `matplotlib.figure.Figure`
(Agg canvas) rather than pyplot, so no global state leaks between calls or into parallel jobs.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ctan.errors import CtanError
from ctan.tasks import Task

ARCH_COLOURS = {
    "stl": "#7f7f7f",
    "hps": "#1f77b4",
    "mtan": "#ff7f0e",
    "ctan": "#2ca02c",
    "ctan_no_ctae": "#98df8a",
    "ctan_no_ctab": "#17becf",
}
# Distinct line colours (matplotlib's tab10, then tab20's lighter shades): OpenKBP has 10 structures.
CONTOUR_COLOURS = [to_hex(c) for c in (*colormaps["tab10"].colors, *colormaps["tab20"].colors[1::2])]


def _save(fig: Figure, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    return out


# --- learning curves ---------------------------------------------------------------------------------


def plot_learning_curves(history: Mapping[str, Any], out: Path) -> Path:
    """Loss (total and per task, train solid / validation dashed) and validation metrics per epoch.

    `history` is the trainer's history.json: {"epochs": [{"epoch", "train_loss": {"total", task...},
    "val_loss": {...}, "val_metrics": {task: {metric: value}}}], "best_epoch": n}.
    """
    records = list(history.get("epochs", []))
    if not records:
        raise CtanError(out, "no epochs in the training history to plot")
    epochs = [r["epoch"] for r in records]
    metric_keys = sorted(
        {(task, m) for r in records for task, ms in (r.get("val_metrics") or {}).items() for m in ms}
    )
    fig = Figure(figsize=(11 if metric_keys else 6, 4), layout="constrained")
    axes = fig.subplots(1, 2 if metric_keys else 1, squeeze=False)[0]

    ax = axes[0]
    names = list(records[0].get("train_loss", {}))
    positive = True
    for i, name in enumerate(names):
        colour = "black" if name == "total" else CONTOUR_COLOURS[i % len(CONTOUR_COLOURS)]
        width = 2.0 if name == "total" else 1.0
        for split, style in (("train_loss", "-"), ("val_loss", "--")):
            values = [_finite(r.get(split, {}).get(name)) for r in records]
            positive &= all(v > 0 for v in values if not math.isnan(v))
            label = f"{name} ({'train' if split == 'train_loss' else 'validation'})"
            ax.plot(epochs, values, style, color=colour, linewidth=width, label=label)
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("loss")
    ax.legend(fontsize="x-small", ncol=2)

    if metric_keys:
        ax = axes[1]
        for i, (task, metric) in enumerate(metric_keys):
            values = [_finite((r.get("val_metrics") or {}).get(task, {}).get(metric)) for r in records]
            ax.plot(epochs, values, "-o", markersize=3, color=CONTOUR_COLOURS[i % len(CONTOUR_COLOURS)])
            ax.lines[-1].set_label(f"{task}: {metric}")
        ax.set_xlabel("epoch")
        ax.set_title("validation metrics")
        ax.legend(fontsize="x-small")

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    best = history.get("best_epoch")
    if best:
        for ax in axes:
            ax.axvline(best, color="grey", linestyle=":", linewidth=1)
        axes[0].text(
            best, 1.0, f" best {best}", transform=axes[0].get_xaxis_transform(), va="top", fontsize=8
        )
    return _save(fig, out)


def _finite(value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return float("nan")
    return value if math.isfinite(value) else float("nan")


# --- example predictions -----------------------------------------------------------------------------


def plot_examples(
    image: np.ndarray,
    targets: Mapping[str, Any],
    predictions: Mapping[str, Any],
    tasks: Sequence[Task],
    out: Path,
) -> Path:
    """One test case: the image with every task's reference and prediction.

    image (C, *spatial), normalised; 3D shows the middle axial slice. Dose: colour wash over CT, reference
    and prediction on one scale. Segmentation: reference contours solid, predicted (probability > 0.5)
    dashed. Image-level tasks: predicted vs true class in the title.
    """
    image = np.asarray(image, dtype=np.float32)
    spatial_dims = image.ndim - 1
    if spatial_dims not in (2, 3):
        raise CtanError(
            out, f"expected an image of shape (C, *spatial) with 2 or 3 spatial axes, got {image.shape}"
        )
    z = image.shape[1] // 2 if spatial_dims == 3 else None

    def plane(array: Any) -> np.ndarray:
        """(C, *spatial) -> (C, H, W) in the displayed plane."""
        array = np.asarray(array, dtype=np.float32)
        return array[:, z] if z is not None else array

    background = _display_image(plane(image))
    dense = [t for t in tasks if t.dense]
    panels = 1 + sum(2 if t.kind == "regression" else 1 for t in dense)
    fig = Figure(figsize=(3.2 * panels, 3.6), layout="constrained")
    axes = list(fig.subplots(1, panels, squeeze=False)[0])
    for ax in axes:
        ax.imshow(background, cmap="gray" if background.ndim == 2 else None)
        ax.set_axis_off()
    where = f" (slice z={z})" if z is not None else ""
    axes[0].set_title("image" + where, fontsize=9)

    k = 1
    for task in dense:
        ref, pred = plane(targets[task.name]), plane(predictions[task.name])
        if task.kind == "regression":
            top = float(max(np.nanmax(ref), np.nanmax(pred), 1e-6))
            for ax, data, what in ((axes[k], ref, "reference"), (axes[k + 1], pred, "predicted")):
                wash = np.ma.masked_less_equal(data[0], 0.02 * top)
                shown = ax.imshow(wash, cmap="jet", alpha=0.5, vmin=0, vmax=top)
                ax.set_title(f"{task.name}: {what}", fontsize=9)
            fig.colorbar(shown, ax=axes[k : k + 2], shrink=0.8, label="Gy" if task.target == "dose" else "")
            k += 2
        else:
            ax = axes[k]
            names = task.class_names or (
                (task.name,) if ref.shape[0] == 1 else tuple(f"{task.name} {c}" for c in range(ref.shape[0]))
            )
            handles = []
            for c in range(ref.shape[0]):
                colour = CONTOUR_COLOURS[c % len(CONTOUR_COLOURS)]
                drawn = _contour(ax, ref[c], colour, "solid")
                drawn |= _contour(ax, (pred[c] > 0.5).astype(np.float32), colour, "dashed")
                if drawn:
                    handles.append((colour, names[c] if c < len(names) else str(c)))
            for colour, name in handles:
                ax.plot([], [], color=colour, label=name)
            if handles:
                ax.legend(fontsize="xx-small", loc="lower right")
            ax.set_title(f"{task.name}: reference solid, predicted dashed", fontsize=9)
            k += 1

    lines = [_label_line(t, targets.get(t.name), predictions.get(t.name)) for t in tasks if not t.dense]
    if lines:
        fig.suptitle("\n".join(lines), fontsize=10)
    return _save(fig, out)


def _display_image(image: np.ndarray) -> np.ndarray:
    """(C, H, W) -> grey (H, W) or RGB (H, W, 3) scaled to [0, 1] for display."""
    shown = image[0] if image.shape[0] != 3 else np.moveaxis(image, 0, -1)
    lo, hi = float(np.nanmin(shown)), float(np.nanmax(shown))
    return np.clip((shown - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(shown)


def _contour(ax, mask: np.ndarray, colour: str, style: str) -> bool:
    """Draw the 0.5 iso-line of a mask; False when the mask is empty or full in this plane."""
    if not (float(mask.min()) < 0.5 < float(mask.max())):
        return False
    ax.contour(mask, levels=[0.5], colors=[colour], linestyles=style, linewidths=1.2)
    return True


def _label_line(task: Task, target: Any, prediction: Any) -> str:
    probs = np.asarray(prediction, dtype=np.float64).ravel()
    if probs.size == 1:  # binary: probability of class 1
        predicted, confidence = int(probs[0] >= 0.5), float(probs[0] if probs[0] >= 0.5 else 1 - probs[0])
    else:
        predicted, confidence = int(np.argmax(probs)), float(np.max(probs))
    names = task.class_names or ()

    def name(index: int) -> str:
        return names[index] if 0 <= index < len(names) else str(index)

    truth = "?" if target is None else name(int(np.asarray(target).ravel()[0]))
    return f"{task.name}: predicted {name(predicted)} (p={confidence:.2f}), true {truth}"


# --- summary -----------------------------------------------------------------------------------------


def _read_summary(summary_csv: Path):
    import pandas as pd

    path = Path(summary_csv)
    if not path.is_file():
        raise CtanError(path, "summary not found; run `ctan summarize` first")
    table = pd.read_csv(path)
    missing = {"row_type", "dataset", "architecture", "value"} - set(table.columns)
    if missing:
        raise CtanError(path, f"not a ctan summary: missing columns {', '.join(sorted(missing))}")
    return table


def plot_delta_mtl(summary_csv: Path, out: Path) -> Path:
    """Grouped bars: Δ_MTL (% vs STL, positive is better) per dataset and architecture, std error bars."""
    table = _read_summary(summary_csv)
    rows = table[(table["row_type"] == "delta_mtl") & (table["architecture"] != "stl")]
    if rows.empty:
        raise CtanError(summary_csv, "no Δ_MTL rows for any multi-task architecture")
    datasets = list(dict.fromkeys(rows["dataset"]))
    archs = list(dict.fromkeys(rows["architecture"]))
    width = 0.8 / len(archs)
    fig = Figure(figsize=(max(5.0, 1.2 + 0.45 * len(archs) * len(datasets)), 4), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(datasets))
    for i, arch in enumerate(archs):
        sel = rows[rows["architecture"] == arch].set_index("dataset")
        values = [float(sel["value"].get(d, np.nan)) for d in datasets]
        stds = [float(sel["std"].get(d, 0.0)) if "std" in sel else 0.0 for d in datasets]
        stds = [0.0 if math.isnan(s) else s for s in stds]
        ax.bar(
            x + (i - (len(archs) - 1) / 2) * width,
            values,
            width,
            yerr=stds,
            capsize=3,
            label=arch,
            color=ARCH_COLOURS.get(arch),
        )
        for xi, value in zip(x + (i - (len(archs) - 1) / 2) * width, values, strict=True):
            if math.isnan(value):  # no Δ_MTL (a metric was undefined): say so rather than draw nothing
                ax.text(xi, 0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, datasets, rotation=20, ha="right")
    ax.set_ylabel("Δ_MTL vs STL (%)")
    ax.set_title("Multi-task gain over single-task learning (mean ± std over seeds)")
    ax.legend(fontsize="small")
    return _save(fig, out)


def write_metric_table(summary_csv: Path, out: Path) -> Path:
    """HTML table: rows dataset / task / metric, columns architecture, cells mean ± std over seeds; the
    best architecture per row in bold."""
    table = _read_summary(summary_csv)
    rows = table[table["row_type"] == "metric"]
    if rows.empty:
        raise CtanError(summary_csv, "no per-task metric rows")
    archs = list(dict.fromkeys(rows["architecture"]))
    grouped = rows.groupby(["dataset", "task", "metric", "architecture"], sort=False)["value"]
    stats = grouped.agg(["mean", "std", "count"])
    higher = rows.groupby(["dataset", "task", "metric"], sort=False)["higher_is_better"].first()
    body = []
    for (dataset, task, metric), hib in higher.items():
        hib = str(hib).lower() == "true"
        cells = {
            a: stats.loc[(dataset, task, metric, a)]
            for a in archs
            if (dataset, task, metric, a) in stats.index
        }
        means = {a: c["mean"] for a, c in cells.items() if math.isfinite(c["mean"])}
        best = (max if hib else min)(means, key=means.get) if means else None
        tds = []
        for arch in archs:
            if arch not in cells:
                tds.append("<td></td>")
                continue
            c = cells[arch]
            text = f"{c['mean']:.4g}" + (
                f" ± {c['std']:.2g}" if c["count"] > 1 and math.isfinite(c["std"]) else ""
            )
            tds.append(f"<td><b>{text}</b></td>" if arch == best else f"<td>{text}</td>")
        arrow = "↑" if hib else "↓"
        head = "".join(f"<td>{html.escape(str(v))}</td>" for v in (dataset, task, f"{metric} {arrow}"))
        body.append(f"<tr>{head}{''.join(tds)}</tr>")
    header = "".join(f"<th>{html.escape(h)}</th>" for h in ["dataset", "task", "metric", *archs])
    document = (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>ctan: per-task metrics</title>\n'
        "<style>body{font-family:sans-serif;font-size:13px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "td:nth-child(-n+3),th:nth-child(-n+3){text-align:left}th{background:#eee}</style></head><body>\n"
        "<p>Test-split metrics, mean ± std over seeds; best architecture per row in bold "
        "(↑ higher is better, ↓ lower is better).</p>\n"
        f"<table><thead><tr>{header}</tr></thead><tbody>\n"
        + "\n".join(body)
        + "\n</tbody></table>\n</body></html>\n"
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(document, encoding="utf-8")
    return out


# --- the architecture comparison (ctan compare) ----------------------------------------------------


def _whisker(length: float) -> float:
    """Error-bar length: none where the interval is undefined (and never negative)."""
    return max(0.0, length) if math.isfinite(length) else 0.0


def plot_comparison_delta(report: Mapping[str, Any], out: Path) -> Path:
    """Δ_MTL per dataset and architecture with the paired-bootstrap confidence interval as whiskers; a
    last group gives the mean over datasets beside the paper's (black diamonds)."""
    datasets = list(report["datasets"])
    archs = list(report["mean_delta_mtl"])
    if not archs:
        raise CtanError(out, "no multi-task architecture to compare with STL")
    groups = [*datasets, "mean over datasets"]
    width = 0.8 / len(archs)
    fig = Figure(figsize=(max(5.5, 1.5 + 0.5 * len(archs) * len(groups)), 4.2), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(groups))
    for i, arch in enumerate(archs):
        xs = x + (i - (len(archs) - 1) / 2) * width
        values, low, high = [], [], []
        for d in datasets:
            entry = report["datasets"][d]["delta_mtl"][arch]
            values.append(entry["delta_mtl"])
            low.append(_whisker(entry["delta_mtl"] - entry["ci_low"]))
            high.append(_whisker(entry["ci_high"] - entry["delta_mtl"]))
        values.append(report["mean_delta_mtl"][arch])
        low.append(0.0)
        high.append(0.0)
        ax.bar(xs, values, width, yerr=[low, high], capsize=3, label=arch, color=ARCH_COLOURS.get(arch))
        paper = report.get("paper_delta_mtl", {}).get(arch)
        if paper is not None:
            ax.plot(xs[-1], paper, "D", color="black", markersize=5)
    ax.plot([], [], "D", color="black", markersize=5, label="paper (4 datasets)")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, groups, rotation=15, ha="right")
    ax.set_ylabel("Δ_MTL vs STL (%)")
    ax.set_title("Multi-task gain over STL: mean over seeds, 95 % paired-bootstrap interval")
    ax.legend(fontsize="small", ncols=2)
    return _save(fig, out)


def plot_comparison_cost(report: Mapping[str, Any], out: Path) -> Path:
    """Per dataset: median training-step time and peak memory of each architecture."""
    datasets = list(report["datasets"])
    archs = list(next(iter(report["datasets"].values()))["cost"])
    fig = Figure(figsize=(max(6.0, 1.2 * len(archs) * len(datasets) * 0.6 + 3), 3.6), layout="constrained")
    axes = fig.subplots(1, 2)
    width = 0.8 / len(archs)
    x = np.arange(len(datasets))
    for ax, key, label in (
        (axes[0], "step_seconds", "training step (s, median)"),
        (axes[1], "peak_memory_mib", "peak memory (MiB)"),
    ):
        for i, arch in enumerate(archs):
            values = [report["datasets"][d]["cost"][arch][key] for d in datasets]
            ax.bar(
                x + (i - (len(archs) - 1) / 2) * width,
                values,
                width,
                label=arch,
                color=ARCH_COLOURS.get(arch),
            )
        ax.set_xticks(x, datasets, rotation=15, ha="right")
        ax.set_ylabel(label)
    axes[0].legend(fontsize="small")
    fig.suptitle("Training cost, measured in the same runs")
    return _save(fig, out)
