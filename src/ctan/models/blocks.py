"""Layer factories and small blocks shared by every architecture, for 2D and 3D alike.

One code path serves both: a factory picks ``nn.Conv2d`` or ``nn.Conv3d`` (and friends) from
``spatial_dims``, as MONAI's networks do. The same normalisation (GroupNorm) and activation
(LeakyReLU) are used everywhere, attention masks included, so that architectures differ only in how
they share features, not in their layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NORM_GROUPS = 8
"""Upper bound on GroupNorm groups; ``gcd(channels, 8)`` groups are used (instance norm at <= 8 channels)."""


def conv_type(spatial_dims: int) -> type[nn.Module]:
    return {2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]


def conv_transpose_type(spatial_dims: int) -> type[nn.Module]:
    return {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[spatial_dims]


def max_pool(spatial_dims: int) -> nn.Module:
    """Halve every spatial size (the U-Net's and MTAN's down-sampling)."""
    return {2: nn.MaxPool2d, 3: nn.MaxPool3d}[spatial_dims](kernel_size=2, stride=2)


def norm(channels: int) -> nn.GroupNorm:
    """GroupNorm: batch sizes here are 1-8, where BatchNorm statistics are too noisy."""
    return nn.GroupNorm(math.gcd(channels, NORM_GROUPS), channels)


def activation() -> nn.Module:
    return nn.LeakyReLU(0.01, inplace=True)


def upsample(x: torch.Tensor) -> torch.Tensor:
    """Double every spatial size by (bi|tri)linear interpolation, as MTAN's decoder attention does."""
    mode = "bilinear" if x.dim() == 4 else "trilinear"
    return F.interpolate(x, scale_factor=2, mode=mode, align_corners=True)


class ConvNormAct(nn.Sequential):
    """Convolution (no bias: the norm removes it), GroupNorm, LeakyReLU.

    Padding ``(kernel_size - 1) // 2`` keeps the size for odd kernels at stride 1 and halves it exactly
    for kernel 2 or 3 at stride 2.
    """

    def __init__(
        self, spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1
    ) -> None:
        super().__init__(
            conv_type(spatial_dims)(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=(kernel_size - 1) // 2,
                bias=False,
            ),
            norm(out_channels),
            activation(),
        )


class ConvBlock(nn.Module):
    """Two 3x3 ConvNormAct layers: one U-Net stage.

    `features` also returns the first layer's output, because MTAN-style attention computes its mask
    from it and applies the mask to the block's output (Liu et al. 2019, Fig. 2).
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.first = ConvNormAct(spatial_dims, in_channels, out_channels)
        self.second = ConvNormAct(spatial_dims, out_channels, out_channels)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.first(x)
        return first, self.second(first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


class SoftMask(nn.Sequential):
    """Task attention mask in [0, 1]: 1x1 conv, norm, act, 1x1 conv, norm, sigmoid (MTAN's att_layer)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int) -> None:
        conv = conv_type(spatial_dims)
        super().__init__(
            conv(in_channels, out_channels, 1, bias=False),
            norm(out_channels),
            activation(),
            conv(out_channels, out_channels, 1, bias=False),
            norm(out_channels),
            nn.Sigmoid(),
        )
