"""Intensity normalisation applied by the loader, so the stores keep physical units (HU, uint8 RGB).

Pure functions over numpy arrays or torch tensors; the input is never modified.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch

Array = TypeVar("Array", np.ndarray, torch.Tensor)

RGB_SCALE = 255.0


def normalise_ct(hu: Array, window: Sequence[float]) -> Array:
    """Clip CT (HU) to ``window = [lo, hi]`` and map it linearly onto [0, 1] as float32."""
    lo, hi = float(window[0]), float(window[1])
    if not hi > lo:
        raise ValueError(f"CT window must have hi > lo, got {list(window)}")
    if isinstance(hu, torch.Tensor):
        return (hu.float().clamp(lo, hi) - lo) / (hi - lo)
    return ((np.clip(np.asarray(hu, dtype=np.float32), lo, hi) - lo) / (hi - lo)).astype(np.float32)


def normalise_rgb(rgb: Array) -> Array:
    """Map 8-bit RGB onto [0, 1] as float32."""
    if isinstance(rgb, torch.Tensor):
        return rgb.float() / RGB_SCALE
    return (np.asarray(rgb, dtype=np.float32) / np.float32(RGB_SCALE)).astype(np.float32)
