"""OpenKBP dose metrics and the challenge's sparse CSV format, exactly as the reference code defines them.

Reference: github.com/ababier/open-kbp, ``provided_code/dose_evaluation_class.py`` (``DoseEvaluator``),
``provided_code/utils.py`` (``load_file``, ``sparse_vector_function``) and ``data_loader.py``.
What the reference does, and so what we do:

- **Dose score** per patient: ``Σ|reference − prediction| / Σ possible_dose_mask`` where the sum in the
  numerator runs over the *whole* grid (it is not masked); the challenge pipeline multiplies every
  prediction by the possible-dose mask before writing it, and the reference dose is zero outside the
  mask, so in practice it is the mean absolute error inside the mask. The dose score of a set is the
  (NaN-ignoring) mean over patients.
- **DVH metrics** per patient and contoured ROI, computed with the *reference's* ROI masks for both
  doses: OARs ``D_0.1_cc`` and ``mean``; targets ``D_99``, ``D_95``, ``D_1`` (percentiles 1, 5, 99 with
  numpy's default linear interpolation). ``D_0.1_cc`` is the percentile ``100 − n / roi_voxels · 100``
  with ``n = max(1, round(100 / voxel_volume_mm3))`` (numpy rounding, half to even). ROIs whose mask is
  absent or empty are skipped.
- **DVH score**: ``nanmean(|reference_metrics − predicted_metrics|)`` over the whole patients × metrics
  table, i.e. pooled over every (patient, ROI, metric) value that exists, *not* averaged per patient
  first.

One extension, where the reference would crash: an OAR smaller than ``n`` voxels gives a negative
percentile; we clip it to 0 (the hottest 0.1 cc then covers the whole ROI, so D_0.1cc is its minimum).

Files and axes. The CSV index is the flat C-order index into the challenge's 128³ array ``(i, j, k)``
= (y, x, −z); our arrays are ``(z, y, x)`` with ``ours[z, y, x] = raw[y, x, 127 − z]``. The mapping
(`from_challenge_grid` / `to_challenge_grid`) and the CSV parser are the OpenKBP reader's
(`ctan.datasets.openkbp`), so that reading a case and writing a prediction can never disagree.
The DVH metrics do not depend on the axis order; scoring works in the challenge's order throughout.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from ctan.datasets.openkbp import (
    GRID,
    OARS,
    STRUCTURES,
    TARGETS,
    read_spacing,
    read_sparse,
    to_challenge_grid,
)
from ctan.errors import CtanError

ROIS = STRUCTURES  # Brainstem … Mandible, PTV56, PTV63, PTV70: the challenge's order
OAR_METRICS = ("D_0.1_cc", "mean")
TARGET_METRICS = ("D_99", "D_95", "D_1")
_PATIENT_ID = re.compile(r"^pt_(\d+)$")

DvhMetrics = dict[tuple[str, str], float]


# --- the challenge's file format ---------------------------------------------------------------------


def _first_row(path: Path) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            handle.readline()
            return handle.readline().rstrip("\r\n")
    except UnicodeDecodeError as exc:
        # The reader's diagnosis first ("is gzip-compressed, not a CSV", binary data): one message
        # for reference and predicted files alike.
        read_sparse(path, with_values=True)
        raise CtanError(path, f"cannot read OpenKBP sparse CSV: {exc}") from exc
    except OSError as exc:
        raise CtanError(path, f"cannot read OpenKBP sparse CSV: {exc}") from exc


def read_sparse_csv(path: Path, shape: tuple[int, ...] = GRID, mask: bool | None = None) -> np.ndarray:
    """Read one OpenKBP sparse CSV into a dense array in the challenge's own axis order ``(i, j, k)``.

    Parsing and checks are the OpenKBP reader's (`ctan.datasets.openkbp`), so ctan has one parser of
    the format. Value files (``dose``, ``ct``, predictions) give float64 values, zero elsewhere; mask
    files (empty ``data`` column) a uint8 mask. ``mask=None`` decides as the reference's ``load_file``
    does: an empty value means a mask. A file with no rows (an all-zero prediction) is all zeros.
    ``shape`` is the challenge's 128³ grid (smaller grids for tests).
    """
    path = Path(path)
    size = int(np.prod(shape))
    if size > int(np.prod(GRID)):
        raise CtanError(path, f"grid {shape} is larger than the OpenKBP grid {GRID}")
    first = _first_row(path)
    if mask is None:
        mask = first.endswith(",")
    # A header-only file has an empty, non-numeric data column: read it as a mask (it checks the same).
    indices, values = read_sparse(path, with_values=not mask and first != "")
    if indices.size and indices.max() >= size:
        raise CtanError(path, f"voxel index {int(indices.max())} lies outside the {shape} grid")
    flat = np.zeros(size, dtype=np.uint8 if mask else np.float64)
    if indices.size:
        flat[indices] = 1 if mask else values
    return flat.reshape(shape)


def read_dose_csv(path: Path) -> np.ndarray:
    """`read_sparse_csv` of a dose file (reference or prediction), refusing negative dose: a dose is
    >= 0 Gy and the format cannot hold less (`write_dose_csv`), so one is a sign or unit error, which
    would otherwise be scored as a plausible number."""
    dose = read_sparse_csv(path, mask=False)
    low = float(dose.min())
    if low < 0:
        voxels = int((dose < 0).sum())
        raise CtanError(path, f"negative dose {low:g} Gy in {voxels} voxel(s); a dose is >= 0 Gy")
    return dose


def write_dose_csv(path: Path, dose: np.ndarray, axes: Literal["zyx", "challenge"] = "zyx") -> Path:
    """Write a dose (Gy) as a challenge prediction file, as the reference's ``sparse_vector_function``.

    ``dose`` is a 3D array on the OpenKBP grid, in our ``(z, y, x)`` order by default (mapped with
    `ctan.datasets.openkbp.to_challenge_grid`, the inverse of what the reader does) or in the
    challenge's own order with ``axes="challenge"``. Only voxels with dose > 0 are written, in flat
    C order of the challenge array, as ``,data`` rows (pandas' CSV, like the reference). Negative
    values cannot be represented in the format and are left out (zero). Mask the prediction with the
    possible-dose mask first, as the challenge pipeline does.
    """
    path = Path(path)
    dose = np.asarray(dose)
    if dose.ndim != 3:
        raise CtanError(path, f"dose to write must be 3D, got shape {dose.shape}")
    if axes not in ("zyx", "challenge"):
        raise CtanError(path, f"unknown axis order {axes!r}")
    if not np.all(np.isfinite(dose)):
        raise CtanError(path, "dose to write contains NaN or infinite values")
    native = to_challenge_grid(dose) if axes == "zyx" else dose
    flat = np.ascontiguousarray(native).reshape(-1)
    keep = flat > 0
    frame = pd.DataFrame(data=flat[keep], index=np.flatnonzero(keep), columns=["data"])
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path)
    return path


# --- metrics on arrays ----------------------------------------------------------------------------


def _finite_dose(dose: np.ndarray, which: str) -> np.ndarray:
    """``dose`` as float64, refused if any voxel is NaN or infinite: a NaN makes a dose score or DVH
    metric NaN, and the challenge's ``nanmean`` would then silently leave it out."""
    dose = np.asarray(dose, dtype=np.float64)
    bad = int(np.count_nonzero(~np.isfinite(dose)))
    if bad:
        raise CtanError(None, f"{which} dose has {bad} NaN or infinite voxel(s)")
    return dose


def _voxel_volume(voxel_dims_mm: Sequence[float]) -> float:
    dims = np.asarray(voxel_dims_mm, dtype=np.float64)
    if dims.size == 0 or not np.all(np.isfinite(dims)) or np.any(dims <= 0):
        raise CtanError(None, f"voxel dimensions must be positive numbers (mm), got {dims.tolist()}")
    return float(np.prod(dims))


def dose_score(reference: np.ndarray, prediction: np.ndarray, possible_dose_mask: np.ndarray) -> float:
    """Per-patient OpenKBP dose score: ``Σ|reference − prediction| / Σ possible_dose_mask`` (Gy).

    The numerator runs over the whole grid, as in the reference: mask predictions before scoring.
    NaN for an empty mask (0/0); a mask of another shape or a non-finite dose is an error (a NaN
    score would be skipped by the mean over patients, scoring a broken prediction as no prediction).
    """
    reference = _finite_dose(reference, "reference")
    prediction = _finite_dose(prediction, "predicted")
    mask = np.asarray(possible_dose_mask)
    if not reference.shape == prediction.shape == mask.shape:
        raise CtanError(
            None,
            f"dose shapes differ: reference {reference.shape}, prediction {prediction.shape}, "
            f"possible-dose mask {mask.shape}",
        )
    voxels = float(np.sum(mask.astype(bool)))
    if voxels == 0:
        return float("nan")
    return float(np.sum(np.abs(reference - prediction)) / voxels)


def dvh_metrics(
    dose: np.ndarray,
    structures: Mapping[str, np.ndarray],
    voxel_dims_mm: Sequence[float],
    oars: Sequence[str] = OARS,
    targets: Sequence[str] = TARGETS,
) -> DvhMetrics:
    """The challenge's DVH metrics of one dose: ``{(structure, metric): Gy}``.

    ``structures`` maps ROI names to masks on the dose grid; names outside ``oars`` and ``targets``
    (OpenKBP's by default; bring-your-own cases pass their own) are ignored, absent or empty ROIs are
    skipped. ``voxel_dims_mm`` only enters through the voxel volume. A NaN or infinite dose is an
    error: its DVH errors would be NaN, and the DVH score's ``nanmean`` would drop them unseen.
    """
    dose = _finite_dose(dose, "the")
    voxels_in_tenth_cc = max(1.0, float(np.round(100.0 / _voxel_volume(voxel_dims_mm))))
    out: DvhMetrics = {}
    for roi in (*oars, *targets):
        mask = structures.get(roi)
        if mask is None:
            continue
        mask = np.asarray(mask).astype(bool)
        if mask.shape != dose.shape:
            raise CtanError(None, f"{roi} mask shape {mask.shape} differs from dose shape {dose.shape}")
        roi_dose = dose[mask]
        if roi_dose.size == 0:
            continue
        if roi in oars:
            q = max(0.0, 100.0 - voxels_in_tenth_cc / roi_dose.size * 100.0)
            out[(roi, "D_0.1_cc")] = float(np.percentile(roi_dose, q))
            out[(roi, "mean")] = float(roi_dose.mean())
        else:
            out[(roi, "D_99")] = float(np.percentile(roi_dose, 1))
            out[(roi, "D_95")] = float(np.percentile(roi_dose, 5))
            out[(roi, "D_1")] = float(np.percentile(roi_dose, 99))
    return out


def dvh_curve(dose: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative DVH of one ROI: ``(dose_gy, volume_pct)``, ``volume_pct`` falling from 100 to 0.

    The ROI's voxel doses sorted ascending, the i-th of n at volume ``100 · (n − 1 − i) / (n − 1)`` %:
    the polyline on which numpy's linearly interpolated percentile lies, so ``D_x`` of
    `dvh_metrics` (``np.percentile(roi_dose, 100 − x)``) is exactly this curve read at x % volume
    (`dose_at_volume`). Empty arrays for an empty mask; a one-voxel ROI is the single point (d, 100).
    """
    roi_dose = np.sort(np.asarray(dose, dtype=np.float64)[np.asarray(mask).astype(bool)])
    n = roi_dose.size
    volume = 100.0 * np.arange(n - 1, -1, -1, dtype=np.float64) / (n - 1) if n > 1 else np.full(n, 100.0)
    return roi_dose, volume


def dose_at_volume(curve: tuple[np.ndarray, np.ndarray], volume_pct: float) -> float:
    """The dose covering ``volume_pct`` % of the ROI, read off a `dvh_curve` by linear interpolation."""
    doses, volume = curve
    if doses.size == 0:
        return float("nan")
    return float(np.interp(volume_pct, volume[::-1], doses[::-1]))


def dvh_metric_volumes(roi_voxels: int, voxel_dims_mm: Sequence[float]) -> dict[str, float]:
    """Where each DVH metric of `dvh_metrics` sits on the curve: ``{metric: volume %}`` (OARs' mean has
    no volume). D_0.1_cc: the hottest 0.1 cc, i.e. ``n / roi_voxels · 100`` % (at most 100 %)."""
    voxels_in_tenth_cc = max(1.0, float(np.round(100.0 / _voxel_volume(voxel_dims_mm))))
    return {
        "D_0.1_cc": min(100.0, voxels_in_tenth_cc / roi_voxels * 100.0),
        "D_99": 99.0,
        "D_95": 95.0,
        "D_1": 1.0,
    }


def dvh_errors(reference_metrics: DvhMetrics, predicted_metrics: DvhMetrics) -> DvhMetrics:
    """``|reference − prediction|`` for every metric the reference has (the prediction must have it too)."""
    missing = sorted(set(reference_metrics) - set(predicted_metrics))
    if missing:
        raise CtanError(None, f"predicted DVH metrics lack {missing[:3]}{'...' if len(missing) > 3 else ''}")
    return {key: abs(value - predicted_metrics[key]) for key, value in reference_metrics.items()}


def dvh_score(
    reference_metrics: DvhMetrics | Sequence[DvhMetrics], predicted_metrics: DvhMetrics | Sequence[DvhMetrics]
) -> float:
    """OpenKBP DVH score: the mean absolute difference pooled over all patients and metrics.

    Pass one patient's metrics, or a sequence of patients' (same order on both sides). As in the
    reference (``nanmean`` over the patients × metrics table), every existing (patient, ROI, metric)
    value weighs the same: patients with more contoured ROIs weigh more. NaN when nothing is contoured.
    """
    if isinstance(reference_metrics, Mapping):
        reference_metrics, predicted_metrics = [reference_metrics], [predicted_metrics]  # type: ignore[list-item]
    if len(reference_metrics) != len(predicted_metrics):
        raise CtanError(None, "reference and predicted DVH metrics cover different numbers of patients")
    errors = [
        e
        for r, p in zip(reference_metrics, predicted_metrics, strict=True)
        for e in dvh_errors(r, p).values()
    ]
    values = np.asarray(errors, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def dvh_count(reference_metrics: DvhMetrics, predicted_metrics: DvhMetrics) -> int:
    """Number of finite DVH errors: a patient's weight in the pooled DVH score."""
    return int(sum(np.isfinite(e) for e in dvh_errors(reference_metrics, predicted_metrics).values()))


def score_patient(
    reference_dose: np.ndarray,
    predicted_dose: np.ndarray,
    possible_dose_mask: np.ndarray,
    structures: Mapping[str, np.ndarray],
    voxel_dims_mm: Sequence[float],
) -> dict[str, object]:
    """Dose score, DVH metrics of both doses and the patient's own DVH score (all arrays on one grid)."""
    reference_metrics = dvh_metrics(reference_dose, structures, voxel_dims_mm)
    predicted_metrics = dvh_metrics(predicted_dose, structures, voxel_dims_mm)
    return {
        "dose_score": dose_score(reference_dose, predicted_dose, possible_dose_mask),
        "dvh_score": dvh_score(reference_metrics, predicted_metrics),
        # How many DVH errors the patient contributes to the pooled score (to re-pool a resample).
        "dvh_count": dvh_count(reference_metrics, predicted_metrics),
        "reference_metrics": reference_metrics,
        "predicted_metrics": predicted_metrics,
    }


# --- challenge folders ----------------------------------------------------------------------------


def _patient_number(patient_id: str) -> int:
    match = _PATIENT_ID.match(patient_id)
    return int(match.group(1)) if match else -1


def _sorted_patients(ids: Sequence[str]) -> list[str]:
    return sorted(ids, key=lambda pt: (_patient_number(pt), pt))


def read_reference_patient(folder: Path) -> dict[str, object]:
    """One ``pt_*/`` folder of the challenge data, for scoring: dose, possible-dose mask, voxel size, ROIs.

    Arrays stay in OpenKBP's axis order (the metrics do not depend on it).
    """
    folder = Path(folder)
    for name in ("dose.csv", "possible_dose_mask.csv", "voxel_dimensions.csv"):
        if not (folder / name).is_file():
            raise CtanError(folder / name, "reference patient file is missing")
    structures = {
        roi: read_sparse_csv(folder / f"{roi}.csv", mask=True).astype(bool)
        for roi in ROIS
        if (folder / f"{roi}.csv").is_file()
    }
    possible = read_sparse_csv(folder / "possible_dose_mask.csv", mask=True)
    if not possible.any():  # the dose score is an error per voxel of this mask
        raise CtanError(folder / "possible_dose_mask.csv", "lists no voxels: the dose score would be 0/0")
    return {
        "dose": read_dose_csv(folder / "dose.csv"),
        "possible_dose_mask": possible,
        "voxel_dimensions": read_spacing(folder / "voxel_dimensions.csv"),  # only their product matters
        "structures": structures,
    }


def score_directories(reference: Path | list[Path], predictions: Path) -> dict[str, object]:
    """Score a folder of ``pt_*.csv`` predictions against a folder of reference ``pt_*/`` patients
    (or several: an external test set made of a whole release's split folders).

    Returns ``{"dose_score", "dvh_score", "patients": {pt: {"dose_score", "dvh_score", "dvh_count"}},
    "n_patients"}``
    with the challenge's aggregation (mean dose score over patients; DVH score pooled over all
    patients' metrics). Every reference patient needs a prediction and every prediction a reference.
    A patient with no contoured ROI has no DVH metric: the reference's row of NaN adds nothing to its
    ``nanmean``; here its ``dvh_score`` is None (JSON ``null``, not the invalid ``NaN``) and its
    ``dvh_count`` 0. If no patient has one, the DVH score is undefined: an error naming the folder.
    """
    folders = [Path(f) for f in reference] if isinstance(reference, list) else [Path(reference)]
    reference, predictions = folders[0], Path(predictions)
    for folder in folders:
        if not folder.is_dir():
            raise CtanError(folder, "reference folder does not exist")
    if not predictions.is_dir():
        raise CtanError(predictions, "predictions folder does not exist")
    where = {p.name: p for f in folders for p in f.iterdir() if p.is_dir() and _PATIENT_ID.match(p.name)}
    ref_ids = list(where)
    pred_ids = [p.stem for p in predictions.glob("pt_*.csv") if p.is_file() and _PATIENT_ID.match(p.stem)]
    if not ref_ids:
        raise CtanError(reference, "no reference patient folders pt_*/ found")
    missing = _sorted_patients(sorted(set(ref_ids) - set(pred_ids)))
    if missing:
        raise CtanError(predictions, f"no prediction for reference patient(s) {', '.join(missing)}")
    extra = _sorted_patients(sorted(set(pred_ids) - set(ref_ids)))
    if extra:
        raise CtanError(
            predictions / f"{extra[0]}.csv", f"prediction has no reference patient in {reference}"
        )

    patients: dict[str, dict[str, float | None]] = {}
    all_reference: list[DvhMetrics] = []
    all_predicted: list[DvhMetrics] = []
    for pt in _sorted_patients(ref_ids):
        ref = read_reference_patient(where[pt])
        predicted = read_dose_csv(predictions / f"{pt}.csv")
        result = score_patient(
            ref["dose"],  # type: ignore[arg-type]
            predicted,
            ref["possible_dose_mask"],  # type: ignore[arg-type]
            ref["structures"],  # type: ignore[arg-type]
            ref["voxel_dimensions"],  # type: ignore[arg-type]
        )
        patients[pt] = {
            "dose_score": result["dose_score"],  # type: ignore[dict-item]
            "dvh_score": result["dvh_score"] if result["dvh_count"] else None,  # type: ignore[dict-item]
            "dvh_count": result["dvh_count"],  # type: ignore[dict-item]
        }
        all_reference.append(result["reference_metrics"])  # type: ignore[arg-type]
        all_predicted.append(result["predicted_metrics"])  # type: ignore[arg-type]
    if not any(all_reference):
        names = ", ".join(f"{roi}.csv" for roi in ROIS)
        raise CtanError(
            reference,
            f"no reference patient has a contoured ROI ({names}): the DVH score would be a mean of nothing",
        )

    dose_scores = np.asarray([p["dose_score"] for p in patients.values()], dtype=np.float64)
    finite = dose_scores[~np.isnan(dose_scores)]
    return {
        "dose_score": float(finite.mean()) if finite.size else float("nan"),
        "dvh_score": dvh_score(all_reference, all_predicted),
        "patients": patients,
        "n_patients": len(patients),
    }
