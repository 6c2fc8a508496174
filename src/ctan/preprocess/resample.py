"""Bring a case onto the configured grid while keeping world coordinates.

Geometry convention (ITK's, in the array's (z, y, x) axis order): the world position of voxel index
``i`` is ``origin + D @ (i * spacing)``, with ``D`` the row-major direction matrix whose columns are the
array axes' directions. Resampling keeps ``D``; only ``spacing`` and ``origin`` change.

3D volumes are resampled with torch's ``F.interpolate`` (trilinear for real-valued arrays, nearest for
integer masks), the fastest option on few cores (shared/notes/pitfalls.md). With ``align_corners=False``
the resampled grid covers the same field of view, so its first voxel centre moves by half the spacing
change: ``origin' = origin + D @ ((spacing' - spacing) / 2)``. 2D images are resized with scikit-image
(bilinear with anti-aliasing for the picture, nearest for the mask).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from skimage.transform import resize

from ctan.datasets.base import Case

CT_PAD_HU = -1024.0


def _geometry(case: Case) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(spacing, origin, direction matrix) as float arrays; missing origin/direction mean 0 and identity."""
    dims = len(case.spacing)
    spacing = np.asarray(case.spacing, dtype=float)
    origin = np.asarray(case.origin, dtype=float) if len(case.origin) else np.zeros(dims)
    direction = (
        np.asarray(case.direction, dtype=float).reshape(dims, dims) if len(case.direction) else np.eye(dims)
    )
    return spacing, origin, direction


def _is_real(array: np.ndarray) -> bool:
    """Real-valued arrays (CT, dose) are interpolated linearly; integer masks by nearest neighbour."""
    return np.issubdtype(array.dtype, np.floating)


def resampled_shape(
    shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]
) -> tuple[int, ...]:
    """Voxels per axis after resampling to ``target`` spacing: the whole voxels that fit the field of view."""
    return tuple(max(1, math.floor(n * s / t + 1e-6)) for n, s, t in zip(shape, spacing, target, strict=True))


def _interpolate(
    array: np.ndarray,
    size: tuple[int, ...],
    scale: tuple[float, ...] | None,
) -> np.ndarray:
    """Resample a (C, z, y, x) array to ``size``; ``scale`` (new voxels per old voxel) fixes the sampling
    positions when the target spacing does not divide the field of view exactly."""
    linear = _is_real(array)
    tensor = torch.from_numpy(np.ascontiguousarray(array))[None]
    if linear:
        tensor = tensor.float()
    kwargs: dict = {"mode": "trilinear", "align_corners": False} if linear else {"mode": "nearest-exact"}
    if scale is None:
        out = F.interpolate(tensor, size=size, **kwargs)
    else:
        out = F.interpolate(tensor, scale_factor=scale, recompute_scale_factor=False, **kwargs)
    return out[0].numpy().astype(array.dtype, copy=False)


def resample_volume(
    array: np.ndarray, spacing: Sequence[float], target: Sequence[float]
) -> tuple[np.ndarray, tuple[float, ...]]:
    """Resample a (C, z, y, x) array from ``spacing`` to ``target`` spacing (mm); returns (array, spacing)."""
    size = resampled_shape(array.shape[1:], spacing, target)
    scale = []
    for n, s, t, m in zip(array.shape[1:], spacing, target, size, strict=True):
        ratio = s / t
        # torch sizes the output as floor(n * scale): keep the exact ratio unless rounding loses a voxel.
        scale.append(ratio if math.floor(n * ratio) == m else m / n)
    if tuple(array.shape[1:]) == size and all(s == t for s, t in zip(spacing, target, strict=True)):
        return array, tuple(float(s) for s in spacing)
    return _interpolate(array, size, tuple(scale)), tuple(float(t) for t in target)


def crop_or_pad(array: np.ndarray, shape: Sequence[int], fill: float) -> tuple[np.ndarray, np.ndarray]:
    """Centre-crop/pad the spatial axes of a (C, *spatial) array to ``shape``.

    Returns the new array and, per axis, the old index of the new voxel 0 (negative where padded).
    """
    start = np.array([(n - m) // 2 for n, m in zip(array.shape[1:], shape, strict=True)])
    pads, slices = [(0, 0)], [slice(None)]
    for n, m, s in zip(array.shape[1:], shape, start, strict=True):
        if s >= 0:
            pads.append((0, 0))
            slices.append(slice(s, s + m))
        else:
            pads.append((-s, m - n + s))
            slices.append(slice(None))
    out = array[tuple(slices)]
    if any(p != (0, 0) for p in pads):
        out = np.pad(out, pads, mode="constant", constant_values=np.asarray(fill).astype(array.dtype))
    return np.ascontiguousarray(out), start


def _fill_value(name: str, array: np.ndarray) -> float:
    return CT_PAD_HU if name == "image" and _is_real(array) else 0


def _resample_3d(case: Case, spacing: Sequence[float] | None, shape: Sequence[int] | None) -> Case:
    old_spacing, origin, direction = _geometry(case)
    arrays = {"image": case.image, **case.dense}
    if spacing is not None:
        target = tuple(float(s) for s in spacing)
        arrays = {k: resample_volume(v, old_spacing, target)[0] for k, v in arrays.items()}
        new_spacing = np.asarray(target)
    elif shape is not None:
        size = tuple(int(m) for m in shape)
        new_spacing = old_spacing * np.asarray(case.spatial_shape) / np.asarray(size)
        if size != case.spatial_shape:
            arrays = {k: _interpolate(v, size, None) for k, v in arrays.items()}
    else:
        return case
    origin = origin + direction @ ((new_spacing - old_spacing) / 2)
    if spacing is not None and shape is not None:
        start = np.zeros(3)
        cropped = {}
        for name, array in arrays.items():
            cropped[name], start = crop_or_pad(array, shape, _fill_value(name, array))
        arrays = cropped
        origin = origin + direction @ (start * new_spacing)
    return _replace(case, arrays, new_spacing, origin, direction)


def _resize_2d(array: np.ndarray, shape: tuple[int, int], linear: bool) -> np.ndarray:
    """Resize a (C, H, W) array: bilinear with anti-aliasing for pictures, nearest for masks."""
    if tuple(array.shape[1:]) == shape:
        return array
    channels_last = np.moveaxis(array, 0, -1)
    if linear:
        channels_last = channels_last.astype(np.float32)  # skimage keeps float32: half the work of float64
    out = resize(
        channels_last,
        shape,
        order=1 if linear else 0,
        anti_aliasing=linear,
        preserve_range=True,
    )
    if linear and np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return np.ascontiguousarray(np.moveaxis(out, -1, 0).astype(array.dtype))


def _resize_case_2d(case: Case, shape: Sequence[int] | None) -> Case:
    if shape is None:
        return case
    size = (int(shape[0]), int(shape[1]))
    old_spacing, origin, direction = _geometry(case)
    new_spacing = old_spacing * np.asarray(case.spatial_shape) / np.asarray(size)
    origin = origin + direction @ ((new_spacing - old_spacing) / 2)
    arrays = {
        name: _resize_2d(array, size, linear=name == "image" or _is_real(array))
        for name, array in {"image": case.image, **case.dense}.items()
    }
    return _replace(case, arrays, new_spacing, origin, direction)


def _replace(
    case: Case, arrays: dict[str, np.ndarray], spacing: np.ndarray, origin: np.ndarray, direction: np.ndarray
) -> Case:
    return dataclasses.replace(
        case,
        image=arrays.pop("image"),
        dense=arrays,
        spacing=tuple(float(s) for s in spacing),
        origin=tuple(float(o) for o in origin),
        direction=tuple(float(d) for d in direction.ravel()),
    )


def resample_case(
    case: Case, spacing: Sequence[float] | None = None, shape: Sequence[int] | None = None
) -> Case:
    """The case on the configured grid (see the module docstring); the input case is not modified.

    3D: with ``spacing``, resample to it, then centre crop/pad to ``shape`` if given (CT padded with
    -1024 HU, everything else with 0); with only ``shape``, resample the whole grid to it. 2D: resize
    every array to ``shape`` (the lesion mask may come on a finer grid than the picture). Neither:
    the case itself, bit for bit.
    """
    if len(case.spacing) == 2:
        return _resize_case_2d(case, shape)
    return _resample_3d(case, spacing, shape)
