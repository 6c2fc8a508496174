"""Report figures and the metric table, on tiny arrays: files are written, are non-blank PNG/HTML, the
table carries the right numbers, and the DVH figure draws the curves its metrics are read from."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from ctan.errors import CtanError
from ctan.metrics import dose as dose_metrics
from ctan.plots import (
    comparison_delta_figure,
    dvh_figure,
    learning_curves_figure,
    plot_comparison_cost,
    plot_comparison_delta,
    plot_delta_mtl,
    plot_dvh,
    plot_examples,
    plot_learning_curves,
    write_metric_table,
)
from ctan.tasks import Task

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path: Path) -> bool:
    """A PNG with something drawn: not one flat colour."""
    if not (path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG):
        return False
    from matplotlib.image import imread

    pixels = imread(path)[..., :3]
    return float(pixels.std()) > 0.02 and float((pixels < 0.5).mean()) > 0.001


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


def test_metric_table_bolds_every_tied_best_and_none_in_a_full_tie() -> None:
    """After a short run every model had balanced accuracy 1/7: STL alone was bold, as if it had won."""
    import pandas as pd

    from ctan.plots import metric_table_html

    rows = [
        {"row_type": "metric", "dataset": "d", "architecture": a, "seed": 0, "task": t, "metric": m,
         "value": v, "higher_is_better": True}
        for a, dice in (("stl", 0.6), ("hps", 0.7), ("ctan", 0.7))
        for t, m, v in (("lesion", "dice", dice), ("diagnosis", "balanced_accuracy", 1 / 7))
    ]  # fmt: skip
    html = metric_table_html(pd.DataFrame(rows))
    assert "<td>dice ↑</td><td>0.6</td><td><b>0.7</b></td><td><b>0.7</b></td>" in html
    assert "<td>balanced_accuracy ↑</td><td>0.1429</td><td>0.1429</td><td>0.1429</td>" in html


def test_summary_figures_reject_other_csv(tmp_path: Path) -> None:
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(CtanError, match="not a ctan summary"):
        plot_delta_mtl(other, tmp_path / "delta.png")


def _edited(summary: Path, out: Path, edit) -> Path:
    """A copy of a summary with ``edit(rows)`` applied to its rows (dicts)."""
    with open(summary, newline="") as fh:
        reader = csv.DictReader(fh)
        fields, rows = list(reader.fieldnames or []), list(reader)
    rows = edit(rows)
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return out


def _plot_summary(capsys, summary: Path, figure: Path, table: Path) -> tuple[int, str, str]:
    from ctan.cli import main

    code = main(["plot-summary", str(summary), "--figure", str(figure), "--table", str(table)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _first_metric(rows: list[dict]) -> int:
    return next(i for i, r in enumerate(rows) if r["row_type"] == "metric")


@pytest.mark.parametrize(
    "edit, problem",
    [
        # An empty file: pandas' EmptyDataError before.
        (None, "is empty"),
        # A Δ row given twice (a summary of a run with an architecture listed twice): a TypeError before.
        (lambda rows: [*rows, next(r for r in rows if r["row_type"] == "delta_mtl")], "repeats line"),
        # A metric row given twice: counted as a third seed, changing the mean, before.
        (lambda rows: [*rows, rows[_first_metric(rows)]], "line 32 repeats line 2"),
        # Not a number: a TypeError from pandas' aggregation before, after the figure was written.
        (lambda rows: [{**r, "value": "abc"} if i == 3 else r for i, r in enumerate(rows)], "line 5: value"),
        # One seed's row missing: the cell silently showed the other seed's value.
        (lambda rows: rows[:2] + rows[3:], "no metric row for openkbp_demo stl seed 1 structures/dice"),
        # STL's direction flipped: the first row's direction decided the bold for every architecture.
        (
            lambda rows: [
                {**r, "higher_is_better": False}
                if r["architecture"] == "stl" and r["metric"] == "dice"
                else r
                for r in rows
            ],
            "a metric has one direction",
        ),
    ],
)
def test_plot_summary_refuses_a_damaged_summary_and_writes_nothing(tmp_path: Path, capsys, edit, problem):
    summary = _summary(tmp_path / "summary.csv")
    bad = tmp_path / "bad.csv"
    if edit is None:
        bad.write_text("")
    else:
        _edited(summary, bad, edit)
    out = tmp_path / "out"
    code, _, err = _plot_summary(capsys, bad, out / "delta.png", out / "table.html")
    assert code == 2
    assert err.startswith(f"ctan: error: {bad}: ") and problem in err and len(err.splitlines()) == 1
    assert not out.exists() or not list(out.iterdir())


def test_plot_summary_writes_both_outputs_or_neither(tmp_path: Path, capsys):
    summary = _summary(tmp_path / "summary.csv")
    # No per-task metric rows: the table fails, and the figure (written first before) must not be left.
    only_delta = _edited(
        summary, tmp_path / "delta_only.csv", lambda rows: [r for r in rows if r["row_type"] != "metric"]
    )
    code, _, err = _plot_summary(capsys, only_delta, tmp_path / "delta.png", tmp_path / "table.html")
    assert code == 2 and "no per-task metric rows" in err
    assert not (tmp_path / "delta.png").exists() and not (tmp_path / "table.html").exists()
    # --table is a folder: refused before any work (an IsADirectoryError after the figure before).
    (tmp_path / "folder").mkdir()
    code, _, err = _plot_summary(capsys, summary, tmp_path / "delta.png", tmp_path / "folder")
    assert code == 2 and f"{tmp_path / 'folder'}: is a folder" in err
    assert not (tmp_path / "delta.png").exists() and not list((tmp_path / "folder").iterdir())
    # An unknown figure format: one line, not matplotlib's ValueError.
    code, _, err = _plot_summary(capsys, summary, tmp_path / "delta.txt", tmp_path / "table.html")
    assert code == 2 and "delta.txt: not a figure format" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["delta_only.csv", "folder", "summary.csv"]


def test_plot_summary_prints_the_figure_it_wrote(tmp_path: Path, capsys):
    """matplotlib adds .png to a name without a suffix: the path printed is that file."""
    summary = _summary(tmp_path / "summary.csv")
    code, out, _ = _plot_summary(capsys, summary, tmp_path / "noext", tmp_path / "table.html")
    assert code == 0
    assert out.splitlines() == [str(tmp_path / "noext.png"), str(tmp_path / "table.html")]
    assert _is_png(tmp_path / "noext.png") and not (tmp_path / "noext").exists()
    assert not list(tmp_path.glob(".*.tmp"))


# --- learning curves: one axis per metric ------------------------------------------------------------


def test_learning_curves_give_each_metric_its_own_axis_and_mark_the_kept_epoch_inside() -> None:
    fig = learning_curves_figure(_history(epochs=40 // 10 * 10) | {"best_epoch": 40})
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["loss", "dose: mae", "structures: dice"]
    assert axes[1].get_ylabel() == "validation mae (Gy)"
    assert axes[2].get_ylim() == pytest.approx((-0.02, 1.02))  # Dice on its own 0-1 scale
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw_without_rendering()
    for ax in axes:
        (label,) = [t for t in ax.texts if "epoch 40" in t.get_text()]
        box, frame = label.get_window_extent(renderer), ax.get_window_extent(renderer)
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1, "the kept-epoch label leaves its axes"


# --- example predictions: the diff panel, a title -----------------------------------------------------


def test_examples_show_the_dose_difference_and_the_title(tmp_path: Path) -> None:
    image = np.random.default_rng(0).random((1, 6, 12, 12), dtype=np.float32)
    dose = np.zeros((1, 6, 12, 12), np.float32)
    dose[:, 2:4, 3:9, 3:9] = 60
    structures = np.zeros((1, 6, 12, 12), np.float32)
    structures[0, :, 4:8, 4:8] = 1
    tasks = [
        Task("dose", "regression", "dose"),
        Task("structures", "segmentation", "structures", channels=1, multilabel=True),
    ]
    out = plot_examples(
        image,
        {"dose": dose, "structures": structures},
        {"dose": dose * 1.1, "structures": structures},
        tasks,
        tmp_path / "ex.png",
        title="case 3, the median dose score of 5 test cases (2 Gy)",
        structure_names=["PTV70"],
    )
    assert _is_png(out)


# --- DVH: the curves the scores are computed from -----------------------------------------------------


def _patient():
    rng = np.random.default_rng(4)
    shape = (8, 10, 10)
    reference = np.zeros(shape)
    reference[1:7, 2:8, 2:8] = 70 - 8 * rng.random((6, 6, 6))
    reference[:, :, :2] = 20 * rng.random((8, 10, 2))
    predicted = np.clip(reference + rng.normal(0, 3, shape), 0, None)
    structures = {
        "PTV70": np.zeros(shape, bool),
        "SpinalCord": np.zeros(shape, bool),
        "Brainstem": np.zeros(shape, bool),  # not contoured: left out, as the metrics do
    }
    structures["PTV70"][2:6, 3:7, 3:7] = True
    structures["SpinalCord"][:, 4:6, 0:3] = True
    return reference, predicted, structures


def test_dvh_draws_the_curves_the_metrics_are_read_from(tmp_path: Path) -> None:
    reference, predicted, structures = _patient()
    voxel = (2.5, 2.5, 2.0)  # 12.5 mm³: D_0.1cc is the hottest 8 voxels
    oars, targets = ("SpinalCord", "Brainstem"), ("PTV70",)
    fig = dvh_figure(reference, predicted, structures, voxel, oars, targets)
    curves_ax, errors_ax = fig.axes[:2]
    lines = {line.get_label(): line for line in curves_ax.get_lines()}
    assert set(lines) == {f"{r} {w}" for r in ("PTV70", "SpinalCord") for w in ("reference", "predicted")}
    scored = dose_metrics.score_patient(reference, predicted, reference > 0, structures, voxel)
    for what, dose, metrics in (
        ("reference", reference, scored["reference_metrics"]),
        ("predicted", predicted, scored["predicted_metrics"]),
    ):
        for roi in ("PTV70", "SpinalCord"):
            x, y = lines[f"{roi} {what}"].get_data()
            expected = dose_metrics.dvh_curve(dose, structures[roi])
            np.testing.assert_array_equal(x, expected[0])
            np.testing.assert_array_equal(y, expected[1])
            # Every scored DVH metric is a point of the plotted curve.
            volumes = dose_metrics.dvh_metric_volumes(int(structures[roi].sum()), voxel)
            for (r, metric), value in metrics.items():
                if r == roi and metric != "mean":
                    on_curve = dose_metrics.dose_at_volume((np.asarray(x), np.asarray(y)), volumes[metric])
                    assert on_curve == pytest.approx(value, abs=1e-9), (roi, metric)
    # The bars are the signed errors whose mean magnitude is the patient's DVH score.
    bars = [patch.get_width() for patch in errors_ax.patches]
    expected = [scored["predicted_metrics"][k] - v for k, v in scored["reference_metrics"].items()]
    assert bars == pytest.approx(expected)
    assert np.mean(np.abs(bars)) == pytest.approx(scored["dvh_score"])
    assert f"{scored['dvh_score']:.2f} Gy" in errors_ax.get_title()


def test_dvh_figure_is_written(tmp_path: Path) -> None:
    reference, predicted, structures = _patient()
    out = plot_dvh(
        reference,
        predicted,
        structures,
        (2.5, 2.5, 2.0),
        ("SpinalCord",),
        ("PTV70",),
        tmp_path / "dvh.png",
        title="pt_1, the median dose score",
    )
    assert _is_png(out)


def test_dvh_needs_a_contoured_structure(tmp_path: Path) -> None:
    reference, predicted, structures = _patient()
    with pytest.raises(CtanError, match="no contoured structure"):
        dvh_figure(reference, predicted, structures, (1, 1, 1), ("Brainstem",), ())


def test_dvh_curve_of_one_voxel_and_of_none() -> None:
    one = np.zeros((2, 2))
    one[0, 0] = 1
    x, y = dose_metrics.dvh_curve(np.full((2, 2), 5.0), one)
    assert list(x) == [5.0] and list(y) == [100.0]
    assert dose_metrics.dose_at_volume(dose_metrics.dvh_curve(one, np.zeros((2, 2))), 95) != 0  # nan


# --- Δ_MTL with seeds as points, training cost --------------------------------------------------------


def _comparison(per_seed: list[float], ci: tuple[float, float]) -> dict:
    entry = {
        "delta_mtl": float(np.mean(per_seed)),
        "per_seed": per_seed,
        "ci_low": ci[0],
        "ci_high": ci[1],
    }
    cost = {"step_seconds": 0.2, "peak_memory_mib": 600.0}
    return {
        "datasets": {
            d: {"delta_mtl": {"hps": entry, "ctan": entry}, "cost": {"stl": cost, "hps": cost, "ctan": cost}}
            for d in ("openkbp_demo", "ham10000_demo")
        },
        "mean_delta_mtl": {"hps": entry["delta_mtl"], "ctan": entry["delta_mtl"]},
        "paper_delta_mtl": {"hps": 3.22, "ctan": 4.67},
    }


def test_delta_with_one_seed_draws_the_seed_and_no_empty_whisker(tmp_path: Path) -> None:
    fig = comparison_delta_figure(_comparison([2.0], (float("nan"), float("nan"))))
    (ax,) = fig.axes
    seeds = [c for c in ax.collections if c.get_gid() == "seeds"]
    assert [len(c.get_offsets()) for c in seeds] == [1] * 4  # 2 datasets x 2 architectures
    assert [type(c).__name__ for c in ax.containers] == ["BarContainer"] * 2  # no whiskers


def test_delta_with_seeds_and_interval(tmp_path: Path) -> None:
    fig = comparison_delta_figure(_comparison([1.0, 2.0, 4.0], (0.5, 4.5)))
    (ax,) = fig.axes
    seeds = [c for c in ax.collections if c.get_gid() == "seeds"]
    assert [len(c.get_offsets()) for c in seeds] == [3] * 4
    assert [type(c).__name__ for c in ax.containers].count("ErrorbarContainer") == 4
    assert _is_png(plot_comparison_delta(_comparison([1.0, 2.0, 4.0], (0.5, 4.5)), tmp_path / "d.png"))


def test_training_cost_is_written(tmp_path: Path) -> None:
    assert _is_png(plot_comparison_cost(_comparison([1.0], (0, 2)), tmp_path / "cost.png"))


# --- which test case the example figures show ---------------------------------------------------------


def test_the_example_is_the_case_with_the_median_score() -> None:
    from ctan.evaluation import median_case

    dose = Task("dose", "regression", "dose")
    rows = {"a": {"dose_score": 3.0}, "b": {"dose_score": 1.0}, "c": {"dose_score": float("nan")}}
    rows |= {"d": {"dose_score": 2.0}, "e": {"dose_score": 9.0}}
    case, phrase = median_case([dose], {"dose": rows})
    # Of the four finite scores 1, 2, 3, 9: the lower middle one.
    assert case == "d" and phrase == "case d, the median dose score of 4 test cases (2 Gy)"
    covid = Task("covid", "classification", "covid", classes=2)
    probs = {"x": {"probability": [0.9], "label": 0}, "y": {"probability": [0.6], "label": 1}}
    probs |= {"z": {"probability": [0.2], "label": 0}}  # p(true) = 0.1, 0.6, 0.8
    assert median_case([covid], {"covid": probs})[0] == "y"


def test_axial_flips_turn_every_world_to_radiology_view() -> None:
    """Anterior up, the patient's right on the viewer's left, from the direction matrix and the world."""
    from ctan.plots import axial_flips

    identity = np.eye(3).ravel()
    assert axial_flips(identity, "LPS") == (False, False)  # OpenKBP, STOIC as ITK writes most CTs
    assert axial_flips(identity, "RAS") == (True, True)  # canonical NIfTI: (S, A, R)
    assert axial_flips(np.diag([1.0, -1.0, 1.0]).ravel(), "LPS") == (True, False)
    assert axial_flips(np.diag([1.0, 1.0, -1.0]).ravel(), "RAS") == (True, False)
    sagittal = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=float).ravel()  # x runs along S
    assert axial_flips(sagittal, "RAS")[1] is False
    assert axial_flips(identity, None) == (False, False)  # photographs: as stored
    assert axial_flips((), "LPS") == (False, False)


def _rows_of(mask: np.ndarray) -> float:
    return float(np.nonzero(mask)[0].mean())


def test_the_real_nifti_ct_is_shown_anterior_up(shared_data) -> None:
    """The real abdomen CT, read as the NIfTI reader reads it: after `axial_flips` the spine (bone next
    to the body's centre line) lies below the body's centre, as in any radiology viewer."""
    import nibabel as nib

    from ctan.datasets import nifti_cases
    from ctan.plots import axial_flips

    path = shared_data / "nifti" / "example_ct.nii.gz"
    image = nib.load(path)
    volume = nifti_cases._zyx(image, path)
    _, _, direction = nifti_cases.geometry(nib.as_closest_canonical(image).affine)
    flips = axial_flips(direction, nifti_cases.WORLD)
    plane = volume[volume.shape[0] // 2]
    shown = plane[::-1] if flips[0] else plane
    shown = shown[:, ::-1] if flips[1] else shown
    body = shown > -300
    centre = shown.shape[1] // 2
    spine = (shown > 250) & (np.abs(np.arange(shown.shape[1]) - centre) < shown.shape[1] // 10)[None]
    assert spine.sum() > 20
    assert _rows_of(spine) > _rows_of(body)  # without the flips it lies above: upside down


def test_openkbp_sample_is_shown_anterior_up_as_stored(shared_data, tmp_path) -> None:
    """OpenKBP is stored LPS with an identity direction: no flips, and the spinal cord below the
    mandible (posterior) on the real sample."""
    import tarfile

    from ctan.datasets import openkbp
    from ctan.plots import axial_flips

    with tarfile.open(shared_data / "openkbp-sample.tar.xz") as tar:
        members = [m for m in tar.getmembers() if "/pt_1/" in m.name or m.name.endswith("/pt_1")]
        tar.extractall(tmp_path, members=members, filter="data")
    root = next(tmp_path.rglob("provided-data")).parent
    ref = next(r for r in openkbp.list_cases(root) if r.case_id == "pt_1")
    case = openkbp.read_case(root, ref)
    assert axial_flips(case.direction, openkbp.WORLD) == (False, False)
    names = list(openkbp.STRUCTURES)
    masks = case.dense["structures"]
    cord, mandible = masks[names.index("SpinalCord")], masks[names.index("Mandible")]
    assert _rows_of(cord.any(axis=0)) > _rows_of(mandible.any(axis=0))


@pytest.mark.parametrize("name", ["Lung_Dx-A0001.mha", "Lung_Dx-A0002_128.mha"])
def test_the_real_chest_cts_are_shown_anterior_up(shared_data, name) -> None:
    """The real chest CTs, read as the STOIC reader reads them (LPS): the spine below the body's centre."""
    from ctan.datasets import stoic
    from ctan.plots import axial_flips

    volume, _, _, direction = stoic.read_ct(shared_data / "ct-samples" / name)
    flips = axial_flips(direction, stoic.WORLD)
    plane = volume[volume.shape[0] // 2]
    shown = plane[::-1] if flips[0] else plane
    shown = shown[:, ::-1] if flips[1] else shown
    centre = shown.shape[1] // 2
    spine = (shown > 250) & (np.abs(np.arange(shown.shape[1]) - centre) < shown.shape[1] // 10)[None]
    assert spine.sum() > 20
    assert _rows_of(spine) > _rows_of(shown > -300)
