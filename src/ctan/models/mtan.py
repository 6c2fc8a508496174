"""Multi-Task Attention Network (MTAN; Liu, Johns & Davison, CVPR 2019), on our U-Net backbone.

Follows the reference implementation (lorenmt/mtan, ``model_segnet_mtan.py``), with its SegNet
replaced by the U-Net used everywhere here:

- The shared U-Net is the global feature pool; it has no head of its own.
- Encoder stage j, task i: ``mask = SoftMask(cat(first_j, a_i^{j-1}))`` (stage 0: ``first_0`` only),
  ``attended = mask * out_j``, then a *shared* 3x3 conv to the next stage's channels and 2x max-pool
  gives ``a_i^j``. ``first_j``/``out_j`` are the first-layer and block outputs of the shared stage.
- At the bottleneck the mask is applied to the shared bottleneck output without a further conv (as in
  the ResNet variant of the reference); image-level tasks pool these attended features.
- Decoder stage k, dense task i: up-sample the task's previous attended features (bilinear /
  trilinear, align_corners=True), shared 3x3 conv to stage k's channels, ``mask =
  SoftMask(cat(up_k, that))`` where ``up_k`` is the shared decoder's up-sampled input, ``attended =
  mask * dec_k``. The full-resolution attended features feed the task's head.
- Dense heads as in the reference: a 3x3 conv + 1x1 conv per task (the other architectures' task-
  specific decoders already give each task its own spatial layers).
- Differences from the reference (ours): GroupNorm instead of BatchNorm, and the shared decoder has
  U-Net skip connections.
"""

from __future__ import annotations

import torch
from torch import nn

from ctan.models.backbone import Decoder, Encoder, MultiTaskNet, stage_channels
from ctan.models.blocks import ConvNormAct, SoftMask, max_pool, upsample
from ctan.models.heads import make_head
from ctan.tasks import Task


class MTAN(MultiTaskNet):
    def __init__(
        self, tasks: list[Task], in_channels: int, spatial_dims: int, width: int, depth: int
    ) -> None:
        super().__init__(tasks, in_channels, spatial_dims, width, depth)
        ch = stage_channels(width, depth)
        sd = spatial_dims
        self.encoder = Encoder(sd, in_channels, width, depth)
        # Shared convs of the attention path between encoder stages (reference: encoder_block_att).
        self.encoder_att_convs = nn.ModuleList(ConvNormAct(sd, ch[j], ch[j + 1]) for j in range(depth))
        # All tasks' masks of a stage at once (task-stacked, see SoftMask); built per task first, in the
        # order one module per task was, so that a seed gives the same initial weights.
        per_task = [
            [SoftMask(sd, ch[j] if j == 0 else 2 * ch[j], ch[j]) for j in range(depth + 1)]
            for _ in self.tasks
        ]
        self.encoder_masks = nn.ModuleList(
            SoftMask.stacked([m[j] for m in per_task]) for j in range(depth + 1)
        )
        self.pool = max_pool(sd)
        dense = self.dense_tasks
        if dense:  # the shared decoder exists only when some task reads it (no dead parameters)
            self.decoder = Decoder(sd, width, depth)
            self.decoder_att_convs = nn.ModuleList(ConvNormAct(sd, ch[k + 1], ch[k]) for k in range(depth))
            self.decoder_masks = nn.ModuleDict(
                {t.name: nn.ModuleList(SoftMask(sd, 2 * ch[k], ch[k]) for k in range(depth)) for t in dense}
            )
        # Dense tasks share one decoder here, so each needs spatial capacity of its own (reference heads).
        self.heads = nn.ModuleDict(
            {t.name: make_head(t, sd, ch[0], ch[-1], spatial_conv=True) for t in self.tasks}
        )

    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        shared = self.encoder.features(x)
        skips = [out for _, out in shared[:-1]]
        dense = self.dense_tasks
        if dense:
            # Shared decoder, keeping each stage's up-sampled input and output for the masks.
            g = shared[-1][1]
            ups: list[torch.Tensor] = [g] * self.depth
            decs: list[torch.Tensor] = [g] * self.depth
            for k in reversed(range(self.depth)):
                ups[k] = self.decoder.ups[k](g)
                g = decs[k] = self.decoder.blocks[k](torch.cat([ups[k], skips[k]], dim=1))

        # Encoder attention for all tasks at once: masks on task-stacked channels, the shared attention
        # convs on the tasks stacked along the batch axis (GroupNorm is per sample: exact).
        n_tasks = len(self.tasks)
        a = None
        for j, (first, stage_out) in enumerate(shared):
            if a is None:
                mask = self.encoder_masks[j](first, shared_input=True)
            else:
                mask = self.encoder_masks[j](
                    torch.cat([p for c in a.chunk(n_tasks) for p in (first, c)], dim=1)
                )
            stacked = mask.unflatten(1, (n_tasks, stage_out.shape[1])).transpose(0, 1) * stage_out
            if j < self.depth:
                a = self.pool(self.encoder_att_convs[j](stacked.flatten(0, 1)))
        encoded = stacked.unbind(0)

        out = {}
        for i, task in enumerate(self.tasks):
            attended = encoded[i]
            if task.dense:
                dec_masks = self.decoder_masks[task.name]
                for k in reversed(range(self.depth)):
                    b = self.decoder_att_convs[k](upsample(attended))
                    attended = dec_masks[k](torch.cat([ups[k], b], dim=1)) * decs[k]
            out[task.name] = self.heads[task.name](attended)
        return out
