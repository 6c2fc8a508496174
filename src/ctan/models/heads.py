"""Task heads, identical in every architecture so that comparisons isolate how features are shared.

Dense tasks (segmentation, dose) get a 1x1 convolution on full-resolution decoder features (MTAN,
whose dense tasks share one decoder, a 3x3 + 1x1 per task as in its reference); image-level
tasks (diagnosis, COVID, severity) get global average and max pooling of bottleneck features and a
small MLP.
Outputs are raw: logits, or Gy for dose.
"""

from __future__ import annotations

import torch
from torch import nn

from ctan.models.blocks import conv_type
from ctan.tasks import Task


class DenseHead(nn.Module):
    """1x1 convolution; regression outputs are scaled to the task's units (``Task.output_scale``).

    ``spatial_conv=True`` puts a 3x3(x3) convolution before it, as MTAN's reference heads do
    (lorenmt/mtan ``conv_layer(pred=True)``: conv3x3 then conv1x1, no norm or activation between).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        scale: float = 1.0,
        spatial_conv: bool = False,
    ) -> None:
        super().__init__()
        conv = conv_type(spatial_dims)
        self.spatial = conv(in_channels, in_channels, kernel_size=3, padding=1) if spatial_conv else None
        self.conv = conv(in_channels, out_channels, kernel_size=1)
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x if self.spatial is None else self.spatial(x))
        return out * self.scale if self.scale != 1.0 else out


class PooledHead(nn.Module):
    """Global average and global max pooling, then Linear-LeakyReLU-Linear to the task's logits.

    Features arrive GroupNorm-normalised per sample, which makes their spatial mean nearly the same
    for every image: average pooling alone discards the global cue (how much lung is ground glass).
    The max keeps "is there such a region, how strongly", so both are pooled.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(2 * in_channels, in_channels), nn.LeakyReLU(0.01), nn.Linear(in_channels, out_channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(2)
        return self.mlp(torch.cat([flat.mean(dim=2), flat.amax(dim=2)], dim=1))


def make_head(
    task: Task, spatial_dims: int, dense_channels: int, pooled_channels: int, spatial_conv: bool = False
) -> nn.Module:
    """The head a task needs: dense on ``dense_channels`` features, pooled on ``pooled_channels``."""
    if task.dense:
        return DenseHead(spatial_dims, dense_channels, task.out_channels, task.output_scale, spatial_conv)
    return PooledHead(pooled_channels, task.out_channels)
