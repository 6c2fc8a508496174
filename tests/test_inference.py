"""Whole-volume predictions of a patch-trained network: sliding windows of the training patch size."""

from __future__ import annotations

import torch
from torch import nn

from ctan.inference import needs_windows, predict_volume


class Recording(nn.Module):
    """A pointwise dense output (the same at every voxel whatever window it is in) and an image-level
    output (the window's mean); records the input shapes and image-level outputs it gave."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []
        self.means: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.shapes.append(tuple(x.shape[2:]))
        mean = x.flatten(1).mean(dim=1, keepdim=True)
        self.means.append(mean)
        return {"dose": 2 * x + 1, "covid": mean}


def test_small_volumes_and_whole_volume_training_take_one_forward_pass():
    model = Recording()
    x = torch.randn(2, 1, 8, 8, 8)
    assert not needs_windows(x, None)
    assert not needs_windows(x, [8, 8, 8])
    assert not needs_windows(x, [8, 16, 16])
    out = predict_volume(model, x, [8, 8, 8])
    assert model.shapes == [(8, 8, 8)]
    assert torch.equal(out["dose"], 2 * x + 1)


def test_larger_volumes_are_predicted_window_by_window():
    """Every forward pass sees one patch; dense outputs are blended back to the whole volume (a pointwise
    output is unchanged by the blending) and image-level outputs are the mean of the windows'."""
    torch.manual_seed(0)
    x = torch.randn(2, 1, 12, 20, 9)
    model = Recording()
    out = predict_volume(model, x, [8, 8, 8])
    assert set(model.shapes) == {(8, 8, 8)}
    assert len(model.shapes) > 2 * 8  # windows overlapping by half along every axis, per volume
    assert out["dose"].shape == x.shape
    assert torch.allclose(out["dose"], 2 * x + 1, atol=1e-5)
    assert out["covid"].shape == (2, 1)
    per_volume = len(model.means) // 2
    for i in range(2):
        windows = torch.cat(model.means[i * per_volume : (i + 1) * per_volume])
        assert torch.allclose(out["covid"][i], windows.mean(dim=0))


def test_a_network_without_dense_tasks_gets_the_mean_of_its_windows():
    class Classifier(nn.Module):
        def forward(self, x):
            return {"covid": x.flatten(1).amax(dim=1, keepdim=True)}

    x = torch.zeros(1, 1, 16, 16, 16)
    x[0, 0, 0, 0, 0] = 4.0  # in the first window only
    out = predict_volume(Classifier(), x, [8, 8, 8])
    assert set(out) == {"covid"}
    assert 0 < float(out["covid"]) < 4.0
