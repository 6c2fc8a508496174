"""Single-task learning (STL): one independent network per task, the reference for Δ_MTL.

Each network is `HardSharing` with one task, i.e. the same backbone and head the multi-task models
use. With several tasks the nets share nothing; training runs one job per task (``--task``), and this
wrapper only keeps the ``{task: prediction}`` interface uniform.
"""

from __future__ import annotations

import torch
from torch import nn

from ctan.models.backbone import MultiTaskNet
from ctan.models.hps import HardSharing
from ctan.tasks import Task


class SingleTaskNets(MultiTaskNet):
    def __init__(
        self, tasks: list[Task], in_channels: int, spatial_dims: int, width: int, depth: int
    ) -> None:
        super().__init__(tasks, in_channels, spatial_dims, width, depth)
        self.nets = nn.ModuleDict(
            {t.name: HardSharing([t], in_channels, spatial_dims, width, depth) for t in self.tasks}
        )

    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for net in self.nets.values():
            out.update(net.predict(x))
        return out
