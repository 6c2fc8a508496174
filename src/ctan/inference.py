"""Predictions on whole volumes from a network trained on patches: overlapping sliding windows.

A network trained on `training.patch_size` patches has only seen inputs of that size: its GroupNorm
statistics are those of a patch, and one patch is what its memory was sized for. A whole CT on its
native grid (`preprocess.shape: null`) can be many times larger: in one forward pass the statistics
differ from training's and the activations may not fit. Validation and test volumes larger than a patch
are therefore predicted window by window with MONAI's `sliding_window_inference`, as nnU-Net does:
windows of the patch size overlapping by half (`WINDOW_OVERLAP`), blended with a Gaussian weight centred
on each window so that voxels near a window's border, which saw the least context, count least.
Image-level outputs (a diagnosis of the whole volume) are the mean of the windows' logits.

Networks trained on whole volumes (no patch size), 2D data and volumes no larger than a patch take one
forward pass, as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

WINDOW_OVERLAP = 0.5
"""Share of a window that overlaps its neighbour along each axis (nnU-Net's choice; MONAI's default 0.25
leaves less context at window borders)."""


def needs_windows(image: torch.Tensor, patch_size: Sequence[int] | None) -> bool:
    """Whether a batch of (B, C, *spatial) images is larger than a training patch along some axis."""
    if not patch_size:
        return False
    spatial = image.shape[2:]
    return len(spatial) == len(patch_size) and any(n > p for n, p in zip(spatial, patch_size, strict=True))


def predict_volume(
    model: nn.Module, image: torch.Tensor, patch_size: Sequence[int] | None
) -> dict[str, torch.Tensor]:
    """``model(image)``'s ``{task: output}``; by sliding windows of ``patch_size`` where it is larger."""
    if not needs_windows(image, patch_size):
        return model(image)
    from monai.inferers import sliding_window_inference

    outputs: list[dict[str, torch.Tensor]] = []
    for item in image.split(1):  # one volume at a time: its image-level outputs are its own windows'
        image_level: dict[str, list[torch.Tensor]] = {}

        def windows(batch: torch.Tensor, image_level=image_level) -> dict[str, torch.Tensor]:
            dense = {}
            for name, out in model(batch).items():
                if out.dim() == batch.dim():
                    dense[name] = out
                else:
                    image_level.setdefault(name, []).append(out)
            # MONAI blends spatial outputs only: a network without dense tasks still hands it one.
            return dense or {"": batch[:, :1]}

        blended = sliding_window_inference(
            item,
            roi_size=list(patch_size),
            sw_batch_size=1,
            predictor=windows,
            overlap=WINDOW_OVERLAP,
            mode="gaussian",
        )
        blended.pop("", None)
        means = {name: torch.cat(outs).mean(dim=0, keepdim=True) for name, outs in image_level.items()}
        outputs.append({**blended, **means})
    return {name: torch.cat([o[name] for o in outputs]) for name in outputs[0]}
