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


def pointwise_conv(x: torch.Tensor, weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``F.conv{2,3}d(x, weight, groups=groups)`` for a 1x1(x1) kernel without bias, as a matrix product.

    The same numbers, several times faster on a CPU at the few channels of attention masks (oneDNN's
    grouped 1x1 convolution and its backward are slow there). Keeps x's memory format.
    """
    b, c, *spatial = x.shape
    w = weight.reshape(groups, -1, c // groups)  # (groups, out per group, in per group)
    if x.is_contiguous():
        out = torch.matmul(w, x.reshape(b, groups, c // groups, -1))  # (B, groups, out, N)
        # matmul may return a transposed (channels-last) result, which sends GroupNorm's backward down
        # a path several times slower: keep the layout the rest of the network has.
        return out.reshape(b, -1, *spatial).contiguous()
    rows = x.movedim(1, -1).reshape(b, -1, groups, c // groups)  # a view when channels-last
    out = torch.einsum("bngc,goc->bngo", rows, w)
    return out.reshape(b, *spatial, -1).movedim(-1, 1)


class SoftMask(nn.Sequential):
    """Task attention mask in [0, 1]: 1x1 conv, norm, act, 1x1 conv, norm, sigmoid (MTAN's att_layer).

    With ``tasks > 1`` it is that many independent masks computed at once on task-stacked channels:
    input (B, tasks * in_channels, ...) and output (B, tasks * out_channels, ...), task t in the t-th
    block of channels. The 1x1 convolutions are grouped (groups = tasks) and GroupNorm has ``tasks``
    times the groups, so each block sees exactly its own single-task mask's weights and statistics:
    six operators for all tasks instead of six per task (on a CPU, tiny masks cost operator calls,
    not FLOPs). `stacked` builds one from single-task masks.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, tasks: int = 1) -> None:
        conv = conv_type(spatial_dims)
        groups = tasks * math.gcd(out_channels, NORM_GROUPS)
        super().__init__(
            conv(tasks * in_channels, tasks * out_channels, 1, groups=tasks, bias=False),
            nn.GroupNorm(groups, tasks * out_channels),
            activation(),
            conv(tasks * out_channels, tasks * out_channels, 1, groups=tasks, bias=False),
            nn.GroupNorm(groups, tasks * out_channels),
            nn.Sigmoid(),
        )
        self.tasks = tasks

    def forward(self, x: torch.Tensor, shared_input: bool = False) -> torch.Tensor:
        """``shared_input``: ``x`` has ``in_channels`` channels that every task's mask reads (the same
        as stacking ``tasks`` copies of it, without the copies)."""
        conv1, norm1, act, conv2, norm2, sigmoid = self
        x = pointwise_conv(x, conv1.weight, groups=1 if shared_input else self.tasks)
        x = act(norm1(x))
        return sigmoid(norm2(pointwise_conv(x, conv2.weight, groups=self.tasks)))

    @classmethod
    def stacked(cls, masks: list[SoftMask]) -> SoftMask:
        """One multi-task mask holding copies of the weights of single-task ``masks``, in order."""
        conv = masks[0][0]
        if any(m.tasks != 1 for m in masks):
            raise ValueError("SoftMask.stacked takes single-task masks")
        with torch.device("meta"):  # no initialisation, no random numbers drawn
            out = cls(conv.weight.dim() - 2, conv.in_channels, conv.out_channels, tasks=len(masks))
        out = out.to_empty(device=conv.weight.device).to(conv.weight.dtype)
        with torch.no_grad():
            for i in (0, 1, 3, 4):
                for name, param in out[i].named_parameters(recurse=False):
                    param.copy_(torch.cat([getattr(m[i], name) for m in masks]))
        return out
