"""Report figures and the metric table, on tiny arrays: files are written, are PNG/HTML, and the table
carries the right numbers."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from ctan.errors import CtanError
from ctan.plots import plot_delta_mtl, plot_examples, plot_learning_curves, write_metric_table
from ctan.tasks import Task

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG


def _history(epochs: int = 4) -> dict:
    return {
        "epochs": [
            {
                "epoch": e,
                "train_loss": {"total": 2 / e, "dose": 1 / e, "structures": 1 / e},
                "val_loss": {"total": 2.5 / e, "dose": 1.2 / e, "structures": 1.3 / e},
                "val_metrics": {"dose": {"mae": 3 / e}, "structures": {"dice": 0.2 * e}},
                "seconds": 0.1,
            }
            for e in range(1, epochs + 1)
        ],
        "best_epoch": 3,
    }


def test_learning_curves(tmp_path: Path) -> None:
    assert _is_png(plot_learning_curves(_history(), tmp_path / "curves.png"))


def test_learning_curves_with_negative_loss_and_no_metrics(tmp_path: Path) -> None:
    history = {"epochs": [{"epoch": 1, "train_loss": {"total": -0.5}, "val_loss": {"total": -0.4}}]}
    assert _is_png(plot_learning_curves(history, tmp_path / "curves.png"))


def test_learning_curves_need_epochs(tmp_path: Path) -> None:
    with pytest.raises(CtanError, match="no epochs"):
        plot_learning_curves({"epochs": []}, tmp_path / "curves.png")


def test_examples_3d_dose_and_structures(tmp_path: Path) -> None:
    image = np.random.default_rng(0).random((1, 6, 12, 12), dtype=np.float32)
    dose = np.zeros((1, 6, 12, 12), np.float32)
    dose[:, :, 3:9, 3:9] = 60
    structures = np.zeros((2, 6, 12, 12), np.float32)
    structures[0, :, 4:8, 4:8] = 1
    structures[1, :, 1:4, 6:10] = 1  # the prediction below misses this one entirely
    tasks = [
        Task("dose", "regression", "dose"),
        Task("structures", "segmentation", "structures", channels=2, multilabel=True),
    ]
    predictions = {
        "dose": dose * 0.9,
        "structures": np.stack([np.roll(structures[0], 1, -1), 0 * structures[1]]),
    }
    out = plot_examples(
        image, {"dose": dose, "structures": structures}, predictions, tasks, tmp_path / "ex.png"
    )
    assert _is_png(out)


def test_examples_2d_lesion_and_diagnosis(tmp_path: Path) -> None:
    image = np.random.default_rng(1).random((3, 16, 16), dtype=np.float32)
    lesion = np.zeros((1, 16, 16), np.float32)
    lesion[0, 4:12, 4:12] = 1
    names = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
    tasks = [
        Task("lesion", "segmentation", "lesion"),
        Task("diagnosis", "classification", "diagnosis", classes=7, class_names=names),
    ]
    probs = np.full(7, 0.05)
    probs[5] = 0.7
    out = plot_examples(
        image,
        {"lesion": lesion, "diagnosis": np.int64(4)},
        {"lesion": np.roll(lesion, 2, -1), "diagnosis": probs},
        tasks,
        tmp_path / "ex.png",
    )
    assert _is_png(out)


def test_examples_image_level_only(tmp_path: Path) -> None:
    tasks = [
        Task("covid", "classification", "covid", classes=2),
        Task("severity", "classification", "severity", classes=2),
    ]
    out = plot_examples(
        np.zeros((1, 4, 8, 8), np.float32),  # a blank image must not break the display scaling
        {"covid": np.int64(1), "severity": np.int64(0)},
        {"covid": np.array([0.8]), "severity": np.array([0.3])},
        tasks,
        tmp_path / "ex.png",
    )
    assert _is_png(out)


def _summary(path: Path) -> Path:
    rows = []
    for dataset in ("openkbp_demo", "ham10000_demo"):
        for arch, delta in (("stl", 0.0), ("hps", -1.0), ("ctan", 2.0)):
            for seed in (0, 1):
                rows.append(
                    {
                        "row_type": "metric",
                        "dataset": dataset,
                        "architecture": arch,
                        "seed": seed,
                        "task": "structures",
                        "metric": "dice",
                        "value": 0.5 + 0.1 * seed + delta / 100,
                        "std": "",
                        "higher_is_better": True,
                    }
                )
                rows.append(
                    {
                        "row_type": "metric",
                        "dataset": dataset,
                        "architecture": arch,
                        "seed": seed,
                        "task": "dose",
                        "metric": "dose_score",
                        "value": 3.0 - delta / 10,
                        "std": "",
                        "higher_is_better": False,
                    }
                )
            rows.append(
                {
                    "row_type": "delta_mtl",
                    "dataset": dataset,
                    "architecture": arch,
                    "seed": "all",
                    "task": "all",
                    "metric": "delta_mtl_pct",
                    "value": delta,
                    "std": 0.5,
                    "higher_is_better": True,
                }
            )
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_delta_mtl_bar_chart(tmp_path: Path) -> None:
    assert _is_png(plot_delta_mtl(_summary(tmp_path / "summary.csv"), tmp_path / "delta.png"))


def test_metric_table_means_over_seeds_and_marks_the_best(tmp_path: Path) -> None:
    html = write_metric_table(_summary(tmp_path / "summary.csv"), tmp_path / "table.html").read_text()
    assert "<th>stl</th><th>hps</th><th>ctan</th>" in html
    # dice: mean of 0.52 and 0.62 for ctan, the best (higher is better); std over two seeds shown.
    assert "<b>0.57 ± 0.071</b>" in html
    # dose score: lower is better, so ctan's 2.8 is bold.
    assert "<td>dose_score ↓</td><td>3 ± 0</td><td>3.1 ± 0</td><td><b>2.8 ± 0</b></td>" in html


def test_summary_figures_reject_other_csv(tmp_path: Path) -> None:
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(CtanError, match="not a ctan summary"):
        plot_delta_mtl(other, tmp_path / "delta.png")
