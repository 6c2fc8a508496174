"""OpenKBP dose metrics and sparse CSVs on hand-computed cases (no real data needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ctan.cli import main
from ctan.datasets.openkbp import from_challenge_grid, to_challenge_grid
from ctan.errors import CtanError
from ctan.metrics import dose as D

# --- dose score --------------------------------------------------------------------------------------


def _patient_arrays(seed: int = 0, shape=(6, 7, 8)):
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, dtype=np.uint8)
    mask[1:5, 2:6, 1:7] = 1
    reference = rng.uniform(0, 70, shape) * mask
    return reference, mask


def test_dose_score_constant_offset_equals_offset():
    reference, mask = _patient_arrays()
    prediction = (reference + 2.5) * mask
    assert D.dose_score(reference, prediction, mask) == pytest.approx(2.5)


def test_dose_score_perfect_is_zero():
    reference, mask = _patient_arrays()
    assert D.dose_score(reference, reference.copy(), mask) == 0.0


def test_dose_score_counts_dose_outside_the_mask_as_the_reference_does():
    # The reference divides Σ|ref − pred| over the whole grid by Σ mask: dose outside the mask counts.
    reference, mask = _patient_arrays()
    prediction = reference.copy()
    prediction[0, 0, 0] = mask.sum() * 1.0  # one voxel outside the mask
    assert mask[0, 0, 0] == 0
    assert D.dose_score(reference, prediction, mask) == pytest.approx(1.0)


def test_dose_score_empty_mask_is_nan_and_shape_mismatch_raises():
    reference, mask = _patient_arrays()
    assert np.isnan(D.dose_score(reference, reference, np.zeros_like(mask)))
    with pytest.raises(CtanError):
        D.dose_score(reference, reference[:-1], mask)


# --- DVH metrics --------------------------------------------------------------------------------------


def _roi(shape, n):
    mask = np.zeros(int(np.prod(shape)), dtype=bool)
    mask[:n] = True
    return mask.reshape(shape)


def test_dvh_metrics_hand_computed():
    shape = (5, 5, 5)
    dose = np.zeros(shape)
    flat = dose.reshape(-1)
    flat[:10] = np.arange(1, 11)  # OAR voxels hold 1..10 Gy
    oar = _roi(shape, 10)
    ptv = np.zeros(shape, dtype=bool)
    ptv.reshape(-1)[20:121] = True
    flat[20:121] = np.arange(1, 102)  # target voxels hold 1..101 Gy
    # voxel volume 5·5·2 = 50 mm³ -> n = round(100/50) = 2 voxels in 0.1 cc -> percentile 100 − 2/10·100 = 80
    metrics = D.dvh_metrics(dose, {"Brainstem": oar, "PTV70": ptv}, (5.0, 5.0, 2.0))
    assert metrics[("Brainstem", "D_0.1_cc")] == pytest.approx(1 + 0.8 * 9)  # 8.2
    assert metrics[("Brainstem", "mean")] == pytest.approx(5.5)
    assert metrics[("PTV70", "D_99")] == pytest.approx(2.0)  # percentile 1 of 1..101
    assert metrics[("PTV70", "D_95")] == pytest.approx(6.0)
    assert metrics[("PTV70", "D_1")] == pytest.approx(100.0)
    assert set(metrics) == {
        ("Brainstem", "D_0.1_cc"),
        ("Brainstem", "mean"),
        ("PTV70", "D_99"),
        ("PTV70", "D_95"),
        ("PTV70", "D_1"),
    }


def test_tenth_cc_voxel_count_rounds_half_to_even_and_is_at_least_one():
    shape = (4, 4, 4)
    dose = np.zeros(shape)
    dose.reshape(-1)[:10] = np.arange(1, 11)
    oar = _roi(shape, 10)
    # 40 mm³: 100/40 = 2.5 -> numpy rounds to 2 -> percentile 80
    assert D.dvh_metrics(dose, {"Larynx": oar}, (4.0, 5.0, 2.0))[("Larynx", "D_0.1_cc")] == pytest.approx(8.2)
    # 1000 mm³: 100/1000 rounds to 0 -> at least 1 voxel -> percentile 90
    assert D.dvh_metrics(dose, {"Larynx": oar}, (10.0, 10.0, 10.0))[("Larynx", "D_0.1_cc")] == pytest.approx(
        9.1
    )


def test_oar_smaller_than_a_tenth_cc_gives_its_minimum_instead_of_crashing():
    shape = (3, 3, 3)
    dose = np.zeros(shape)
    dose.reshape(-1)[:2] = [4.0, 7.0]
    # 1 mm³ voxels: 100 voxels per 0.1 cc, ROI of 2 voxels -> percentile clipped to 0
    metrics = D.dvh_metrics(dose, {"Mandible": _roi(shape, 2)}, (1.0, 1.0, 1.0))
    assert metrics[("Mandible", "D_0.1_cc")] == 4.0


def test_dvh_metrics_skip_missing_and_empty_rois_and_unknown_names():
    shape = (3, 3, 3)
    dose = np.ones(shape)
    metrics = D.dvh_metrics(
        dose, {"SpinalCord": np.zeros(shape, bool), "Body": np.ones(shape, bool)}, (3.0, 3.0, 3.0)
    )
    assert metrics == {}


def test_dvh_score_pools_all_values_rather_than_averaging_patients_first():
    ref_a = {("Brainstem", "mean"): 10.0}
    pred_a = {("Brainstem", "mean"): 11.0}  # error 1
    ref_b = {("PTV70", "D_99"): 60.0, ("PTV70", "D_95"): 65.0, ("PTV70", "D_1"): 72.0}
    pred_b = {("PTV70", "D_99"): 63.0, ("PTV70", "D_95"): 62.0, ("PTV70", "D_1"): 75.0}  # errors 3, 3, 3
    assert D.dvh_score([ref_a, ref_b], [pred_a, pred_b]) == pytest.approx((1 + 9) / 4)
    assert D.dvh_score(ref_a, pred_a) == pytest.approx(1.0)
    assert np.isnan(D.dvh_score([{}], [{}]))
    with pytest.raises(CtanError):
        D.dvh_score(ref_b, pred_a)


# --- sparse CSV format ---------------------------------------------------------------------------------


def test_write_dose_csv_matches_the_reference_writer_byte_for_byte(tmp_path: Path):
    rng = np.random.default_rng(1)
    native = rng.uniform(0, 70, (8, 9, 10)) * (rng.uniform(size=(8, 9, 10)) > 0.6)
    ours = D.write_dose_csv(tmp_path / "ours.csv", native, axes="challenge")
    # The reference: sparse_vector_function + DataFrame(..., columns=["data"]).to_csv
    reference = pd.DataFrame(
        data=native[native > 0].squeeze(), index=np.nonzero(native.flatten())[-1].squeeze(), columns=["data"]
    )
    reference.to_csv(tmp_path / "ref.csv")
    assert ours.read_bytes() == (tmp_path / "ref.csv").read_bytes()
    assert ours.read_text().startswith(",data\n")


def test_csv_round_trip_and_axis_mapping_are_the_readers(tmp_path: Path):
    rng = np.random.default_rng(2)
    zyx = rng.uniform(0, 70, (4, 5, 6)) * (rng.uniform(size=(4, 5, 6)) > 0.5)
    zyx[0, 0, 0] = -1.0  # negative dose cannot be written: read back as 0
    path = D.write_dose_csv(tmp_path / "pt_1.csv", zyx)  # default: our (z, y, x) order
    native = D.read_sparse_csv(path, shape=(5, 6, 4))  # the challenge's order (i, j, k) = (y, x, −z)
    expected = np.clip(zyx, 0, None)
    # pandas' default float parser (the reference's) can differ from the written value in the last bit
    np.testing.assert_allclose(native, to_challenge_grid(expected), rtol=1e-15, atol=0)
    np.testing.assert_allclose(from_challenge_grid(native), expected, rtol=1e-15, atol=0)
    assert native[1, 2, 3] == pytest.approx(expected[0, 1, 2])  # raw[y, x, k] = ours[K − 1 − k, y, x]
    assert native.dtype == np.float64


def test_written_prediction_reads_back_through_the_openkbp_reader(tmp_path: Path):
    from ctan.datasets import openkbp

    zyx = np.zeros(D.GRID)
    zyx[3, 70, 9] = 12.5  # superior slice 3 -> challenge k = 124
    D.write_dose_csv(tmp_path / "pt_1.csv", zyx)
    indices, values = openkbp.read_sparse(tmp_path / "pt_1.csv", with_values=True)
    assert indices.tolist() == [np.ravel_multi_index((70, 9, 124), D.GRID)]
    assert openkbp.our_flat_index(indices).tolist() == [np.ravel_multi_index((3, 70, 9), D.GRID)]
    assert values.tolist() == [12.5]


def test_read_sparse_csv_masks_and_empty_predictions(tmp_path: Path):
    (tmp_path / "Brainstem.csv").write_text(",data\n3,\n5,\n")
    for mask in (
        D.read_sparse_csv(tmp_path / "Brainstem.csv", shape=(2, 2, 2)),
        D.read_sparse_csv(tmp_path / "Brainstem.csv", shape=(2, 2, 2), mask=True),
    ):
        assert mask.dtype == np.uint8
        assert np.flatnonzero(mask).tolist() == [3, 5]
    D.write_dose_csv(tmp_path / "zero.csv", np.zeros((2, 2, 2)))
    assert (tmp_path / "zero.csv").read_text() == ",data\n"
    assert not D.read_sparse_csv(tmp_path / "zero.csv", shape=(2, 2, 2)).any()


@pytest.mark.parametrize(
    "text, problem",
    [(",data\n8,1.0\n", "outside"), (",dose\n1,1.0\n", "header"), (",data\n1,abc\n", "not all numbers")],
)
def test_read_sparse_csv_rejects_bad_files(tmp_path: Path, text: str, problem: str):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(CtanError, match=problem) as err:
        D.read_sparse_csv(path, shape=(2, 2, 2))
    assert str(path) in str(err.value)


# --- challenge folders on a synthetic 128³ patient set ---------------------------------------------------


def _write_mask(path: Path, mask: np.ndarray) -> None:
    pd.DataFrame(index=np.flatnonzero(mask.reshape(-1)), data={"data": np.nan}).to_csv(path)


def _make_reference(root: Path, patients: dict[str, int]) -> dict[str, dict]:
    """pt folders with a dose, mask, voxel size and two ROIs (all on the 128³ grid, OpenKBP order)."""
    out = {}
    for pt, seed in patients.items():
        rng = np.random.default_rng(seed)
        folder = root / pt
        folder.mkdir(parents=True)
        mask = np.zeros(D.GRID, dtype=bool)
        mask[50:70, 50:70, 50:70] = True
        dose = np.where(mask, rng.uniform(1, 70, D.GRID), 0.0).round(3)
        D.write_dose_csv(folder / "dose.csv", dose, axes="challenge")
        _write_mask(folder / "possible_dose_mask.csv", mask)
        np.savetxt(folder / "voxel_dimensions.csv", [3.906, 3.906, 2.5])
        ptv = np.zeros_like(mask)
        ptv[55:65, 55:65, 55:65] = True
        cord = np.zeros_like(mask)
        cord[60:62, 60:62, 50:70] = True
        _write_mask(folder / "PTV70.csv", ptv)
        _write_mask(folder / "SpinalCord.csv", cord)
        out[pt] = {"dose": dose, "mask": mask}
    return out


def test_score_directories_constant_offset_and_perfect(tmp_path: Path):
    refs = _make_reference(tmp_path / "ref", {"pt_2": 0, "pt_10": 1})
    perfect, offset = tmp_path / "perfect", tmp_path / "offset"
    for pt, r in refs.items():
        D.write_dose_csv(perfect / f"{pt}.csv", r["dose"], axes="challenge")
        D.write_dose_csv(offset / f"{pt}.csv", (r["dose"] + 1.5) * r["mask"], axes="challenge")
    result = D.score_directories(tmp_path / "ref", perfect)
    assert result["dose_score"] == 0.0 and result["dvh_score"] == 0.0
    assert result["n_patients"] == 2
    assert list(result["patients"]) == ["pt_2", "pt_10"]  # numeric patient order
    shifted = D.score_directories(tmp_path / "ref", offset)
    assert shifted["dose_score"] == pytest.approx(1.5)
    # Every DVH metric (percentiles and means of dose + 1.5 inside the ROIs) moves by exactly 1.5.
    assert shifted["dvh_score"] == pytest.approx(1.5)
    # PTV70: D99, D95, D1; spinal cord: D_0.1cc and mean dose -> five DVH errors per patient.
    assert shifted["patients"]["pt_10"] == {
        "dose_score": pytest.approx(1.5),
        "dvh_score": pytest.approx(1.5),
        "dvh_count": 5,
    }


def test_score_directories_names_missing_and_extra_patients(tmp_path: Path):
    refs = _make_reference(tmp_path / "ref", {"pt_1": 0, "pt_2": 1})
    preds = tmp_path / "preds"
    D.write_dose_csv(preds / "pt_1.csv", refs["pt_1"]["dose"], axes="challenge")
    with pytest.raises(CtanError, match="pt_2"):
        D.score_directories(tmp_path / "ref", preds)
    D.write_dose_csv(preds / "pt_2.csv", refs["pt_2"]["dose"], axes="challenge")
    D.write_dose_csv(preds / "pt_3.csv", refs["pt_2"]["dose"], axes="challenge")
    with pytest.raises(CtanError, match="no reference patient") as err:
        D.score_directories(tmp_path / "ref", preds)
    assert "pt_3.csv" in str(err.value)
    with pytest.raises(CtanError, match="does not exist"):
        D.score_directories(tmp_path / "nowhere", preds)


def test_openkbp_score_command(tmp_path: Path, capsys):
    refs = _make_reference(tmp_path / "ref", {"pt_5": 3})
    D.write_dose_csv(
        tmp_path / "preds" / "pt_5.csv", (refs["pt_5"]["dose"] + 1.0) * refs["pt_5"]["mask"], "challenge"
    )
    out = tmp_path / "score.json"
    code = main(
        [
            "openkbp-score",
            "--reference",
            str(tmp_path / "ref"),
            "--predictions",
            str(tmp_path / "preds"),
            "--output",
            str(out),
        ]
    )
    assert code == 0
    import json

    assert json.loads(out.read_text())["dose_score"] == pytest.approx(1.0)
    assert main(["openkbp-score", "--reference", str(tmp_path / "ref"), "--predictions", str(tmp_path)]) == 2
    assert "no prediction for reference patient(s) pt_5" in capsys.readouterr().err


def _score(tmp_path: Path) -> list[str]:
    return ["openkbp-score", "--reference", str(tmp_path / "ref"), "--predictions", str(tmp_path / "preds")]


def test_openkbp_score_output_in_a_new_folder(tmp_path: Path, capsys):
    """The folder is made, as every other command makes its output's (a FileNotFoundError before)."""
    refs = _make_reference(tmp_path / "ref", {"pt_5": 3})
    D.write_dose_csv(tmp_path / "preds" / "pt_5.csv", refs["pt_5"]["dose"], "challenge")
    out = tmp_path / "new" / "deeper" / "score.json"
    assert main([*_score(tmp_path), "--output", str(out)]) == 0
    import json

    assert json.loads(out.read_text())["dose_score"] == 0.0
    assert [p.name for p in out.parent.iterdir()] == ["score.json"]


def _fails(capsys, argv: list[str], path: Path, problem: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ctan: error: {path}: ") and problem in err and len(err.splitlines()) == 1


def test_openkbp_score_names_a_gzipped_prediction(tmp_path: Path, capsys):
    """As a gzipped reference file is named; a utf-8 decoding error before."""
    import gzip

    refs = _make_reference(tmp_path / "ref", {"pt_5": 3})
    plain = D.write_dose_csv(tmp_path / "pt_5.csv", refs["pt_5"]["dose"], "challenge")
    packed = tmp_path / "preds" / "pt_5.csv"
    packed.parent.mkdir()
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    _fails(capsys, _score(tmp_path), packed, "is gzip-compressed, not a CSV")


def test_openkbp_score_refuses_an_empty_possible_dose_mask(tmp_path: Path, capsys):
    """The dose score divides by the mask's size: NaN went into the JSON, with exit 0, before."""
    refs = _make_reference(tmp_path / "ref", {"pt_5": 3})
    D.write_dose_csv(tmp_path / "preds" / "pt_5.csv", refs["pt_5"]["dose"], "challenge")
    mask = tmp_path / "ref" / "pt_5" / "possible_dose_mask.csv"
    mask.write_text(",data\n")
    out = tmp_path / "score.json"
    _fails(capsys, [*_score(tmp_path), "--output", str(out)], mask, "lists no voxels")
    assert not out.exists()


@pytest.mark.parametrize("which", ["prediction", "reference"])
def test_openkbp_score_refuses_negative_dose(tmp_path: Path, capsys, which: str):
    """A dose is >= 0 Gy (the format cannot hold less): a sign or unit error, scored as usual before."""
    refs = _make_reference(tmp_path / "ref", {"pt_5": 3})
    D.write_dose_csv(tmp_path / "preds" / "pt_5.csv", refs["pt_5"]["dose"], "challenge")
    bad = tmp_path / "preds" / "pt_5.csv" if which == "prediction" else tmp_path / "ref" / "pt_5" / "dose.csv"
    inside = int(np.flatnonzero(refs["pt_5"]["mask"].reshape(-1))[0])
    bad.write_text(f",data\n{inside},-50.0\n")
    _fails(capsys, _score(tmp_path), bad, "negative dose -50 Gy in 1 voxel(s)")
