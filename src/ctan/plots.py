"""Figures and tables for the Snakemake report and the docs: learning curves, example predictions,
Δ_MTL per dataset and architecture, and the per-task metric table.

Each function reads plain data and writes one file. Figures are built on `matplotlib.figure.Figure`
(Agg canvas) rather than pyplot, so no global state leaks between calls or into parallel jobs.
"""

from __future__ import annotations

import csv
import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps, rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from ctan.errors import CtanError
from ctan.outputs import staged
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


def figure_path(out: Path | str) -> Path:
    """The file a figure is written to: ``out``, with ``.png`` added where it has no suffix (as
    matplotlib itself does, so the path printed is the file written). An unknown suffix is refused
    before any work."""
    out = Path(out)
    if not out.suffix:
        return out.with_name(out.name + ".png")
    supported = Figure().canvas.get_supported_filetypes()
    if out.suffix[1:].lower() not in supported:
        known = ", ".join(f".{s}" for s in ("png", "svg", "pdf"))
        raise CtanError(out, f"not a figure format matplotlib writes ({out.suffix}); use {known}")
    return out


def write_figure(fig: Figure, temp: Path, out: Path) -> None:
    """Render ``fig`` into ``temp`` in the format ``out``'s suffix names (``temp`` ends in .tmp)."""
    FigureCanvasAgg(fig)
    fig.savefig(temp, format=out.suffix[1:].lower(), dpi=110, bbox_inches="tight")


def _save(fig: Figure, out: Path) -> Path:
    out = figure_path(out)
    with staged(out) as (temp,):
        write_figure(fig, temp, out)
    return out


# --- text size ---------------------------------------------------------------------------------------

# The report shows a figure at the width of its column (about 900 px): text sized for that width, not
# for a full-screen window. Applied around the building of each figure (rcParams are read when an
# artist is created), so nothing leaks into other figures.
TEXT = {
    "font.size": 12,
    "axes.titlesize": 13,
    "axes.labelsize": 12,
    "xtick.labelsize": 11,
    "ytick.labelsize": 11,
    "legend.fontsize": 11,
    "figure.titlesize": 14,
}


def _text():
    return rc_context(TEXT)


def structure_colours(names: Sequence[str]) -> dict[str, str]:
    """One colour per structure, by its channel index: the contour panel and the DVH share them."""
    return {name: CONTOUR_COLOURS[i % len(CONTOUR_COLOURS)] for i, name in enumerate(names)}


# --- learning curves ---------------------------------------------------------------------------------

# Units of the validation metrics the trainer records (ctan.training.selection); others are unitless.
METRIC_UNITS = {"mae": "Gy", "dose_score": "Gy", "dvh_score": "Gy", "hd95": "mm"}
BOUNDED_METRICS = {"dice", "jaccard", "auc", "accuracy", "balanced_accuracy"}  # on [0, 1]


def plot_learning_curves(history: Mapping[str, Any], out: Path) -> Path:
    """`learning_curves_figure`, written to ``out``."""
    with _text():
        return _save(learning_curves_figure(history, out), out)


def learning_curves_figure(history: Mapping[str, Any], out: Path | None = None) -> Figure:
    """Loss (total and per task, train solid / validation dashed), then one panel per validation metric
    of each task, each on its own axis and unit; the kept epoch is marked in every panel.

    `history` is the trainer's history.json: {"epochs": [{"epoch", "train_loss": {"total", task...},
    "val_loss": {...}, "val_metrics": {task: {metric: value}}}], "best_epoch": n}.
    """
    records = list(history.get("epochs", []))
    if not records:
        raise CtanError(out, "no epochs in the training history to plot")
    epochs = [r["epoch"] for r in records]
    metric_keys = list(
        dict.fromkeys(
            (task, m) for r in records for task, ms in (r.get("val_metrics") or {}).items() for m in ms
        )
    )
    panels = 1 + len(metric_keys)
    ncols = min(3, panels)
    nrows = math.ceil(panels / ncols)
    best = history.get("best_epoch")
    with _text():
        fig = Figure(figsize=(4.3 * ncols, 3.5 * nrows), layout="constrained")
        grid = fig.subplots(nrows, ncols, squeeze=False)
        axes = list(grid.ravel())
        for ax in axes[panels:]:
            ax.set_visible(False)

        ax = axes[0]
        names = list(records[0].get("train_loss", {}))
        positive = True
        for i, name in enumerate(names):
            colour = "black" if name == "total" else CONTOUR_COLOURS[i % len(CONTOUR_COLOURS)]
            width = 2.0 if name == "total" else 1.2
            for split, style in (("train_loss", "-"), ("val_loss", "--")):
                values = [_finite(r.get(split, {}).get(name)) for r in records]
                positive &= all(v > 0 for v in values if not math.isnan(v))
                ax.plot(epochs, values, style, color=colour, linewidth=width)
            ax.plot([], [], color=colour, linewidth=width, label=name)
        ax.plot([], [], "-", color="grey", label="train")
        ax.plot([], [], "--", color="grey", label="validation")
        if positive:
            ax.set_yscale("log")
        ax.set_ylabel("loss")
        ax.set_title("loss")
        # Never over the curves: in a spare slot of the grid, else below the panel.
        spare = axes[panels:]
        if spare:
            spare[0].set_visible(True)
            spare[0].set_axis_off()
            spare[0].legend(*ax.get_legend_handles_labels(), loc="center", title="loss")
        else:
            ax.legend(fontsize="small", ncols=3, loc="upper center", bbox_to_anchor=(0.5, -0.22))

        for ax, (task, metric) in zip(axes[1:panels], metric_keys, strict=True):
            values = [_finite((r.get("val_metrics") or {}).get(task, {}).get(metric)) for r in records]
            ax.plot(epochs, values, "-o", markersize=3, color="#1f77b4")
            unit = METRIC_UNITS.get(metric, "")
            ax.set_title(f"{task}: {metric}")
            ax.set_ylabel(f"validation {metric}" + (f" ({unit})" if unit else ""))
            if metric in BOUNDED_METRICS:
                ax.set_ylim(-0.02, 1.02)
            elif unit and all(v >= 0 for v in values if not math.isnan(v)):
                ax.set_ylim(bottom=0)
            if best and best in epochs and not math.isnan(values[epochs.index(best)]):
                value = values[epochs.index(best)]
                ax.plot([best], [value], "o", color="#d62728", markersize=7, zorder=3)

        for ax in axes[:panels]:
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            if best:
                ax.axvline(best, color="#d62728", linestyle=":", linewidth=1.2)
                # Inside the axes, on whichever side of the line has room.
                right_half = best > (epochs[0] + epochs[-1]) / 2
                ax.text(
                    best,
                    0.97,
                    f"kept: epoch {best} " if right_half else f" kept: epoch {best}",
                    transform=ax.get_xaxis_transform(),
                    ha="right" if right_half else "left",
                    va="top",
                    fontsize="small",
                    color="#d62728",
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1},
                )
        return fig


def _finite(value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return float("nan")
    return value if math.isfinite(value) else float("nan")


# --- example predictions -----------------------------------------------------------------------------


def axial_flips(direction: Sequence[float], world: str | None) -> tuple[bool, bool]:
    """(flip rows, flip columns) that show an axial slice of a (z, y, x) volume as radiology does:
    anterior at the top, the patient's right on the viewer's left.

    ``direction`` is the case's row-major (z, y, x) direction matrix, whose columns are the array axes'
    world directions, listed (S, P, L) in an ``"LPS"`` world and (S, A, R) in a ``"RAS"`` one (a
    dataset module's ``WORLD``). An axis that does not run mainly front-to-back (rows) or right-to-left
    (columns), as in a sagittal acquisition, is left as stored; so is everything without a world.
    """
    if world not in ("LPS", "RAS") or len(direction) != 9:
        return False, False
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    if world == "RAS":
        d = d * np.array([[1.0], [-1.0], [-1.0]])  # (S, A, R) -> (S, P, L)
    rows, columns = d[:, 1], d[:, 2]
    flip_rows = int(np.argmax(np.abs(rows))) == 1 and rows[1] < 0
    flip_columns = int(np.argmax(np.abs(columns))) == 2 and columns[2] < 0
    return bool(flip_rows), bool(flip_columns)


def plot_examples(
    image: np.ndarray,
    targets: Mapping[str, Any],
    predictions: Mapping[str, Any],
    tasks: Sequence[Task],
    out: Path,
    title: str | None = None,
    structure_names: Sequence[str] = (),
    flips: tuple[bool, bool] | None = None,
) -> Path:
    """One test case: the image with every task's reference and prediction.

    image (C, *spatial), normalised; 3D shows the axial slice with the most reference dose (the middle
    one without a dose task), turned by ``flips`` (`axial_flips`: anterior up, the patient's right on
    the left, marked A and R) or as stored without them (no patient frame). Dose: colour wash over CT,
    reference and prediction on one scale, then their difference (predicted − reference, blue below,
    red above, centred at 0). Segmentation: reference contours solid, predicted (probability > 0.5)
    dashed, the legend beside the image.
    Image-level tasks: true and predicted class with its probability. ``title`` says which case it is
    (e.g. the one with the median score).
    """
    image = np.asarray(image, dtype=np.float32)
    spatial_dims = image.ndim - 1
    if spatial_dims not in (2, 3):
        raise CtanError(
            out, f"expected an image of shape (C, *spatial) with 2 or 3 spatial axes, got {image.shape}"
        )
    dense = [t for t in tasks if t.dense]
    z = None
    if spatial_dims == 3:
        z = image.shape[1] // 2
        dose = next((t for t in dense if t.kind == "regression"), None)
        if dose is not None:
            reference = np.asarray(targets[dose.name], dtype=np.float64)
            per_slice = np.nansum(reference.reshape(reference.shape[0], reference.shape[1], -1), axis=(0, 2))
            if np.any(per_slice > 0):
                z = int(np.argmax(per_slice))

    def plane(array: Any) -> np.ndarray:
        """(C, *spatial) -> (C, H, W) in the displayed plane."""
        array = np.asarray(array, dtype=np.float32)
        if z is None:
            return array
        shown = array[:, z]
        if flips and flips[0]:
            shown = shown[:, ::-1]
        if flips and flips[1]:
            shown = shown[:, :, ::-1]
        return np.ascontiguousarray(shown)

    background = _display_image(plane(image))
    panels = 1 + sum(3 if t.kind == "regression" else 1 for t in dense)
    # At most three images a row, so that they stay large at the report's width.
    ncols = min(panels, 3)
    nrows = math.ceil(panels / ncols)
    legend_room = 1.8 if any(t.kind == "segmentation" for t in dense) else 0.0
    with _text():
        width = max(7.0, 3.6 * ncols + legend_room + 0.8)  # the title needs room even over one image
        fig = Figure(figsize=(width, 3.8 * nrows + 0.6), layout="constrained")
        grid = fig.subplots(nrows, ncols, squeeze=False)
        axes = list(grid.ravel())
        for ax in axes[panels:]:
            ax.set_visible(False)
        axes = axes[:panels]
        for ax in axes:
            ax.imshow(background, cmap="gray" if background.ndim == 2 else None)
            ax.set_axis_off()
        where = f" (axial slice {z})" if z is not None else ""
        axes[0].set_title("image" + where)
        if z is not None and flips is not None:  # the radiology view: say so, as a viewer does
            for x, y, letter in ((0.5, 0.97, "A"), (0.03, 0.5, "R")):
                axes[0].text(
                    x, y, letter, transform=axes[0].transAxes, color="yellow", ha="center", va="center"
                )

        k = 1
        for task in dense:
            ref, pred = plane(targets[task.name]), plane(predictions[task.name])
            if task.kind == "regression":
                unit = " (Gy)" if task.target == "dose" else ""
                top = float(max(np.nanmax(ref), np.nanmax(pred), 1e-6))
                for ax, data, what in ((axes[k], ref, "reference"), (axes[k + 1], pred, "predicted")):
                    wash = np.ma.masked_less_equal(data[0], 0.02 * top)
                    shown = ax.imshow(wash, cmap="jet", alpha=0.6, vmin=0, vmax=top)
                    ax.set_title(f"{task.name}: {what}")
                fig.colorbar(shown, ax=axes[k : k + 2], shrink=0.8, label=f"{task.name}{unit}")
                difference = pred[0] - ref[0]
                span = float(max(np.nanmax(np.abs(difference)), 1e-6))
                outside = (ref[0] <= 0.02 * top) & (pred[0] <= 0.02 * top)
                shown = axes[k + 2].imshow(
                    np.ma.masked_where(outside, difference), cmap="RdBu_r", vmin=-span, vmax=span, alpha=0.85
                )
                axes[k + 2].set_title(f"{task.name}: predicted − reference")
                fig.colorbar(shown, ax=axes[k + 2], shrink=0.8, label=f"difference{unit}")
                k += 3
            else:
                _contour_panel(fig, axes[k], task, ref, pred, structure_names)
                k += 1

        lines = [_label_line(t, targets.get(t.name), predictions.get(t.name)) for t in tasks if not t.dense]
        heading = [title] if title else []
        if heading or lines:
            fig.suptitle("\n".join(heading + lines), fontsize="large")
        return _save(fig, out)


def _contour_panel(fig, ax, task: Task, ref: np.ndarray, pred: np.ndarray, structure_names) -> None:
    names = tuple(task.class_names or structure_names) or (
        (task.name,) if ref.shape[0] == 1 else tuple(f"{task.name} {c}" for c in range(ref.shape[0]))
    )
    colours = structure_colours([names[c] if c < len(names) else str(c) for c in range(ref.shape[0])])
    handles = []
    for c, (name, colour) in enumerate(colours.items()):
        if ref.shape[0] == 1:
            colour = "#00e5ff"  # one lesion: a colour that stands out on skin
        drawn = _contour(ax, ref[c], colour, "solid")
        drawn |= _contour(ax, (pred[c] > 0.5).astype(np.float32), colour, "dashed")
        if drawn:
            handles.append(Line2D([], [], color=colour, linewidth=2, label=name))
    style_colour = "#00e5ff" if ref.shape[0] == 1 else "black"
    styles = [
        Line2D([], [], color=style_colour, linestyle="solid", linewidth=2, label="reference"),
        Line2D([], [], color=style_colour, linestyle="dashed", linewidth=2, label="predicted"),
    ]
    shown = (handles if len(handles) > 1 else []) + styles
    # Beside the image, never over the contours.
    ax.legend(handles=shown, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, fontsize="small")
    ax.set_title(f"{task.name}: reference and predicted")


def _display_image(image: np.ndarray) -> np.ndarray:
    """(C, H, W) -> grey (H, W) or RGB (H, W, 3) scaled to [0, 1] for display."""
    shown = image[0] if image.shape[0] != 3 else np.moveaxis(image, 0, -1)
    lo, hi = float(np.nanmin(shown)), float(np.nanmax(shown))
    return np.clip((shown - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(shown)


def _contour(ax, mask: np.ndarray, colour: str, style: str) -> bool:
    """Draw the 0.5 iso-line of a mask; False when the mask is empty or full in this plane."""
    if not (float(mask.min()) < 0.5 < float(mask.max())):
        return False
    ax.contour(mask, levels=[0.5], colors=[colour], linestyles=style, linewidths=2.0)
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
    return f"{task.name}: true {truth}, predicted {name(predicted)} (p = {confidence:.2f})"


# --- dose-volume histograms --------------------------------------------------------------------------


def dvh_figure(
    reference_dose: np.ndarray,
    predicted_dose: np.ndarray,
    structures: Mapping[str, np.ndarray],
    voxel_dims_mm: Sequence[float],
    oars: Sequence[str],
    targets: Sequence[str],
    colours: Mapping[str, str] | None = None,
    title: str | None = None,
) -> Figure:
    """Cumulative DVHs of one patient per structure (reference solid, predicted dashed) beside the
    patient's DVH metric errors (predicted − reference: D_0.1cc and mean for OARs, D99, D95, D1 for
    targets).

    Curves and metrics come from `ctan.metrics.dose` (`dvh_curve`, `dvh_metrics`) on exactly the
    arrays given: pass the ones the DVH score was computed from. Each curve's line carries the label
    ``"<structure> reference"`` / ``"<structure> predicted"``; the metrics are points of those curves.
    """
    from ctan.metrics import dose as dose_metrics

    rois = [r for r in (*oars, *targets) if r in structures and np.any(structures[r])]
    if not rois:
        raise CtanError(None, "no contoured structure to draw a dose-volume histogram of")
    colours = dict(colours or structure_colours(rois))
    reference_metrics = dose_metrics.dvh_metrics(reference_dose, structures, voxel_dims_mm, oars, targets)
    predicted_metrics = dose_metrics.dvh_metrics(predicted_dose, structures, voxel_dims_mm, oars, targets)
    errors = [
        (roi, metric, predicted_metrics[(roi, metric)] - value)
        for (roi, metric), value in reference_metrics.items()
    ]
    score = dose_metrics.dvh_score(reference_metrics, predicted_metrics)
    with _text():
        fig = Figure(figsize=(13, max(5.0, 0.3 * len(errors) + 1.8)), layout="constrained")
        curves_ax, errors_ax = fig.subplots(1, 2, width_ratios=[1.5, 1])
        for roi in rois:
            colour = colours.get(roi, "black")
            for dose, style, what in (
                (reference_dose, "-", "reference"),
                (predicted_dose, "--", "predicted"),
            ):
                x, y = dose_metrics.dvh_curve(dose, structures[roi])
                curves_ax.plot(x, y, style, color=colour, linewidth=1.8, label=f"{roi} {what}")
        curves_ax.set_xlabel("dose (Gy)")
        curves_ax.set_ylabel("volume (%)")
        curves_ax.set_ylim(0, 102)
        curves_ax.set_xlim(left=0)
        curves_ax.grid(alpha=0.3)
        curves_ax.set_title("cumulative DVH: reference solid, predicted dashed")
        legend = [Line2D([], [], color=colours.get(r, "black"), linewidth=2.5, label=r) for r in rois]
        curves_ax.legend(
            handles=legend, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, fontsize="small"
        )

        labels = [f"{roi} {metric.replace('_', ' ').replace('0.1 cc', '0.1cc')}" for roi, metric, _ in errors]
        values = [e for _, _, e in errors]
        positions = np.arange(len(errors))[::-1]
        errors_ax.barh(positions, values, color=[colours.get(r, "black") for r, _, _ in errors])
        errors_ax.set_yticks(positions, labels)
        errors_ax.axvline(0, color="black", linewidth=0.8)
        errors_ax.set_xlabel("predicted − reference (Gy)")
        errors_ax.grid(axis="x", alpha=0.3)
        errors_ax.set_title(f"DVH metric errors (mean |error| {score:.2f} Gy)")
        if title:
            fig.suptitle(title)
    return fig


def plot_dvh(
    reference_dose: np.ndarray,
    predicted_dose: np.ndarray,
    structures: Mapping[str, np.ndarray],
    voxel_dims_mm: Sequence[float],
    oars: Sequence[str],
    targets: Sequence[str],
    out: Path,
    colours: Mapping[str, str] | None = None,
    title: str | None = None,
) -> Path:
    """`dvh_figure`, written to ``out``."""
    with _text():
        fig = dvh_figure(
            reference_dose, predicted_dose, structures, voxel_dims_mm, oars, targets, colours, title
        )
        return _save(fig, out)


# --- summary -----------------------------------------------------------------------------------------

SUMMARY_KEY = ("row_type", "dataset", "architecture", "seed", "task", "metric")
"""What names one summary row: a second row with the same key would be averaged in as another seed."""
SUMMARY_NUMBERS = ("value", "std", "n_seeds")


def _read_summary(summary_csv: Path):
    """The summary as a table of strings and numbers, with each row's ``line`` in the file.

    Refused, naming the line, where the table would be silently wrong: a row cut short, a non-numeric
    number, a row given twice (counted as one more seed), a metric row missing for a seed the other rows
    have (a mean over fewer seeds), or STL and the others disagreeing on a metric's direction."""
    import pandas as pd

    path = Path(summary_csv)
    if not path.is_file():
        raise CtanError(path, "summary not found; run `ctan summarize` first")
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            records = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise CtanError(path, f"not a readable summary CSV: {err}") from None
    if not header:
        raise CtanError(path, "is empty; run `ctan summarize` to write it")
    missing = {"row_type", "dataset", "architecture", "value"} - set(header)
    if missing:
        raise CtanError(path, f"not a ctan summary: missing columns {', '.join(sorted(missing))}")
    for line, row in records:
        if len(row) != len(header):
            raise CtanError(path, f"line {line} has {len(row)} fields, the header {len(header)} (cut short?)")
    table = pd.DataFrame([row for _, row in records], columns=header, dtype=object)
    table["line"] = [line for line, _ in records]
    for column in SUMMARY_NUMBERS:
        if column in table:
            cells = zip(table["line"], table[column], strict=True)
            table[column] = [_number(path, line, column, text) for line, text in cells]
    _check_rows(path, table)
    return table


def _number(path: Path, line: int, column: str, text: str) -> float:
    """A number cell; empty is missing (NaN), as `ctan summarize` writes an undefined std."""
    if not text.strip():
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise CtanError(path, f"line {line}: {column} {text!r} is not a number") from None


def _check_rows(path: Path, table) -> None:
    """Each row once; every metric row of every architecture and seed of a dataset; one direction per
    metric (the table's bold goes to the best by that direction)."""
    key = [c for c in SUMMARY_KEY if c in table]
    first: dict[tuple, int] = {}
    for line, *values in table[["line", *key]].itertuples(index=False):
        if tuple(values) in first:
            what = " ".join(f"{c} {v}" for c, v in zip(key, values, strict=True))
            raise CtanError(
                path,
                f"line {line} repeats line {first[tuple(values)]} ({what}); each row is listed once "
                "(rewrite the summary with `ctan summarize`)",
            )
        first[tuple(values)] = line
    rows = table[table["row_type"] == "metric"]
    if rows.empty or not {"seed", "task", "metric"} <= set(table):
        return
    for dataset, of_dataset in rows.groupby("dataset", sort=False):
        have = set(of_dataset[["architecture", "seed", "task", "metric"]].itertuples(index=False, name=None))
        archs = dict.fromkeys(of_dataset["architecture"])
        seeds = dict.fromkeys(of_dataset["seed"])
        metrics = dict.fromkeys(of_dataset[["task", "metric"]].itertuples(index=False, name=None))
        for arch in archs:
            for seed in seeds:
                for task, metric in metrics:
                    if (arch, seed, task, metric) not in have:
                        raise CtanError(
                            path,
                            f"no metric row for {dataset} {arch} seed {seed} {task}/{metric}, which other "
                            f"rows of {dataset} have: its mean would be over fewer seeds "
                            "(rewrite the summary with `ctan summarize`)",
                        )
    if "higher_is_better" in table:
        for (dataset, task, metric), group in rows.groupby(["dataset", "task", "metric"], sort=False):
            directions = group["higher_is_better"].str.lower()
            odd = group[directions != directions.iloc[0]]
            if not odd.empty:
                raise CtanError(
                    path,
                    f"{dataset} {task}/{metric} has higher_is_better {group['higher_is_better'].iloc[0]} "
                    f"on line {group['line'].iloc[0]} but {odd['higher_is_better'].iloc[0]} on line "
                    f"{odd['line'].iloc[0]}; a metric has one direction",
                )


def plot_delta_mtl(summary_csv: Path, out: Path) -> Path:
    """`delta_mtl_figure` of a summary file, written to ``out`` (the path written is returned)."""
    with _text():
        return _save(delta_mtl_figure(_read_summary(summary_csv), summary_csv), out)


def delta_mtl_figure(table, summary_csv: Path | None = None) -> Figure:
    """Grouped bars: Δ_MTL (% vs STL, positive is better) per dataset and architecture, the mean over
    seeds; whiskers (± std) only where there are several seeds."""
    rows = table[(table["row_type"] == "delta_mtl") & (table["architecture"] != "stl")]
    if rows.empty:
        raise CtanError(summary_csv, "no Δ_MTL rows for any multi-task architecture")
    datasets = list(dict.fromkeys(rows["dataset"]))
    archs = list(dict.fromkeys(rows["architecture"]))
    width = 0.8 / len(archs)
    seeds = 1
    with _text():
        fig = Figure(figsize=(max(6.0, 1.5 + 0.5 * len(archs) * len(datasets)), 4.5), layout="constrained")
        ax = fig.subplots()
        x = np.arange(len(datasets))
        for i, arch in enumerate(archs):
            sel = rows[rows["architecture"] == arch].set_index("dataset")
            values = [float(sel["value"].get(d, np.nan)) for d in datasets]
            counts = [_finite(sel["n_seeds"].get(d)) if "n_seeds" in sel else 1.0 for d in datasets]
            counts = [int(n) if math.isfinite(n) else 1 for n in counts]
            stds = [_finite(sel["std"].get(d)) if "std" in sel else float("nan") for d in datasets]
            seeds = max(seeds, *counts)
            xs = x + (i - (len(archs) - 1) / 2) * width
            ax.bar(xs, values, width, label=arch, color=ARCH_COLOURS.get(arch))
            for xi, value, std, n in zip(xs, values, stds, counts, strict=True):
                if math.isnan(value):  # no Δ_MTL (a metric was undefined): say so rather than draw nothing
                    ax.text(xi, 0, "n/a", ha="center", va="bottom", fontsize="small", rotation=90)
                elif n > 1 and math.isfinite(std):
                    ax.errorbar(xi, value, yerr=std, color="black", capsize=3, linewidth=1)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(x, datasets, rotation=20, ha="right")
        ax.set_ylabel("Δ_MTL vs STL (%)")
        spread = "mean ± std over seeds" if seeds > 1 else "one seed"
        ax.set_title(f"Multi-task gain over single-task learning ({spread})")
        ax.legend(fontsize="small")
        return fig


def write_metric_table(summary_csv: Path, out: Path) -> Path:
    """`metric_table_html` of a summary file, written to ``out``."""
    document = metric_table_html(_read_summary(summary_csv), summary_csv)
    out = Path(out)
    with staged(out) as (temp,):
        temp.write_text(document, encoding="utf-8")
    return out


def plot_summary(summary_csv: Path, figure: Path, table_out: Path) -> tuple[Path, Path]:
    """`ctan plot-summary`: the Δ_MTL figure and the metric table, both or neither (a summary the
    table refuses leaves no figure behind either). Returns the paths written."""
    table = _read_summary(summary_csv)
    figure, table_out = figure_path(figure), Path(table_out)
    fig = delta_mtl_figure(table, summary_csv)
    document = metric_table_html(table, summary_csv)
    with staged(figure, table_out) as (figure_temp, table_temp):
        with _text():
            write_figure(fig, figure_temp, figure)
        table_temp.write_text(document, encoding="utf-8")
    return figure, table_out


def metric_table_html(table, summary_csv: Path | None = None) -> str:
    """HTML table: rows dataset / task / metric, columns architecture, cells mean ± std over seeds; the
    best architecture per row in bold (every one tied for it; none where all tie)."""
    from ctan.comparison import best_of

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
        best = best_of({a: float(c["mean"]) for a, c in cells.items()}, hib)
        tds = []
        for arch in archs:
            if arch not in cells:
                tds.append("<td></td>")
                continue
            c = cells[arch]
            text = f"{c['mean']:.4g}" + (
                f" ± {c['std']:.2g}" if c["count"] > 1 and math.isfinite(c["std"]) else ""
            )
            tds.append(f"<td><b>{text}</b></td>" if arch in best else f"<td>{text}</td>")
        arrow = "↑" if hib else "↓"
        head = "".join(f"<td>{html.escape(str(v))}</td>" for v in (dataset, task, f"{metric} {arrow}"))
        body.append(f"<tr>{head}{''.join(tds)}</tr>")
    header = "".join(f"<th>{html.escape(h)}</th>" for h in ["dataset", "task", "metric", *archs])
    return (
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


# --- the architecture comparison (ctan compare) ----------------------------------------------------


def _whisker(length: float) -> float:
    """Error-bar length: none where the interval is undefined (and never negative)."""
    return max(0.0, length) if math.isfinite(length) else 0.0


def plot_comparison_delta(report: Mapping[str, Any], out: Path) -> Path:
    """`comparison_delta_figure`, written to ``out``."""
    with _text():
        return _save(comparison_delta_figure(report, out), out)


def comparison_delta_figure(report: Mapping[str, Any], out: Path | None = None) -> Figure:
    """Δ_MTL per dataset and architecture: the bar is the mean over seeds, each seed a point, the
    whiskers the paired-bootstrap confidence interval (none where it is undefined); a last group gives
    the mean over datasets beside the paper's (black diamonds)."""
    datasets = list(report["datasets"])
    archs = list(report["mean_delta_mtl"])
    if not archs:
        raise CtanError(out, "no multi-task architecture to compare with STL")
    groups = [*datasets, "mean over datasets"]
    width = 0.8 / len(archs)
    with _text():
        fig = Figure(figsize=(max(7.0, 2.0 + 0.55 * len(archs) * len(groups)), 5.0), layout="constrained")
        ax = fig.subplots()
        x = np.arange(len(groups))
        for i, arch in enumerate(archs):
            xs = x + (i - (len(archs) - 1) / 2) * width
            values = [report["datasets"][d]["delta_mtl"][arch]["delta_mtl"] for d in datasets]
            values.append(report["mean_delta_mtl"][arch])
            ax.bar(xs, values, width, label=arch, color=ARCH_COLOURS.get(arch), alpha=0.85)
            for xi, d in zip(xs, datasets, strict=False):
                entry = report["datasets"][d]["delta_mtl"][arch]
                low, high = entry.get("ci_low", math.nan), entry.get("ci_high", math.nan)
                if math.isfinite(low) and math.isfinite(high) and high > low:
                    ax.errorbar(
                        xi,
                        entry["delta_mtl"],
                        yerr=[[_whisker(entry["delta_mtl"] - low)], [_whisker(high - entry["delta_mtl"])]],
                        color="black",
                        capsize=3,
                        linewidth=1,
                    )
                seeds = [v for v in entry.get("per_seed", []) if math.isfinite(v)]
                offsets = np.linspace(-0.25, 0.25, len(seeds)) * width if len(seeds) > 1 else [0.0]
                ax.scatter(
                    xi + np.asarray(offsets[: len(seeds)]),
                    seeds,
                    s=22,
                    color="white",
                    edgecolors="black",
                    linewidths=1,
                    zorder=3,
                    gid="seeds",
                )
            paper = report.get("paper_delta_mtl", {}).get(arch)
            if paper is not None:
                ax.plot(xs[-1], paper, "D", color="black", markersize=6)
        handles, _ = ax.get_legend_handles_labels()
        handles += [
            Line2D(
                [], [], marker="o", color="white", markeredgecolor="black", linestyle="", label="one seed"
            ),
            Line2D([], [], marker="_", markersize=12, color="black", label="95 % bootstrap interval"),
            Line2D([], [], marker="D", color="black", linestyle="", label="paper (4 datasets)"),
        ]
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(x, groups, rotation=15, ha="right")
        ax.set_ylabel("Δ_MTL vs STL (%)")
        ax.set_title("Multi-task gain over STL: bar = mean over seeds, points = seeds")
        ax.legend(handles=handles, fontsize="small", ncols=2, loc="best")
        return fig


def plot_comparison_cost(report: Mapping[str, Any], out: Path) -> Path:
    """`comparison_cost_figure`, written to ``out``."""
    with _text():
        return _save(comparison_cost_figure(report), out)


def comparison_cost_figure(report: Mapping[str, Any]) -> Figure:
    """Per dataset: median training-step time and peak memory of each architecture."""
    datasets = list(report["datasets"])
    archs = list(next(iter(report["datasets"].values()))["cost"])
    width = 0.8 / len(archs)
    x = np.arange(len(datasets))
    with _text():
        fig = Figure(figsize=(max(10.0, 1.0 + 0.7 * len(archs) * len(datasets)), 4.8), layout="constrained")
        axes = fig.subplots(1, 2)
        for ax, key, label in (
            (axes[0], "step_seconds", "training step, median (s)"),
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
            ax.grid(axis="y", alpha=0.3)
        axes[0].set_title("time per training step")
        axes[1].set_title("peak memory")
        axes[1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
        fig.suptitle("Training cost, measured in the same runs")
        return fig
