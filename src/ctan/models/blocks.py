"""Layer factories and small blocks shared by every architecture, for 2D and 3D alike.

One code path serves both: a factory picks ``nn.Conv2d`` or `Conv3d` (and friends) from
``spatial_dims``, as MONAI's networks do; `Conv3d` and `ConvTranspose3d` are PyTorch's layers with a
faster backward on the CPU. The same normalisation (GroupNorm) and activation
(LeakyReLU) are used everywhere, attention masks included, so that architectures differ only in how
they share features, not in their layers.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

NORM_GROUPS = 8
"""Upper bound on GroupNorm groups; ``gcd(channels, 8)`` groups are used (instance norm at <= 8 channels)."""


_CHANNELS_LAST_BACKWARD = True


@contextlib.contextmanager
def channels_last_backward(enabled: bool) -> Iterator[None]:
    """Turn `Conv3d`'s channels-last backward on or off, for A/B measurements (benchmarks/)."""
    global _CHANNELS_LAST_BACKWARD
    before, _CHANNELS_LAST_BACKWARD = _CHANNELS_LAST_BACKWARD, enabled
    try:
        yield
    finally:
        _CHANNELS_LAST_BACKWARD = before


def _backward_in_channels_last(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a 3D convolution's gradients are better computed on channels-last copies: on a CPU, in
    plain fp32 training with contiguous (channels-first) tensors. Inference, CUDA, autocast and a
    model already in channels-last keep PyTorch's own path."""
    return (
        _CHANNELS_LAST_BACKWARD
        and x.device.type == "cpu"
        and x.dim() == 5
        and x.dtype == torch.float32
        and torch.is_grad_enabled()
        and (x.requires_grad or weight.requires_grad)
        and not torch.is_autocast_enabled("cpu")
        and x.is_contiguous()
    )


class _ChannelsLastBackward(torch.autograd.Function):
    """A 3D (transposed) convolution whose forward is PyTorch's own and whose backward runs on
    channels-last copies of the input and the output gradient.

    Why: for channels-first 3D tensors oneDNN computes the weight gradient by im2col + GEMM
    (``x64:gemm:jit``) and the input gradient through 16-channel blocked copies, both slow at the few
    channels of the first stages; in channels-last it has direct kernels. On one CPU thread a stage-0
    OpenKBP convolution's (8 -> 8 channels, 2x24x40x40) backward took 26 ms against 7 ms
    (docs/architecture.md, "A seventh round"). The forward, and so every prediction, is unchanged
    bit for bit; the gradients agree to rounding. In 2D the copies cost what the kernels save.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
        args = (stride, padding, dilation, transposed, output_padding, groups)
        ctx.save_for_backward(x, weight)
        ctx.args = args
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        return torch.ops.aten.convolution(x, weight, bias, *args)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:3])
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out.contiguous(memory_format=torch.channels_last_3d),
            x.contiguous(memory_format=torch.channels_last_3d),
            weight,
            ctx.bias_sizes,
            *ctx.args,
            mask,
        )
        # Back to the layout the rest of the network has (element-wise ops on mixed layouts are slow).
        grad_x = None if grad_x is None else grad_x.contiguous()
        grad_w = None if grad_w is None else grad_w.contiguous()
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


class Conv3d(nn.Conv3d):
    """`nn.Conv3d` (same parameters and state dict) with `_ChannelsLastBackward` where it applies."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if isinstance(self.padding, str) or not _backward_in_channels_last(x, weight):
            return super()._conv_forward(x, weight, bias)
        if self.padding_mode != "zeros":  # padded here, as nn.Conv3d does
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = [0, 0, 0]
        else:
            padding = list(self.padding)
        geometry = (list(self.stride), padding, list(self.dilation), False, [0, 0, 0], self.groups)
        return _ChannelsLastBackward.apply(x, weight, bias, *geometry)


class ConvTranspose3d(nn.ConvTranspose3d):
    """`nn.ConvTranspose3d` (same parameters and state dict) with `_ChannelsLastBackward` where it applies."""

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if self.padding_mode != "zeros" or not _backward_in_channels_last(x, self.weight):
            return super().forward(x, output_size)
        stride, padding, dilation = list(self.stride), list(self.padding), list(self.dilation)
        output_padding = self._output_padding(
            x, output_size, stride, padding, list(self.kernel_size), 3, dilation
        )
        geometry = (stride, padding, dilation, True, list(output_padding), self.groups)
        return _ChannelsLastBackward.apply(x, self.weight, self.bias, *geometry)


def conv_type(spatial_dims: int) -> type[nn.Module]:
    return {2: nn.Conv2d, 3: Conv3d}[spatial_dims]


def conv_transpose_type(spatial_dims: int) -> type[nn.Module]:
    return {2: nn.ConvTranspose2d, 3: ConvTranspose3d}[spatial_dims]


def max_pool(spatial_dims: int) -> nn.Module:
    """Halve every spatial size (the U-Net's and MTAN's down-sampling)."""
    return {2: nn.MaxPool2d, 3: nn.MaxPool3d}[spatial_dims](kernel_size=2, stride=2)


def norm(channels: int) -> nn.GroupNorm:
    """GroupNorm: batch sizes here are 1-8, where BatchNorm statistics are too noisy."""
    return nn.GroupNorm(math.gcd(channels, NORM_GROUPS), channels)


def activation() -> nn.Module:
    return nn.LeakyReLU(0.01, inplace=True)


@functools.lru_cache(maxsize=64)
def _doubling_matrix(size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(2 * size, size): linear interpolation of one axis to twice its size with align_corners=True,
    as F.interpolate samples it (output i at input position i * (size - 1) / (2 * size - 1))."""
    with torch.inference_mode(False):  # cached: must be usable in autograd later, wherever first made
        out = 2 * size
        position = torch.arange(out, dtype=torch.float64) * (size - 1) / (out - 1)
        low = position.floor().long().clamp(max=size - 1)
        high = (low + 1).clamp(max=size - 1)
        fraction = position - low
        matrix = torch.zeros(out, size, dtype=torch.float64)
        rows = torch.arange(out)
        matrix.index_put_((rows, low), 1 - fraction, accumulate=True)
        matrix.index_put_((rows, high), fraction, accumulate=True)
        return matrix.to(device=device, dtype=dtype)


def upsample(x: torch.Tensor) -> torch.Tensor:
    """Double every spatial size by (bi|tri)linear interpolation with align_corners=True, as MTAN's
    decoder attention does.

    On a CPU in fp32 as one matrix product per axis (interpolation is separable): the same numbers to
    float rounding, and forward + backward 1.6-4.7x faster than F.interpolate's kernels at MTAN's
    shapes here (docs/architecture.md, "An eighth round"). Elsewhere (CUDA, autocast, other dtypes)
    F.interpolate itself.
    """
    if x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        mode = "bilinear" if x.dim() == 4 else "trilinear"
        return F.interpolate(x, scale_factor=2, mode=mode, align_corners=True)
    h, w = x.shape[-2:]
    y = _doubling_matrix(h, x.device, x.dtype) @ (x @ _doubling_matrix(w, x.device, x.dtype).T)
    if x.dim() == 5:  # depth: the (h, w) plane flattened, so that one product interpolates it
        y = (_doubling_matrix(x.shape[2], x.device, x.dtype) @ y.flatten(-2)).unflatten(-1, y.shape[-2:])
    return y


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
