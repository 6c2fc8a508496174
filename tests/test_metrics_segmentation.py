"""Dice, HD95 and ISIC's thresholded Jaccard on hand-computed cases and their empty-mask conventions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from ctan.errors import CtanError
from ctan.metrics import segmentation as S


def _mask(shape, *points):
    out = np.zeros(shape, dtype=bool)
    for p in points:
        out[p] = True
    return out


# --- Dice ---------------------------------------------------------------------------------------------


def test_dice_hand_computed():
    ref = _mask((4, 4), (0, 0), (0, 1), (1, 0), (1, 1))
    pred = _mask((4, 4), (0, 0), (0, 1), (3, 3), (3, 2))
    assert S.dice(ref, pred) == pytest.approx(2 * 2 / 8)
    assert S.dice(ref, ref) == 1.0


def test_dice_empty_conventions():
    empty = np.zeros((3, 3), bool)
    some = _mask((3, 3), (1, 1))
    assert math.isnan(S.dice(empty, empty))
    assert S.dice(empty, some) == 0.0
    assert S.dice(some, empty) == 0.0
    with pytest.raises(CtanError):
        S.dice(some, np.zeros((2, 2)))


def test_dice_per_structure_skips_non_contoured_in_the_mean():
    ref = np.zeros((3, 4, 4), bool)
    pred = np.zeros((3, 4, 4), bool)
    ref[0, :2], pred[0, :1] = True, True  # Dice 2·4/(8+4) = 2/3
    ref[1, 0, 0], pred[1, 0, 0] = True, True  # 1
    pred[2, 3, 3] = True  # structure 2 not contoured: NaN whatever was predicted
    values = S.dice_per_structure(ref, pred, present=[True, True, False], names=["A", "B", "C"])
    assert values["A"] == pytest.approx(2 / 3)
    assert values["B"] == 1.0
    assert math.isnan(values["C"])
    assert S.mean_dice(values) == pytest.approx((2 / 3 + 1) / 2)
    assert math.isnan(S.mean_dice({"A": float("nan")}))
    with pytest.raises(CtanError):
        S.dice_per_structure(ref, pred, names=["A"])


# --- HD95 ---------------------------------------------------------------------------------------------


def test_hd95_uses_the_spacing():
    ref = _mask((3, 3, 8), (1, 1, 0))
    pred = _mask((3, 3, 8), (1, 1, 3))
    assert S.hd95(ref, pred, (2.0, 1.0, 0.5)) == pytest.approx(1.5)
    assert S.hd95(ref, ref, (2.0, 1.0, 0.5)) == 0.0


def test_hd95_parallel_planes():
    ref = np.zeros((6, 5, 5), bool)
    pred = np.zeros((6, 5, 5), bool)
    ref[1], pred[4] = True, True  # every surface voxel is 3 slices (3 · 2.5 mm) from the other plane
    assert S.hd95(ref, pred, (2.5, 1.0, 1.0)) == pytest.approx(7.5)


def test_hd95_is_the_larger_directed_95th_percentile():
    # ref = {A}; pred = {A, B} with |AB| = 10 mm. pred→ref distances [0, 10] -> 95th percentile 9.5;
    # ref→pred [0] -> 0. (Pooling both sets first would give 9.0.)
    ref = _mask((1, 1, 11), (0, 0, 0))
    pred = _mask((1, 1, 11), (0, 0, 0), (0, 0, 10))
    assert S.hd95(ref, pred, (1.0, 1.0, 1.0)) == pytest.approx(9.5)
    assert S.hd95(pred, ref, (1.0, 1.0, 1.0)) == pytest.approx(9.5)


def _brute_force_hd95(ref, pred, spacing):
    def surface_points(mask):
        edge = mask ^ ndimage.binary_erosion(mask, ndimage.generate_binary_structure(mask.ndim, 1))
        return np.argwhere(edge) * np.asarray(spacing)

    distances = cdist(surface_points(ref), surface_points(pred))
    return max(np.percentile(distances.min(axis=1), 95), np.percentile(distances.min(axis=0), 95))


def test_hd95_matches_brute_force_surface_distances():
    rng = np.random.default_rng(0)
    spacing = (2.0, 0.8, 1.3)
    for _ in range(3):
        ref = ndimage.binary_dilation(rng.uniform(size=(10, 12, 11)) > 0.97, iterations=2)
        pred = ndimage.binary_dilation(rng.uniform(size=(10, 12, 11)) > 0.97, iterations=2)
        assert S.hd95(ref, pred, spacing) == pytest.approx(_brute_force_hd95(ref, pred, spacing))


def test_hd95_empty_conventions_and_mean():
    empty = np.zeros((4, 4, 4), bool)
    some = _mask((4, 4, 4), (1, 1, 1))
    assert math.isnan(S.hd95(empty, empty, (1, 1, 1)))
    assert S.hd95(empty, some, (1, 1, 1)) == math.inf
    assert S.hd95(some, empty, (1, 1, 1)) == math.inf
    with pytest.raises(CtanError):
        S.hd95(some, some, (1, 1))
    worst = S.image_diagonal_mm((4, 4, 4), (1.0, 2.0, 2.0))
    assert worst == pytest.approx(math.sqrt(16 + 64 + 64))
    assert S.mean_hd95([2.0, math.inf, float("nan")], worst) == pytest.approx((2.0 + worst) / 2)
    assert math.isnan(S.mean_hd95([float("nan")], worst))


def test_hd95_per_structure():
    ref = np.zeros((2, 3, 3, 8), bool)
    pred = np.zeros((2, 3, 3, 8), bool)
    ref[0, 1, 1, 0], pred[0, 1, 1, 3] = True, True
    values = S.hd95_per_structure(ref, pred, (1.0, 1.0, 2.0), present=[True, False], names=["cord", "larynx"])
    assert values["cord"] == pytest.approx(6.0)
    assert math.isnan(values["larynx"])


# --- ISIC 2018 thresholded Jaccard --------------------------------------------------------------------


def test_jaccard_and_isic_threshold():
    def pair(inter, only_ref, only_pred):
        n = inter + only_ref + only_pred
        ref, pred = np.zeros(n, bool), np.zeros(n, bool)
        ref[: inter + only_ref] = True
        pred[:inter] = True
        pred[inter + only_ref :] = True
        return ref.reshape(1, n), pred.reshape(1, n)

    low = pair(5, 5, 0)  # J = 0.5 -> counts 0
    good = pair(8, 1, 1)  # J = 0.8
    edge = pair(13, 7, 0)  # J = 0.65 exactly: kept (below 0.65 counts as 0)
    perfect = pair(4, 0, 0)  # J = 1
    empty = (np.zeros((2, 2), bool), np.zeros((2, 2), bool))  # NaN, skipped
    assert S.jaccard(*good) == pytest.approx(0.8)
    assert math.isnan(S.jaccard(*empty))
    images = [low, good, edge, perfect, empty]
    score = S.thresholded_jaccard([r for r, _ in images], [p for _, p in images])
    assert score == pytest.approx((0 + 0.8 + 0.65 + 1) / 4)
    assert math.isnan(S.thresholded_jaccard([empty[0]], [empty[1]]))
