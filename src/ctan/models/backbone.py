"""The U-Net backbone every architecture is built from: encoder stages, bottleneck, decoder.

Stage ``i`` (0 = full resolution) has ``width * 2**i`` channels; the encoder has ``depth`` stages,
each a `ConvBlock` followed by 2x max-pooling, then a bottleneck `ConvBlock` at 1/2**depth resolution
with ``width * 2**depth`` channels. The decoder mirrors the encoder: transposed-conv up-sampling,
concatenation with the encoder stage's skip features, `ConvBlock`. `MultiTaskNet` is the base every
architecture shares: its configuration, the input check and the ``{task: prediction}`` contract.

Any input size works: one whose sizes are not multiples of ``2**depth`` (a case on its native grid, a
patch of any size) is zero-padded at the far end of each axis up to the next multiple and the dense
outputs are cropped back, so every output voxel is the input voxel's (image-level heads pool over the
padding too). Sizes that are multiples take the unpadded path unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ctan.errors import CtanError
from ctan.models.blocks import ConvBlock, conv_transpose_type, max_pool
from ctan.tasks import Task


def stage_channels(width: int, depth: int) -> list[int]:
    """Channels of encoder stages 0..depth-1 and, last, of the bottleneck."""
    return [width * 2**i for i in range(depth + 1)]


def check_input(x: torch.Tensor, in_channels: int, spatial_dims: int) -> None:
    """Fail with one clear line instead of a shape error deep inside a concatenation."""
    if x.dim() != spatial_dims + 2:
        raise CtanError(
            None,
            f"model input has shape {tuple(x.shape)}; expected (batch, {in_channels}, "
            f"{spatial_dims} spatial sizes) for spatial_dims={spatial_dims}",
        )
    if x.shape[1] != in_channels:
        raise CtanError(None, f"model input has {x.shape[1]} channels; the model was built for {in_channels}")


class Encoder(nn.Module):
    """``depth`` down-sampling stages and the bottleneck (the last entry of `blocks`)."""

    def __init__(self, spatial_dims: int, in_channels: int, width: int, depth: int) -> None:
        super().__init__()
        ch = stage_channels(width, depth)
        inputs = [in_channels, *ch[:-1]]
        self.blocks = nn.ModuleList(ConvBlock(spatial_dims, i, o) for i, o in zip(inputs, ch, strict=True))
        self.pool = max_pool(spatial_dims)

    def features(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(first-layer output, stage output) per stage, bottleneck last; for attention models."""
        out = []
        for i, block in enumerate(self.blocks):
            if i:
                x = self.pool(x)
            first, x = block.features(x)
            out.append((first, x))
        return out

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Stage outputs: skips for stages 0..depth-1, bottleneck last."""
        out = []
        for i, block in enumerate(self.blocks):
            x = block(self.pool(x) if i else x)
            out.append(x)
        return out


class Decoder(nn.Module):
    """Up-sampling path from the bottleneck to full resolution with ``width`` output channels."""

    def __init__(self, spatial_dims: int, width: int, depth: int) -> None:
        super().__init__()
        ch = stage_channels(width, depth)
        up = conv_transpose_type(spatial_dims)
        self.ups = nn.ModuleList(up(ch[k + 1], ch[k], kernel_size=2, stride=2) for k in range(depth))
        self.blocks = nn.ModuleList(ConvBlock(spatial_dims, 2 * ch[k], ch[k]) for k in range(depth))

    def forward(self, bottleneck: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        x = bottleneck
        for k in reversed(range(len(self.blocks))):
            x = self.blocks[k](torch.cat([self.ups[k](x), skips[k]], dim=1))
        return x


class MultiTaskNet(nn.Module):
    """What every architecture shares: its configuration, input checks and ``{task: prediction}``."""

    def __init__(
        self, tasks: list[Task], in_channels: int, spatial_dims: int, width: int, depth: int
    ) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        self.in_channels = in_channels
        self.spatial_dims = spatial_dims
        self.width = width
        self.depth = depth

    takes_attention_heads = False  # whether the constructor takes `attention_heads`

    @classmethod
    def check_settings(cls, width: int, depth: int, attention_heads: int) -> None:
        """ValueError naming a setting this architecture cannot use (most use no optional one)."""

    @property
    def dense_tasks(self) -> list[Task]:
        return [t for t in self.tasks if t.dense]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        check_input(x, self.in_channels, self.spatial_dims)
        spatial = tuple(x.shape[2:])
        factor = 2**self.depth
        padded = tuple(-(-n // factor) * factor for n in spatial)
        if padded == spatial:
            return self.predict(x)
        # F.pad lists (before, after) pairs from the last axis backwards.
        pad = [p for n, q in zip(spatial[::-1], padded[::-1], strict=True) for p in (0, q - n)]
        out = self.predict(F.pad(x, pad))
        crop = (Ellipsis, *(slice(0, n) for n in spatial))
        dense = {t.name for t in self.dense_tasks}
        return {name: y[crop] if name in dense else y for name, y in out.items()}

    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError
