"""3D convolutions whose gradients are computed on channels-last copies (ctan.models.blocks): the same
function as PyTorch's own layers, taken only where it applies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ctan.models import blocks


def _pair(kind: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    ours, theirs = {
        "conv": (blocks.Conv3d(8, 16, 3, padding=1, bias=False), nn.Conv3d(8, 16, 3, padding=1, bias=False)),
        "strided": (blocks.Conv3d(8, 16, 2, stride=2), nn.Conv3d(8, 16, 2, stride=2)),
        "replicate": (
            blocks.Conv3d(4, 8, 3, padding=1, padding_mode="replicate"),
            nn.Conv3d(4, 8, 3, padding=1, padding_mode="replicate"),
        ),
        "transposed": (blocks.ConvTranspose3d(16, 8, 2, stride=2), nn.ConvTranspose3d(16, 8, 2, stride=2)),
    }[kind]
    theirs.load_state_dict(ours.state_dict())  # same parameter names: old model.pt files load
    return ours, theirs


def _step(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.detach().requires_grad_(True)
    y = layer(x)
    grads = torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])
    return y, list(grads)


@pytest.mark.parametrize("kind", ["conv", "strided", "replicate", "transposed"])
def test_same_forward_bit_for_bit_and_gradients_to_rounding(kind: str) -> None:
    ours, theirs = _pair(kind)
    x = torch.randn(2, ours.in_channels, 6, 10, 8)
    y, grads = _step(ours, x)
    y_ref, grads_ref = _step(theirs, x)
    assert type(y.grad_fn).__name__ == "_ChannelsLastBackwardBackward"
    assert torch.equal(y, y_ref)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert g.shape == g_ref.shape and g.is_contiguous()
        assert (g - g_ref).abs().max() <= 1e-5 * g_ref.abs().max()
    # and a different gradient would be noticed: the check is not vacuous
    assert (grads[1] * 1.001 - grads_ref[1]).abs().max() > 1e-5 * grads_ref[1].abs().max()


def test_pytorch_own_path_where_it_does_not_apply() -> None:
    ours, _ = _pair("conv")
    x = torch.randn(2, 8, 4, 6, 6)
    with torch.no_grad():  # inference: no backward to speed up
        assert ours(x).grad_fn is None
    own = "ConvolutionBackward0"
    cl = x.contiguous(memory_format=torch.channels_last_3d)  # a model trained in channels-last
    assert type(ours(cl).grad_fn).__name__ == own
    with blocks.channels_last_backward(False):
        assert type(ours(x).grad_fn).__name__ == own
    assert type(ours(x).grad_fn).__name__ == "_ChannelsLastBackwardBackward"  # switched back on
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ours(x).dtype == torch.bfloat16  # autocast's own conversions, untouched
    frozen = ours.requires_grad_(False)
    assert frozen(x).grad_fn is None


def test_only_3d_layers_change() -> None:
    assert blocks.conv_type(2) is nn.Conv2d and blocks.conv_transpose_type(2) is nn.ConvTranspose2d
    assert issubclass(blocks.conv_type(3), nn.Conv3d) and issubclass(
        blocks.conv_transpose_type(3), nn.ConvTranspose3d
    )
