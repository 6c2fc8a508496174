"""`score_directories` against an independent port of the OpenKBP reference evaluator, on real patients.

The port below follows ababier/open-kbp ``provided_code`` (``utils.load_file``, ``DataLoader
.load_and_shape_data``, ``DoseEvaluator``): pandas parsing, ``np.put`` into (128, 128, 128, C) tensors,
DataFrames of DVH metrics and ``nanmean`` aggregation. It shares no code with ``ctan.metrics.dose``.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ctan.datasets.openkbp import from_challenge_grid
from ctan.metrics import dose as D

pytestmark = pytest.mark.realdata

PATIENTS = ("pt_242", "pt_246")
PREFIX = "open-kbp-sample/provided-data/test-pats/"


@pytest.fixture(scope="session")
def openkbp_two_patients(shared_data: Path, tmp_path_factory) -> Path:
    """The two test patients' folders, extracted from the sample archive (only those members)."""
    out = tmp_path_factory.mktemp("challenge")
    wanted = tuple(f"{PREFIX}{pt}/" for pt in PATIENTS)
    with tarfile.open(shared_data / "openkbp-sample.tar.xz", "r:xz") as archive:
        members = (m for m in archive if m.isfile() and m.name.startswith(wanted))
        archive.extractall(out, members=members, filter="data")
    root = out / PREFIX
    assert sorted(p.name for p in root.iterdir()) == sorted(PATIENTS)
    return root


# --- the reference, ported ----------------------------------------------------------------------------

ROIS = {
    "oars": ["Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx", "Mandible"],
    "targets": ["PTV56", "PTV63", "PTV70"],
}
FULL_ROI_LIST = ROIS["oars"] + ROIS["targets"]
SHAPE = (128, 128, 128)


def _load_file(path: Path):
    if path.stem == "voxel_dimensions":
        return np.loadtxt(path)
    df = pd.read_csv(path, index_col=0)
    if df.isnull().values.any():
        return np.array(df.index).squeeze()
    return {"indices": df.index.values, "data": df.data.values}


def _load_reference(folder: Path) -> dict:
    loaded = {f.stem: _load_file(f) for f in folder.iterdir() if f.suffix == ".csv" and f.stem != "ct"}
    masks = np.zeros((*SHAPE, len(FULL_ROI_LIST)))
    for roi_idx, roi in enumerate(FULL_ROI_LIST):
        if roi in loaded:
            np.put(masks, len(FULL_ROI_LIST) * loaded[roi] + roi_idx, 1)
    possible = np.zeros((*SHAPE, 1))
    np.put(possible, loaded["possible_dose_mask"], 1)
    dose = np.zeros((*SHAPE, 1))
    np.put(dose, loaded["dose"]["indices"], loaded["dose"]["data"])
    return {
        "dose": dose,
        "structure_masks": masks,
        "possible_dose_mask": possible,
        "voxel": loaded["voxel_dimensions"],
    }


def _load_prediction(path: Path) -> np.ndarray:
    loaded = _load_file(path)
    dose = np.zeros((*SHAPE, 1))
    np.put(dose, loaded["indices"], loaded["data"])
    return dose


def _reference_scores(reference: Path, predictions: Path) -> tuple[float, float, pd.Series]:
    metrics = {oar: ["D_0.1_cc", "mean"] for oar in ROIS["oars"]} | {
        t: ["D_99", "D_95", "D_1"] for t in ROIS["targets"]
    }
    columns = [(m, roi) for roi, ms in metrics.items() for m in ms]
    ids = sorted(p.name for p in reference.iterdir())
    dose_errors = pd.Series(index=ids, data=None, dtype=float)
    ref_df = pd.DataFrame(index=ids, columns=columns)
    pred_df = ref_df.copy()

    def dvh(df, pt, dose, batch):
        voxels_within_tenths_cc = np.maximum(1, np.round(100 / np.prod(batch["voxel"])))
        for roi in FULL_ROI_LIST:
            flat_mask = batch["structure_masks"][:, :, :, FULL_ROI_LIST.index(roi)].astype(bool).flatten()
            if not any(flat_mask):
                continue
            roi_dose = dose[flat_mask]
            for metric in metrics[roi]:
                if metric == "D_0.1_cc":
                    value = np.percentile(roi_dose, 100 - voxels_within_tenths_cc / len(roi_dose) * 100)
                elif metric == "mean":
                    value = roi_dose.mean()
                else:
                    value = np.percentile(roi_dose, {"D_99": 1, "D_95": 5, "D_1": 99}[metric])
                df.at[pt, (metric, roi)] = value

    for pt in ids:
        batch = _load_reference(reference / pt)
        reference_dose = batch["dose"].flatten()
        predicted_dose = _load_prediction(predictions / f"{pt}.csv").flatten()
        dvh(ref_df, pt, reference_dose, batch)
        dose_errors[pt] = np.sum(np.abs(reference_dose - predicted_dose)) / np.sum(
            batch["possible_dose_mask"]
        )
        dvh(pred_df, pt, predicted_dose, batch)
    dvh_errors = np.abs(ref_df - pred_df)
    return float(np.nanmean(dose_errors)), float(np.nanmean(dvh_errors.values.astype(float))), dose_errors


# --- the tests ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def perturbed_predictions(openkbp_two_patients: Path, tmp_path_factory) -> Path:
    """Each reference dose × 1.03 + N(0, 1 Gy), clipped at 0, written from our (z, y, x) order.

    Not masked: a little noise lands outside the possible-dose mask, which the reference counts.
    """
    out = tmp_path_factory.mktemp("predictions")
    rng = np.random.default_rng(0)
    for pt in PATIENTS:
        native = D.read_sparse_csv(openkbp_two_patients / pt / "dose.csv")
        mask = D.read_sparse_csv(openkbp_two_patients / pt / "possible_dose_mask.csv").astype(bool)
        stray = ~mask & (rng.uniform(size=native.shape) < 0.005)  # a little dose outside the mask
        noisy = np.where(mask, native * 1.03 + rng.normal(0, 1.0, native.shape), 0.0) + 0.5 * stray
        D.write_dose_csv(out / f"{pt}.csv", from_challenge_grid(np.clip(noisy, 0, None)))
    return out


def test_parser_reads_what_the_reference_loader_reads(openkbp_two_patients: Path):
    folder = openkbp_two_patients / PATIENTS[0]
    batch = _load_reference(folder)
    np.testing.assert_array_equal(D.read_sparse_csv(folder / "dose.csv"), batch["dose"][..., 0])
    np.testing.assert_array_equal(
        D.read_sparse_csv(folder / "possible_dose_mask.csv"), batch["possible_dose_mask"][..., 0]
    )
    for roi_idx, roi in enumerate(FULL_ROI_LIST):
        if (folder / f"{roi}.csv").is_file():
            np.testing.assert_array_equal(
                D.read_sparse_csv(folder / f"{roi}.csv"), batch["structure_masks"][..., roi_idx]
            )


def test_score_directories_equals_the_reference_evaluator(
    openkbp_two_patients: Path, perturbed_predictions: Path
):
    ours = D.score_directories(openkbp_two_patients, perturbed_predictions)
    dose_score, dvh_score, per_patient = _reference_scores(openkbp_two_patients, perturbed_predictions)
    assert ours["n_patients"] == 2
    assert ours["dose_score"] == pytest.approx(dose_score, rel=1e-12)
    assert ours["dvh_score"] == pytest.approx(dvh_score, rel=1e-12)
    for pt in PATIENTS:
        assert ours["patients"][pt]["dose_score"] == pytest.approx(per_patient[pt], rel=1e-12)
    assert 0.5 < ours["dose_score"] < 3.0 and ours["dvh_score"] > 0.1  # a real, non-trivial error


def test_perfect_prediction_scores_zero(openkbp_two_patients: Path, tmp_path: Path):
    for pt in PATIENTS:
        native = D.read_sparse_csv(openkbp_two_patients / pt / "dose.csv")
        D.write_dose_csv(tmp_path / f"{pt}.csv", native, axes="challenge")
    result = D.score_directories(openkbp_two_patients, tmp_path)
    assert result["dose_score"] == pytest.approx(0.0, abs=1e-12)
    assert result["dvh_score"] == pytest.approx(0.0, abs=1e-12)
