"""Task-stacked attention masks (CTAE, MTAN) compute what one mask module per task computed, same weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ctan.models import build_model
from ctan.models.backbone import Encoder, stage_channels
from ctan.models.blocks import ConvNormAct, SoftMask, pointwise_conv
from ctan.models.ctan import CrossTaskAttentionEncoder
from ctan.tasks import Task

TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class PerTaskCTAE(nn.Module):
    """The CTAE as it was before the masks were stacked: one SoftMask per task and stage, a loop."""

    def __init__(self, task_names: list[str], spatial_dims: int, width: int, depth: int) -> None:
        super().__init__()
        ch = stage_channels(width, depth)
        others = 1 if len(task_names) > 1 else 0
        self.task_names = list(task_names)
        self.masks = nn.ModuleDict(
            {
                name: nn.ModuleList(
                    SoftMask(spatial_dims, ch[j] if j == 0 else (2 + others) * ch[j], ch[j])
                    for j in range(depth + 1)
                )
                for name in task_names
            }
        )
        self.down = nn.ModuleList(
            ConvNormAct(spatial_dims, ch[j], ch[j + 1], kernel_size=2, stride=2) for j in range(depth)
        )

    def context(self, first, carried, name):
        if not carried:
            return first
        others = [carried[m] for m in self.task_names if m != name]
        parts = [first, carried[name]]
        if len(others) == 1:
            parts.append(others[0])
        elif others:
            parts.append(torch.stack(others).mean(dim=0))
        return torch.cat(parts, dim=1)

    def forward(self, shared):
        names = self.task_names
        skips = {n: [] for n in names}
        carried, attended = {}, {}
        for j, (first, stage_out) in enumerate(shared):
            attended = {n: self.masks[n][j](self.context(first, carried, n)) * stage_out for n in names}
            if j < len(self.down):
                for n in names:
                    skips[n].append(attended[n])
                down = self.down[j](torch.cat([attended[n] for n in names], dim=0))
                carried = dict(zip(names, down.chunk(len(names), dim=0), strict=True))
        return skips, attended


def stacked_from(old: PerTaskCTAE, spatial_dims: int, width: int, depth: int) -> CrossTaskAttentionEncoder:
    new = CrossTaskAttentionEncoder(old.task_names, spatial_dims, width, depth)
    for j in range(depth + 1):
        new.masks[j] = SoftMask.stacked([old.masks[n][j] for n in old.task_names])
    new.down.load_state_dict(old.down.state_dict())
    return new


def perturb(module: nn.Module, seed: int) -> None:
    """Non-trivial GroupNorm affine parameters (they start at 1 and 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


CASES = [(["a", "b"], 2), (["a", "b"], 3), (["a", "b", "c"], 3), (["a", "b", "c"], 2), (["a"], 2)]


@pytest.mark.parametrize(("names", "dims"), CASES)
def test_stacked_ctae_matches_per_task_ctae(names: list[str], dims: int) -> None:
    width, depth = 4, 2
    torch.manual_seed(0)
    encoder = Encoder(dims, 1, width, depth)
    old = PerTaskCTAE(names, dims, width, depth)
    perturb(old, 1)
    new = stacked_from(old, dims, width, depth)
    assert sum(p.numel() for p in new.parameters()) == sum(p.numel() for p in old.parameters())

    x = torch.randn(2, 1, *([16] * dims), generator=torch.Generator().manual_seed(2))
    shared_old = encoder.features(x)
    shared_new = [(f.detach().requires_grad_(), o.detach().requires_grad_()) for f, o in shared_old]
    shared_old = [(f.detach().requires_grad_(), o.detach().requires_grad_()) for f, o in shared_new]
    skips_old, bottleneck_old = old(shared_old)
    skips_new, bottleneck_new = new(shared_new)
    loss_old = loss_new = 0.0
    for n in names:
        torch.testing.assert_close(bottleneck_new[n], bottleneck_old[n], atol=TOLERANCE, rtol=0)
        for a, b in zip(skips_new[n], skips_old[n], strict=True):
            torch.testing.assert_close(a, b, atol=TOLERANCE, rtol=0)
        loss_old = loss_old + bottleneck_old[n].square().mean() + sum(s.mean() for s in skips_old[n])
        loss_new = loss_new + bottleneck_new[n].square().mean() + sum(s.mean() for s in skips_new[n])
    loss_old.backward()
    loss_new.backward()
    for (fo, oo), (fn, on) in zip(shared_old, shared_new, strict=True):
        torch.testing.assert_close(fn.grad, fo.grad, atol=TOLERANCE, rtol=1e-4)
        torch.testing.assert_close(on.grad, oo.grad, atol=TOLERANCE, rtol=1e-4)
    # The weights learn the same: a stacked parameter's gradient is the per-task ones, stacked.
    for j, mask in enumerate(new.masks):
        for i in (0, 1, 3, 4):
            for name, param in mask[i].named_parameters(recurse=False):
                expected = torch.cat([getattr(old.masks[n][j][i], name).grad for n in names])
                torch.testing.assert_close(param.grad, expected, atol=TOLERANCE, rtol=1e-4)
    for a, b in zip(new.down.parameters(), old.down.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=TOLERANCE, rtol=1e-4)


@pytest.mark.parametrize(("names", "dims"), CASES)
def test_same_seed_same_initial_masks(names: list[str], dims: int) -> None:
    """Stacking draws the same random numbers in the same order: a seed gives the weights it gave."""
    torch.manual_seed(3)
    old = PerTaskCTAE(names, dims, 4, 2)
    after_old = torch.rand(1)
    torch.manual_seed(3)
    new = CrossTaskAttentionEncoder(names, dims, 4, 2)
    assert torch.equal(torch.rand(1), after_old)
    reference = stacked_from(old, dims, 4, 2)
    for a, b in zip(new.state_dict().values(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("dims", "groups"), [(2, 1), (2, 3), (3, 2)])
def test_pointwise_conv_is_a_1x1_convolution(dims: int, groups: int, channels_last: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4 * groups, *([5] * dims), generator=g)
    weight = torch.randn(6 * groups, 4, *([1] * dims), generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)
    expected = (F.conv2d if dims == 2 else F.conv3d)(x, weight, groups=groups)
    out = pointwise_conv(x, weight, groups)
    torch.testing.assert_close(out, expected, atol=TOLERANCE, rtol=0)
    assert out.is_contiguous() or channels_last


def test_shared_input_is_stacked_copies() -> None:
    torch.manual_seed(0)
    mask = SoftMask(2, 4, 8, tasks=3)
    perturb(mask, 0)
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(mask(x, shared_input=True), mask(torch.cat([x] * 3, dim=1)), atol=1e-6, rtol=0)


def unstacked(mask: SoftMask) -> list[SoftMask]:
    """The single-task masks a task-stacked one holds."""
    conv = mask[0]
    out = []
    for t in range(mask.tasks):
        single = SoftMask(
            conv.weight.dim() - 2, conv.in_channels // mask.tasks, conv.out_channels // mask.tasks
        )
        with torch.no_grad():
            for i in (0, 1, 3, 4):
                for name, param in single[i].named_parameters(recurse=False):
                    rows = param.shape[0]
                    param.copy_(getattr(mask[i], name)[t * rows : (t + 1) * rows])
        out.append(single)
    return out


def per_task_mtan(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """MTAN's forward as it was before its encoder masks were stacked: a loop over tasks."""
    from ctan.models.blocks import upsample

    masks = list(zip(*(unstacked(m) for m in model.encoder_masks), strict=True))  # [task][stage]
    shared = model.encoder.features(x)
    skips = [out for _, out in shared[:-1]]
    if model.dense_tasks:
        g = shared[-1][1]
        ups, decs = [g] * model.depth, [g] * model.depth
        for k in reversed(range(model.depth)):
            ups[k] = model.decoder.ups[k](g)
            g = decs[k] = model.decoder.blocks[k](torch.cat([ups[k], skips[k]], dim=1))
    out = {}
    for i, task in enumerate(model.tasks):
        a = None
        for j, (first, stage_out) in enumerate(shared):
            attended = masks[i][j](first if a is None else torch.cat([first, a], dim=1)) * stage_out
            if j < model.depth:
                a = model.pool(model.encoder_att_convs[j](attended))
        if task.dense:
            for k in reversed(range(model.depth)):
                b = model.decoder_att_convs[k](upsample(attended))
                attended = model.decoder_masks[task.name][k](torch.cat([ups[k], b], dim=1)) * decs[k]
        out[task.name] = model.heads[task.name](attended)
    return out


DOSE = Task("dose", "regression", "dose", channels=1)
STRUCTURES = Task("structures", "segmentation", "structures", channels=3, multilabel=True)
LESION = Task("lesion", "segmentation", "lesion", channels=1)
DIAGNOSIS = Task("diagnosis", "classification", "diagnosis", classes=7)
COVID = Task("covid", "classification", "covid", classes=2)
MTAN_CASES = [([DOSE, STRUCTURES], 3, 1), ([LESION, DIAGNOSIS], 2, 3), ([DOSE, STRUCTURES, COVID], 3, 1)]
MTAN_CASES += [([LESION], 2, 3)]


@pytest.mark.parametrize(("tasks", "dims", "channels"), MTAN_CASES)
def test_stacked_mtan_matches_per_task_mtan(tasks: list[Task], dims: int, channels: int) -> None:
    torch.manual_seed(0)
    model = build_model("mtan", tasks, channels, dims, 4, 2)
    perturb(model, 1)
    x = torch.randn(2, channels, *([16] * dims), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, out = per_task_mtan(model, x), model(x)
    for name, value in expected.items():
        torch.testing.assert_close(out[name], value, atol=TOLERANCE, rtol=0)
