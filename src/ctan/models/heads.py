"""Task heads, identical in every architecture so that comparisons isolate how features are shared.

Dense tasks (segmentation, dose) get a 1x1 convolution on full-resolution decoder features; image-level
tasks (diagnosis, COVID, severity) get global average pooling of bottleneck features and a small MLP.
Outputs are raw: logits, or Gy for dose.
"""

from __future__ import annotations

import torch
from torch import nn

from ctan.models.blocks import conv_type
from ctan.tasks import Task


class DenseHead(nn.Module):
    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = conv_type(spatial_dims)(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class PooledHead(nn.Module):
    """Global average pool, then Linear-LeakyReLU-Linear to the task's logits."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_channels, in_channels), nn.LeakyReLU(0.01), nn.Linear(in_channels, out_channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x.flatten(2).mean(dim=2))


def make_head(task: Task, spatial_dims: int, dense_channels: int, pooled_channels: int) -> nn.Module:
    """The head a task needs: dense on ``dense_channels`` features, pooled on ``pooled_channels``."""
    if task.dense:
        return DenseHead(spatial_dims, dense_channels, task.out_channels)
    return PooledHead(pooled_channels, task.out_channels)
