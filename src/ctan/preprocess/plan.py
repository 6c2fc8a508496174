"""``plan.json``: what preprocessing did to a dataset, in the spirit of nnU-Net's plans file, so a run
can be explained afterwards without the parameters at hand: the source data's fingerprint (voxel
spacing and array shape over the cases as found), the target grid, the intensity mapping, how each
kind of array was resampled, and the training patch size the models then see."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

PLAN = "plan.json"


def fingerprint(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Per axis (z, y, x or y, x): median, min and max over the cases of spacing (mm) and shape."""

    def stats(values: Sequence[Sequence[float]]) -> dict[str, list[float]]:
        a = np.asarray(values, dtype=float)
        return {
            k: [round(float(v), 4) for v in f(a, axis=0)]
            for k, f in (("median", np.median), ("min", np.min), ("max", np.max))
        }

    if not spacings:
        return {"cases": 0}
    return {"cases": len(spacings), "spacing_mm": stats(spacings), "shape": stats(shapes)}


def build_plan(
    *,
    dataset: str,
    format: str,
    spatial_dims: int,
    source: dict[str, Any],
    spacing: Sequence[float] | None,
    shape: Sequence[int] | None,
    intensity: dict[str, Any],
    patch_size: Sequence[int] | None,
    external_of: str | None = None,
) -> dict[str, Any]:
    if spatial_dims == 3:
        resampling = {
            "image": "trilinear (torch F.interpolate, align_corners=False), CT padded with -1024 HU",
            "dose": "trilinear, padded with 0",
            "masks": "nearest, padded with 0",
        }
        grid = {"spacing_mm": list(spacing) if spacing else None, "shape": list(shape) if shape else None}
    else:
        resampling = {"image": "bilinear with anti-aliasing (scikit-image)", "masks": "nearest"}
        grid = {"shape": list(shape) if shape else None}
    return {
        "dataset": dataset,
        "format": format,
        "external_of": external_of,
        "spatial_dims": spatial_dims,
        "source_fingerprint": source,
        "target_grid": grid,
        "intensity": intensity,
        "resampling": resampling,
        "training_patch_size": list(patch_size) if patch_size else None,
    }


def write_plan(folder: Path, plan: dict[str, Any]) -> Path:
    path = Path(folder) / PLAN
    path.write_text(json.dumps(plan, indent=1) + "\n")
    return path
