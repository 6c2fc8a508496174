"""Hard parameter sharing (HPS): one shared encoder and bottleneck, task-specific decoders and heads.

With a single task this is a plain U-Net (or, for an image-level task, the U-Net encoder with a pooled
head), which is exactly what `stl` trains per task.
"""

from __future__ import annotations

import torch
from torch import nn

from ctan.models.backbone import Decoder, Encoder, MultiTaskNet, stage_channels
from ctan.models.heads import make_head
from ctan.tasks import Task


class HardSharing(MultiTaskNet):
    def __init__(
        self, tasks: list[Task], in_channels: int, spatial_dims: int, width: int, depth: int
    ) -> None:
        super().__init__(tasks, in_channels, spatial_dims, width, depth)
        ch = stage_channels(width, depth)
        self.encoder = Encoder(spatial_dims, in_channels, width, depth)
        self.decoders = nn.ModuleDict({t.name: Decoder(spatial_dims, width, depth) for t in self.dense_tasks})
        self.heads = nn.ModuleDict({t.name: make_head(t, spatial_dims, ch[0], ch[-1]) for t in self.tasks})

    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        *skips, bottleneck = self.encoder(x)
        out = {}
        for task in self.tasks:
            if task.dense:
                features = self.decoders[task.name](bottleneck, skips)
            else:
                features = bottleneck
            out[task.name] = self.heads[task.name](features)
        return out
