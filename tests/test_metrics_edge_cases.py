"""Edge cases that real medical-imaging data produce, where a metric used to give a wrong or silent
answer: a NaN dose left out of the mean, a possible-dose mask of another grid, a patient without a
contoured ROI written as invalid JSON, a bootstrap "interval" from one test case, a negative baseline
that turned an improvement into a loss, scikit-learn tracebacks for NaN scores."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from conftest import strict_json_loads
from ctan.cli import main
from ctan.errors import CtanError
from ctan.metrics import classification as C
from ctan.metrics import dose as D
from ctan.metrics.mtl import delta_mtl, relative_change
from test_metrics_dose import _make_reference

# --- dose ---------------------------------------------------------------------------------------------


def _dose_case(shape=(6, 7, 8)):
    rng = np.random.default_rng(0)
    mask = np.zeros(shape, dtype=bool)
    mask[1:5, 2:6, 1:7] = True
    reference = rng.uniform(0, 70, shape) * mask
    return reference, mask


def test_dose_score_refuses_a_possible_dose_mask_of_another_shape():
    """The denominator is the mask's voxel count: a mask of another grid gave a plausible wrong score."""
    reference, mask = _dose_case()
    with pytest.raises(CtanError, match="possible-dose mask"):
        D.dose_score(reference, reference + 1, mask[:-1])


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("which", ["reference", "prediction"])
def test_a_non_finite_dose_is_refused_not_left_out_of_the_means(bad: float, which: str):
    """A NaN voxel made the patient's dose score and every DVH error NaN; the mean over patients and
    the DVH score's nanmean then left that patient out: a broken prediction scored as no prediction."""
    reference, mask = _dose_case()
    prediction = reference + 1.0
    (reference if which == "reference" else prediction)[2, 3, 4] = bad
    with pytest.raises(CtanError, match="NaN or infinite"):
        D.dose_score(reference, prediction, mask)
    with pytest.raises(CtanError, match="NaN or infinite"):
        D.score_patient(reference, prediction, mask, {"PTV70": mask}, (2.0, 2.0, 2.0))


@pytest.mark.parametrize("dims", [(0.0, 2.0, 2.0), (-1.0, 2.0, 2.0), (math.nan, 2.0, 2.0)])
def test_dvh_metrics_refuse_voxel_dimensions_that_are_not_positive(dims):
    reference, mask = _dose_case()
    with pytest.raises(CtanError, match="voxel dimensions must be positive"):
        D.dvh_metrics(reference, {"Brainstem": mask}, dims)


def _score_command(tmp_path: Path) -> list[str]:
    return ["openkbp-score", "--reference", str(tmp_path / "ref"), "--predictions", str(tmp_path / "preds")]


def test_openkbp_score_writes_null_for_a_patient_without_a_contoured_roi(tmp_path: Path, capsys):
    """The reference leaves such a patient's row NaN, and its nanmean skips it; the command wrote the
    patient's DVH score as ``NaN``, which is not JSON."""
    refs = _make_reference(tmp_path / "ref", {"pt_1": 0, "pt_2": 1})
    for roi in ("PTV70", "SpinalCord"):
        (tmp_path / "ref" / "pt_2" / f"{roi}.csv").unlink()
    for pt, r in refs.items():
        D.write_dose_csv(tmp_path / "preds" / f"{pt}.csv", (r["dose"] + 1.0) * r["mask"], axes="challenge")
    out = tmp_path / "score.json"
    assert main([*_score_command(tmp_path), "--output", str(out)]) == 0
    for text in (out.read_text(), capsys.readouterr().out):
        result = strict_json_loads(text)
        no_roi = {"dose_score": pytest.approx(1.0), "dvh_score": None, "dvh_count": 0}
        assert result["patients"]["pt_2"] == no_roi
        assert result["patients"]["pt_1"]["dvh_count"] == 5
        assert result["dvh_score"] == pytest.approx(1.0)  # pt_1's five errors, pooled as the challenge does


def test_openkbp_score_refuses_a_reference_without_any_contoured_roi(tmp_path: Path, capsys):
    """No DVH metric anywhere: the DVH score went out as NaN with exit status 0."""
    refs = _make_reference(tmp_path / "ref", {"pt_1": 0})
    for roi in ("PTV70", "SpinalCord"):
        (tmp_path / "ref" / "pt_1" / f"{roi}.csv").unlink()
    D.write_dose_csv(tmp_path / "preds" / "pt_1.csv", refs["pt_1"]["dose"], axes="challenge")
    out = tmp_path / "score.json"
    assert main([*_score_command(tmp_path), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ctan: error: {tmp_path / 'ref'}: no reference patient has a contoured ROI")
    assert not out.exists()


# --- classification -----------------------------------------------------------------------------------


def test_non_finite_scores_are_a_ctan_error_not_a_scikit_learn_traceback():
    labels = [0, 1, 0, 1]
    with pytest.raises(CtanError, match="1 score"):
        C.binary_auc(labels, [0.1, math.nan, 0.3, 0.4])
    probs = np.full((4, 3), 1 / 3)
    probs[2, 1] = math.inf
    with pytest.raises(CtanError, match="NaN or infinite"):
        C.macro_auc([0, 1, 2, 0], probs)
    with pytest.raises(CtanError, match="NaN or infinite"):
        C.stoic_aucs([1, 1, 0, 1], [0.2, 0.9, 0.1, 0.7], [0, 1, 0, 1], [0.2, math.nan, 0.1, 0.5])


def test_labels_that_are_not_class_indices_are_refused():
    """A NaN prediction cast to int64 became -2**63: counted as a wrong class, silently."""
    with pytest.raises(CtanError, match="class indices"):
        C.balanced_accuracy([0, 1, 1], np.array([0.0, math.nan, 1.0]))
    with pytest.raises(CtanError, match="class indices"):
        C.binary_auc(np.array([0.0, 0.5, 1.0]), [0.1, 0.2, 0.3])
    assert C.balanced_accuracy(np.array([0.0, 1.0, 1.0]), [0, 1, 0]) == pytest.approx(0.75)  # whole floats


# --- Δ_MTL ----------------------------------------------------------------------------------------------


def test_a_negative_baseline_keeps_positive_meaning_better():
    """Dividing by a negative STL value flipped the sign: an improvement read as a loss."""
    assert relative_change(-1.0, -2.0, higher_is_better=True) == pytest.approx(50.0)
    assert relative_change(-3.0, -2.0, higher_is_better=False) == pytest.approx(50.0)
    assert relative_change(-3.0, -2.0, higher_is_better=True) == pytest.approx(-50.0)
    # Non-negative baselines (every metric of the registry) are unchanged: LibMTL's formula.
    assert relative_change(0.6, 0.5, higher_is_better=True) == pytest.approx(20.0)
    score = {"t": {"m": -1.0}}
    assert delta_mtl(score, {"t": {"m": -2.0}}, {"m": True}) > 0


# --- the comparison's bootstrap ------------------------------------------------------------------------


def _one_case_doc(dice: float) -> dict:
    return {
        "tasks": {"lesion": {"dice": dice}},
        "higher_is_better": {"lesion": {"dice": True}},
        "per_case": {"lesion": {"case_000": {"dice": dice}}},
    }


def test_one_test_case_gives_no_interval():
    """Every resample of one case is that case: the interval was [Δ, Δ] and the detectable difference
    0, a certainty one case cannot give."""
    from ctan.comparison import paired_bootstrap_delta, paired_difference

    docs = {("stl", s): _one_case_doc(0.5) for s in (0, 1)}
    docs |= {("better", 0): _one_case_doc(0.6), ("better", 1): _one_case_doc(0.7)}
    docs |= {("same", s): _one_case_doc(0.5) for s in (0, 1)}
    out = paired_bootstrap_delta(docs, "better", [0, 1], resamples=100)
    assert out["delta_mtl"] == pytest.approx(30.0) and out["per_seed"] == pytest.approx([20.0, 40.0])
    assert out["test_cases"] == 1 and out["resamples_with_delta"] == 0
    for key in ("ci_low", "ci_high", "cases_ci_low", "cases_ci_high", "detectable_pct"):
        assert math.isnan(out[key]), key
    same = paired_bootstrap_delta(docs, "same", [0, 1], resamples=100)
    diff = paired_difference(out, same)
    assert diff["difference"] == pytest.approx(30.0) and math.isnan(diff["ci_low"])


def test_an_undefined_delta_is_printed_n_a_not_nan():
    from ctan.comparison import render_markdown

    nan = math.nan
    delta = {
        "delta_mtl": nan,
        "std_over_seeds": 0.0,
        "seeds_with_delta": 0,
        "per_seed": [nan],
        "ci_low": nan,
        "ci_high": nan,
        "resamples": 100,
        "resamples_with_delta": 0,
    }
    cell = {"mean": nan, "std": 0.0, "higher_is_better": True}
    entry = {
        "seeds": [0],
        "test_cases": 1,
        "data_hash": "x",
        "metrics": {a: {"covid": {"auc": cell}} for a in ("stl", "hps")},
        "primary_metrics": {"covid": ["auc"]},
        "delta_mtl": {"hps": delta},
        "paired_differences": {},
        "cost": {},
        "provenance": {},
    }
    report = {
        "datasets": {"stoic": entry},
        "paper_delta_mtl": {"hps": 3.22},
        "mean_delta_mtl": {"hps": nan},
    }
    text = render_markdown(report)
    assert "nan" not in text.lower().replace("n/a", "")
    assert "| hps | n/a (0 of 1 seeds defined) |" in text and "| hps | n/a | +3.22 |" in text
