"""Segmentation metrics: Dice, HD95 (3D structures) and ISIC 2018's thresholded Jaccard.

Conventions for empty masks, chosen so that means stay meaningful:

- **Dice**: both reference and prediction empty → NaN (nothing to score; a non-contoured structure is
  NaN too) and NaN values are skipped in means; empty reference with a non-empty prediction → 0;
  non-empty reference with an empty prediction → 0.
- **HD95**: both empty → NaN (skipped in means); exactly one empty → ``inf``. `mean_hd95` replaces
  ``inf`` by a finite worst case, the image diagonal in mm (BraTS' convention of scoring a missed
  structure with the largest possible distance), so a model that predicts nothing is penalised rather
  than skipped.
- **Jaccard**: both empty → NaN (skipped); ISIC 2018's thresholded Jaccard scores an image whose
  Jaccard is below 0.65 as 0 and averages over images.

HD95 is the symmetric 95th-percentile Hausdorff distance as MONAI computes it
(``compute_hausdorff_distance(percentile=95)``): surfaces are the mask voxels removed by a binary
erosion with the face-connected structuring element; distances (mm, using the spacing) from each
surface voxel of one mask to the nearest surface voxel of the other; the 95th percentile of each
directed set; the larger of the two.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial

import numpy as np
from scipy import ndimage

from ctan.errors import CtanError

ISIC_JACCARD_THRESHOLD = 0.65


def _pair(reference: np.ndarray, prediction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    reference = np.asarray(reference).astype(bool)
    prediction = np.asarray(prediction).astype(bool)
    if reference.shape != prediction.shape:
        raise CtanError(
            None, f"mask shapes differ: reference {reference.shape}, prediction {prediction.shape}"
        )
    return reference, prediction


def dice(reference: np.ndarray, prediction: np.ndarray) -> float:
    """Dice ``2|R∩P| / (|R|+|P|)`` of two binary masks; NaN when both are empty."""
    reference, prediction = _pair(reference, prediction)
    total = int(reference.sum()) + int(prediction.sum())
    if total == 0:
        return float("nan")
    return 2.0 * int(np.logical_and(reference, prediction).sum()) / total


def _structure_names(count: int, names: Sequence[str] | None) -> list[str]:
    if names is None:
        return [str(i) for i in range(count)]
    if len(names) != count:
        raise CtanError(None, f"{len(names)} structure names for {count} structure channels")
    return list(names)


def _present(count: int, present: Sequence[bool] | None) -> list[bool]:
    if present is None:
        return [True] * count
    if len(present) != count:
        raise CtanError(None, f"{len(present)} presence flags for {count} structure channels")
    return [bool(p) for p in present]


def _per_structure(
    score: Callable[[np.ndarray, np.ndarray], float],
    reference: np.ndarray,
    prediction: np.ndarray,
    present: Sequence[bool] | None,
    names: Sequence[str] | None,
) -> dict[str, float]:
    """``score`` per channel, NaN where a structure was not contoured: absent is not empty, so not 0."""
    reference, prediction = _pair(reference, prediction)
    labels = _structure_names(reference.shape[0], names)
    flags = _present(reference.shape[0], present)
    return {
        label: score(reference[i], prediction[i]) if flags[i] else float("nan")
        for i, label in enumerate(labels)
    }


def dice_per_structure(
    reference: np.ndarray,
    prediction: np.ndarray,
    present: Sequence[bool] | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, float]:
    """Dice of each channel of ``(S, *spatial)`` masks; NaN for structures not contoured (``present``)."""
    return _per_structure(dice, reference, prediction, present, names)


def nanmean(values: Iterable[float]) -> float:
    """Mean of the values that are not NaN; NaN when none is (no warning, unlike numpy's)."""
    array = np.asarray(list(values), dtype=np.float64)
    array = array[~np.isnan(array)]
    return float(array.mean()) if array.size else float("nan")


def mean_dice(per_structure: Mapping[str, float]) -> float:
    """Mean Dice over structures, skipping NaN (structures not contoured or empty in both)."""
    return nanmean(per_structure.values())


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask ^ ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1))


def hd95(reference: np.ndarray, prediction: np.ndarray, spacing: Sequence[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance (mm); NaN if both empty, ``inf`` if one is."""
    reference, prediction = _pair(reference, prediction)
    if len(spacing) != reference.ndim:
        raise CtanError(None, f"spacing {tuple(spacing)} does not match {reference.ndim}D masks")
    ref_any, pred_any = bool(reference.any()), bool(prediction.any())
    if not ref_any and not pred_any:
        return float("nan")
    if ref_any != pred_any:
        return float("inf")
    ref_surface, pred_surface = _surface(reference), _surface(prediction)
    sampling = tuple(float(s) for s in spacing)
    to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=sampling)
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=sampling)
    forward = np.percentile(to_ref[pred_surface], 95)
    backward = np.percentile(to_pred[ref_surface], 95)
    return float(max(forward, backward))


def hd95_per_structure(
    reference: np.ndarray,
    prediction: np.ndarray,
    spacing: Sequence[float],
    present: Sequence[bool] | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, float]:
    """HD95 of each channel of ``(S, *spatial)`` masks; NaN for structures not contoured."""
    return _per_structure(partial(hd95, spacing=spacing), reference, prediction, present, names)


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """The largest distance inside a grid: the worst-case HD95 used for a missed structure."""
    return float(np.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing, strict=True))))


def mean_hd95(values: Iterable[float], worst_mm: float) -> float:
    """Mean HD95, NaN skipped, ``inf`` (one mask empty) counted as ``worst_mm`` (the image diagonal)."""
    array = np.asarray(list(values), dtype=np.float64)
    array = np.where(np.isinf(array), float(worst_mm), array)
    return nanmean(array)


def jaccard(reference: np.ndarray, prediction: np.ndarray) -> float:
    """Jaccard ``|R∩P| / |R∪P|``; NaN when both masks are empty."""
    reference, prediction = _pair(reference, prediction)
    union = int(np.logical_or(reference, prediction).sum())
    if union == 0:
        return float("nan")
    return int(np.logical_and(reference, prediction).sum()) / union


def thresholded_jaccard(
    references: Iterable[np.ndarray],
    predictions: Iterable[np.ndarray],
    threshold: float = ISIC_JACCARD_THRESHOLD,
) -> float:
    """ISIC 2018 task 1 score: per-image Jaccard, values below ``threshold`` count as 0, then the mean.

    Images whose reference and prediction are both empty are skipped (NaN when all are).
    """
    values = [jaccard(r, p) for r, p in zip(references, predictions, strict=True)]
    return thresholded_mean(values, threshold)


def thresholded_mean(jaccards: Iterable[float], threshold: float = ISIC_JACCARD_THRESHOLD) -> float:
    """Mean of per-image Jaccard values with those below ``threshold`` counted as 0 (NaN skipped)."""
    return nanmean(v if np.isnan(v) or v >= threshold else 0.0 for v in jaccards)
