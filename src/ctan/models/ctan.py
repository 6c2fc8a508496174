"""Cross-Task Attention Network (CTAN; Kim, Purdie & McIntosh, MICCAI 2023 Workshops), our reading.

The paper states: a shared encoder, a Cross-Task Attention Encoder (CTAE), a Cross-Task Attention
Bottleneck (CTAB), task-specific decoders, tasks from pixel- to image-level. No code is public; the
rest is our design (docs/architecture.md says why):

- CTAE: MTAN-style soft masks on every shared encoder stage and on the bottleneck, where task t's mask
  at stage j is computed from the shared stage's first-layer features, task t's own attended features
  from stage j-1 *and the mean of the other tasks'* attended features from stage j-1. Attended
  features go to the next stage through a shared stride-2 2x2(x2) conv (MTAN: 3x3 conv, max-pool).
- CTAB: at the bottleneck, each task's feature tokens are queries of a task-specific multi-head
  attention whose keys and values are the other tasks' tokens; a pre-norm residual block whose output
  projection starts at zero, so it begins as the identity. With one task it is self-attention.
- Dense tasks decode from their CTAB output with skips from their own attended encoder features;
  image-level tasks pool their CTAB output.

``use_ctae=False`` (`ctan_no_ctae`): every task starts from the shared bottleneck and the shared
skips, so CTAB attends over identical features and becomes task-specific self-attention.
``use_ctab=False`` (`ctan_no_ctab`): the attended bottleneck features go straight to the decoders.
"""

from __future__ import annotations

import torch
from torch import nn

from ctan.models.backbone import Decoder, Encoder, MultiTaskNet, stage_channels
from ctan.models.blocks import ConvNormAct, SoftMask
from ctan.models.heads import make_head
from ctan.tasks import Task


class CrossTaskAttentionEncoder(nn.Module):
    """Per-task soft masks on each shared encoder stage, informed by the other tasks' features.

    All tasks are computed at once: one task-stacked `SoftMask` per stage (grouped 1x1 convolutions)
    and the shared down-sampling conv on the tasks stacked along the batch axis; the same function as
    one mask per task, with a few operator calls per stage instead of a few per stage and task.
    """

    def __init__(self, task_names: list[str], spatial_dims: int, width: int, depth: int) -> None:
        super().__init__()
        ch = stage_channels(width, depth)
        others = 1 if len(task_names) > 1 else 0
        self.task_names = list(task_names)
        # Built per task first, in the order (task, stage) a per-task ModuleDict would be, so that a
        # seed gives the same initial weights as one mask module per task did.
        per_task = [
            [
                SoftMask(spatial_dims, ch[j] if j == 0 else (2 + others) * ch[j], ch[j])
                for j in range(depth + 1)
            ]
            for _ in task_names
        ]
        self.masks = nn.ModuleList(SoftMask.stacked([m[j] for m in per_task]) for j in range(depth + 1))
        # Shared between tasks, like MTAN's encoder_block_att (3x3 conv, then max-pool); here a 2x2(x2)
        # stride-2 conv: same output size, ~1/27 of the MACs in 3D and no max-pool (slow on CPU).
        self.down = nn.ModuleList(
            ConvNormAct(spatial_dims, ch[j], ch[j + 1], kernel_size=2, stride=2) for j in range(depth)
        )

    def context(self, first: torch.Tensor, carried: list[torch.Tensor]) -> torch.Tensor:
        """What the masks see, task-stacked on channels: per task the shared features, its own and the
        mean of the others' previous stage."""
        n = len(carried)
        if n == 1:
            return torch.cat([first, carried[0]], dim=1)
        if n == 2:
            return torch.cat([first, carried[0], carried[1], first, carried[1], carried[0]], dim=1)
        total = torch.stack(carried).sum(dim=0)
        parts = [p for c in carried for p in (first, c, (total - c) / (n - 1))]
        return torch.cat(parts, dim=1)

    def forward(
        self, shared: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[dict[str, list[torch.Tensor]], dict[str, torch.Tensor]]:
        """Per task: attended skip features of stages 0..depth-1, and attended bottleneck features."""
        names = self.task_names
        skips: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        carried: list[torch.Tensor] = []
        attended: list[torch.Tensor] = []
        for j, (first, stage_out) in enumerate(shared):
            if carried:
                mask = self.masks[j](self.context(first, carried))
            else:
                mask = self.masks[j](first, shared_input=True)
            # (B, T*C, ...) -> (B, T, C, ...), times the shared stage output: every task's attended
            # features, in the mask's own memory layout (a transposed view here made every element-wise
            # operator on it, forward and backward, a strided loop several times slower).
            stacked = mask.unflatten(1, (len(names), stage_out.shape[1])) * stage_out.unsqueeze(1)
            attended = list(stacked.unbind(1))
            if j < len(self.down):
                for n, a in zip(names, attended, strict=True):
                    skips[n].append(a)
                # All tasks through the shared conv as one batch of B*T samples (a view, no copy);
                # GroupNorm is per sample, so this is exact.
                down = self.down[j](stacked.flatten(0, 1))
                carried = list(down.unflatten(0, (-1, len(names))).unbind(1))
        return skips, dict(zip(names, attended, strict=True))


class CrossTaskAttentionBottleneck(nn.Module):
    """Each task's bottleneck tokens attend to the other tasks' tokens (self-attention if alone).

    A pre-norm residual block, ``x + Attn(LN(x), LN(others))``, whose output projection starts at
    zero: at initialisation CTAB is the identity, so a task head first sees the encoder features
    unchanged and the cross-task exchange grows only as far as it helps. The post-norm form used
    before (``LN(x + Attn(...))``) re-normalised every token from the first step; with it the
    HAM10000 diagnosis head stayed at the class prior at lr 5e-3 (issue 11).
    """

    def __init__(self, task_names: list[str], channels: int, heads: int) -> None:
        super().__init__()
        self.task_names = list(task_names)
        self.attention = nn.ModuleDict(
            {n: nn.MultiheadAttention(channels, heads, batch_first=True) for n in task_names}
        )
        self.query_norms = nn.ModuleDict({n: nn.LayerNorm(channels) for n in task_names})
        self.context_norms = nn.ModuleDict({n: nn.LayerNorm(channels) for n in task_names})
        for attention in self.attention.values():
            nn.init.zeros_(attention.out_proj.weight)
            nn.init.zeros_(attention.out_proj.bias)

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tokens = {n: f.flatten(2).transpose(1, 2) for n, f in features.items()}  # (B, N, C)
        out = {}
        for n in self.task_names:
            others = [tokens[m] for m in self.task_names if m != n] or [tokens[n]]
            context = self.context_norms[n](torch.cat(others, dim=1))
            attended, _ = self.attention[n](
                self.query_norms[n](tokens[n]), context, context, need_weights=False
            )
            out[n] = (tokens[n] + attended).transpose(1, 2).reshape(features[n].shape)
        return out


class CTAN(MultiTaskNet):
    takes_attention_heads = True

    @classmethod
    def check_settings(cls, width: int, depth: int, attention_heads: int) -> None:
        from ctan.models import attention_heads_problem

        problem = attention_heads_problem(width, depth, attention_heads)
        if problem:
            raise ValueError(problem)

    def __init__(
        self,
        tasks: list[Task],
        in_channels: int,
        spatial_dims: int,
        width: int,
        depth: int,
        attention_heads: int = 2,
        use_ctae: bool = True,
        use_ctab: bool = True,
    ) -> None:
        super().__init__(tasks, in_channels, spatial_dims, width, depth)
        ch = stage_channels(width, depth)
        names = [t.name for t in self.tasks]
        self.encoder = Encoder(spatial_dims, in_channels, width, depth)
        self.ctae = CrossTaskAttentionEncoder(names, spatial_dims, width, depth) if use_ctae else None
        self.ctab = CrossTaskAttentionBottleneck(names, ch[-1], attention_heads) if use_ctab else None
        self.decoders = nn.ModuleDict({t.name: Decoder(spatial_dims, width, depth) for t in self.dense_tasks})
        self.heads = nn.ModuleDict({t.name: make_head(t, spatial_dims, ch[0], ch[-1]) for t in self.tasks})

    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        names = [t.name for t in self.tasks]
        if self.ctae is not None:
            skips, bottleneck = self.ctae(self.encoder.features(x))
        else:
            *shared_skips, shared_bottleneck = self.encoder(x)
            skips = {n: shared_skips for n in names}
            bottleneck = {n: shared_bottleneck for n in names}
        if self.ctab is not None:
            bottleneck = self.ctab(bottleneck)
        out = {}
        for task in self.tasks:
            features = bottleneck[task.name]
            if task.dense:
                features = self.decoders[task.name](features, skips[task.name])
            out[task.name] = self.heads[task.name](features)
        return out
