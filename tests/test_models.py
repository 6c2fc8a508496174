"""Every architecture × task mix × spatial_dims: shapes, gradients, task coupling, determinism, errors."""

from __future__ import annotations

import pytest
import torch

from ctan import cli
from ctan.errors import CtanError
from ctan.models import ARCHITECTURES, build_model
from ctan.models.blocks import SoftMask, upsample
from ctan.tasks import Task

WIDTH, DEPTH, HEADS = 4, 2, 2
SIZE = {2: (32, 32), 3: (16, 16, 16)}

DOSE = Task("dose", "regression", "dose", channels=1)
STRUCTURES = Task("structures", "segmentation", "structures", channels=3, multilabel=True)
LESION = Task("lesion", "segmentation", "lesion", channels=1)
DIAGNOSIS = Task("diagnosis", "classification", "diagnosis", classes=7)
COVID = Task("covid", "classification", "covid", classes=2)
SEVERITY = Task("severity", "classification", "severity", classes=2)

# name: (tasks, spatial_dims, in_channels)
MIXES = {
    "dense+dense-3d": ([DOSE, STRUCTURES], 3, 1),
    "dense+dense-2d": ([DOSE, STRUCTURES], 2, 1),
    "dense+image-2d": ([LESION, DIAGNOSIS], 2, 3),
    "dense+image-3d": ([STRUCTURES, COVID], 3, 1),
    "image+image-3d": ([COVID, SEVERITY], 3, 1),
    "three-tasks-3d": ([DOSE, STRUCTURES, COVID], 3, 1),
    "single-task-2d": ([LESION], 2, 3),
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(arch: str, mix: str, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    tasks, dims, channels = MIXES[mix]
    torch.manual_seed(seed)
    model = build_model(arch, tasks, channels, dims, WIDTH, DEPTH, attention_heads=HEADS)
    x = torch.randn(2, channels, *SIZE[dims], generator=torch.Generator().manual_seed(seed + 1))
    return model, x


def test_the_registry_is_the_one_list_of_architectures() -> None:
    """The CLI, the parameter validation and the Snakefile read ARCHITECTURES, and reading it loads no
    torch (the Snakefile and `--help` stay fast)."""
    import subprocess
    import sys

    from ctan.config import load_params, validate

    assert ARCHITECTURES == ("stl", "hps", "mtan", "ctan", "ctan_no_ctae", "ctan_no_ctab")
    assert cli.ARCHITECTURES is ARCHITECTURES
    params = load_params()
    params["run"]["architectures"] = ["stl", "ctan_v2"]
    with pytest.raises(CtanError, match=r"run/architectures: 'ctan_v2' \(known: stl, hps, mtan"):
        validate(params)
    code = "import sys, ctan.models, ctan.cli, ctan.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_shapes_and_gradients_reach_every_parameter(arch: str, mix: str) -> None:
    model, x = build(arch, mix)
    out = model(x)
    tasks, dims, _ = MIXES[mix]
    assert list(out) == [t.name for t in tasks]
    for task in tasks:
        expected = (2, task.out_channels, *SIZE[dims]) if task.dense else (2, task.out_channels)
        assert out[task.name].shape == expected, task.name
        assert out[task.name].dtype == torch.float32
    sum(o.square().mean() for o in out.values()).backward()
    # CTAB's output projection starts at zero (identity block), so its attention weights receive
    # gradient from the second step on: take one step, then every parameter must get gradient.
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.zero_grad(set_to_none=True)
    sum(o.square().mean() for o in model(x).values()).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not torch.count_nonzero(p.grad)]
    assert not dead, f"parameters without gradient: {dead}"


def test_ctab_starts_as_the_identity() -> None:
    from ctan.models.ctan import CrossTaskAttentionBottleneck

    torch.manual_seed(0)
    ctab = CrossTaskAttentionBottleneck(["a", "b"], channels=16, heads=2)
    features = {n: torch.randn(2, 16, 3, 4, 5) for n in ("a", "b")}
    out = ctab(features)
    for n in features:
        assert torch.equal(out[n], features[n])


def perturbed_outputs(
    model: torch.nn.Module, x: torch.Tensor, prefix: str, task: str
) -> dict[str, torch.Tensor]:
    """Outputs after adding noise to every parameter whose name starts with ``prefix``; in a
    task-stacked SoftMask (CTAE's and MTAN's encoder masks, named ``ctae.masks.<stage>.``,
    ``encoder_masks.<stage>.``) only to ``task``'s block of channels."""
    params = [p for n, p in model.named_parameters() if n.startswith(prefix)]
    assert params, f"no parameter starts with {prefix!r}"
    module = model.get_submodule(prefix.rstrip("."))
    tasks = module.tasks if isinstance(module, SoftMask) else 1
    index = [t.name for t in model.tasks].index(task) if tasks > 1 else 0
    with torch.no_grad():
        for p in params:
            rows = p[index * (p.shape[0] // tasks) : (index + 1) * (p.shape[0] // tasks)]
            rows.add_(torch.randn(rows.shape, generator=torch.Generator().manual_seed(7)))
        return model(x)


# (arch, mix, parameters owned by task B, task B, task A, does A's output change?)
COUPLING = [
    ("ctan", "dense+dense-3d", "ctae.masks.1.", "structures", "dose", True),
    ("ctan", "dense+image-2d", "ctae.masks.1.", "diagnosis", "lesion", True),
    ("ctan", "dense+image-2d", "ctae.masks.1.", "lesion", "diagnosis", True),
    ("ctan", "three-tasks-3d", "ctae.masks.1.", "covid", "dose", True),
    # The bottleneck-stage mask reaches the other task only through CTAB.
    ("ctan", "dense+dense-3d", f"ctae.masks.{DEPTH}.", "structures", "dose", True),
    ("ctan_no_ctab", "dense+dense-3d", f"ctae.masks.{DEPTH}.", "structures", "dose", False),
    ("ctan_no_ctab", "dense+dense-3d", "ctae.masks.1.", "structures", "dose", True),
    # Without CTAE every task's bottleneck is the shared one: CTAB only mixes identical features.
    ("ctan_no_ctae", "dense+image-2d", "ctab.attention.diagnosis.", "diagnosis", "lesion", False),
    ("hps", "dense+dense-3d", "decoders.structures.", "structures", "dose", False),
    ("hps", "dense+image-2d", "heads.diagnosis.", "diagnosis", "lesion", False),
    ("hps", "dense+image-2d", "decoders.lesion.", "lesion", "diagnosis", False),
    ("mtan", "dense+dense-3d", "encoder_masks.1.", "structures", "dose", False),
    ("mtan", "dense+image-2d", "encoder_masks.1.", "lesion", "diagnosis", False),
    ("stl", "dense+image-2d", "nets.diagnosis.", "diagnosis", "lesion", False),
]


@pytest.mark.parametrize(("arch", "mix", "owned_by_b", "task_b", "task_a", "coupled"), COUPLING)
def test_task_coupling(arch: str, mix: str, owned_by_b: str, task_b: str, task_a: str, coupled: bool) -> None:
    """CTAN's tasks read each other's attention branches; HPS/MTAN/STL task branches stay independent."""
    model, x = build(arch, mix)
    with torch.no_grad():  # CTAB starts as the identity; coupling is a property of a trained one
        for name, p in model.named_parameters():
            if name.startswith("ctab.") and ".out_proj." in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(11)) * 0.1)
        before = model(x)
    after = perturbed_outputs(model, x, owned_by_b, task_b)
    assert not torch.allclose(before[task_b], after[task_b]), "perturbing task B must change task B"
    assert (not torch.equal(before[task_a], after[task_a])) == coupled


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_same_seed_same_weights_same_outputs(arch: str) -> None:
    m1, x = build(arch, "three-tasks-3d", seed=3)
    m2, _ = build(arch, "three-tasks-3d", seed=3)
    m3, _ = build(arch, "three-tasks-3d", seed=4)
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not all(torch.equal(s1[k], s3[k]) for k in s1)
    with torch.no_grad():
        o1, o2 = m1(x), m2(x)
    assert all(torch.equal(o1[k], o2[k]) for k in o1)


def test_stl_is_one_hps_net_per_task() -> None:
    tasks, dims, channels = MIXES["dense+image-3d"]
    stl = build_model("stl", tasks, channels, dims, WIDTH, DEPTH)
    for task in tasks:
        hps = build_model("hps", [task], channels, dims, WIDTH, DEPTH)
        single = {k: v.shape for k, v in stl.nets[task.name].state_dict().items()}
        assert single == {k: v.shape for k, v in hps.state_dict().items()}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "unet"}, "unknown architecture 'unet'; known: stl, hps, mtan, ctan"),
        ({"tasks": []}, "at least one task"),
        ({"tasks": [DOSE, DOSE]}, "unique"),
        ({"tasks": [Task("a.b", "regression", "dose")]}, "identifier"),
        ({"spatial_dims": 4}, "spatial_dims must be 2 or 3"),
        ({"width": 0}, "width must be a positive integer"),
        ({"attention_heads": 3}, "attention_heads=3 must divide the 16 bottleneck channels"),
    ],
)
def test_build_rejects_bad_settings(kwargs: dict, message: str) -> None:
    settings = dict(arch="ctan", tasks=[DOSE], in_channels=1, spatial_dims=3, width=WIDTH, depth=DEPTH)
    settings |= {"attention_heads": HEADS} | kwargs
    with pytest.raises(CtanError, match=message.replace("(", r"\(").replace("*", r"\*")):
        build_model(**settings)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((1, 2, 16, 16, 16), "2 channels; the model was built for 1"),
        ((1, 1, 16, 16), "expected \\(batch, 1, 3 spatial sizes\\)"),
    ],
)
def test_forward_rejects_bad_input(shape: tuple[int, ...], message: str) -> None:
    model = build_model("hps", [DOSE], 1, 3, WIDTH, DEPTH)
    with pytest.raises(CtanError, match=message):
        model(torch.zeros(shape))


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize(("dims", "size"), [(3, (9, 14, 11)), (2, (30, 21))])
def test_any_input_size_is_padded_and_cropped_back(arch: str, dims: int, size: tuple[int, ...]) -> None:
    """A case on its native grid need not be a multiple of 2**depth: dense outputs keep its size and
    are what the network gives on the zero-padded input; image-level outputs keep their shape."""
    tasks = [DOSE, STRUCTURES] if dims == 3 else [LESION, DIAGNOSIS]
    if arch == "stl":
        tasks = tasks[:1]
    model = build_model(arch, tasks, 1, dims, WIDTH, DEPTH, attention_heads=HEADS).eval()
    x = torch.rand(2, 1, *size)
    with torch.no_grad():
        out = model(x)
        padded = model.predict(torch.nn.functional.pad(x, [p for n in size[::-1] for p in (0, -n % 4)]))
    for t in tasks:
        if t.dense:
            assert out[t.name].shape == (2, t.out_channels, *size)
            assert torch.equal(out[t.name], padded[t.name][(..., *(slice(0, n) for n in size))])
        else:
            assert torch.equal(out[t.name], padded[t.name])


def test_a_size_that_is_a_multiple_of_2_to_the_depth_is_not_padded() -> None:
    model = build_model("ctan", [DOSE, STRUCTURES], 1, 3, WIDTH, DEPTH, attention_heads=HEADS).eval()
    x = torch.rand(1, 1, *SIZE[3])
    with torch.no_grad():
        assert all(
            torch.equal(a, b) for a, b in zip(model(x).values(), model.predict(x).values(), strict=True)
        )


@pytest.mark.parametrize("shape", [(2, 3, 7, 9), (1, 2, 5, 4, 6), (2, 3, 1, 1, 1), (2, 16, 6, 10, 10)])
def test_upsample_is_align_corners_interpolation(shape: tuple[int, ...]) -> None:
    """MTAN's up-sampling as one matrix product per axis computes F.interpolate's function, forward and
    backward, and rounds closer to it than F.interpolate's own fp32 kernel does."""
    mode = "bilinear" if len(shape) == 4 else "trilinear"
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0), requires_grad=True)
    exact = torch.nn.functional.interpolate(x.double(), scale_factor=2, mode=mode, align_corners=True)
    y = upsample(x)
    assert y.shape == exact.shape and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), exact, atol=2e-6, rtol=0)
    g = torch.randn(exact.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (expected,) = torch.autograd.grad(exact, x, g)
    (got,) = torch.autograd.grad(y, x, g.float())
    torch.testing.assert_close(got.double(), expected.double(), atol=1e-5, rtol=0)


def test_upsample_strided_input_and_inference_mode() -> None:
    """A task's slice of a stacked tensor (not contiguous) gives what its copy gives (to rounding), and
    matrices first made under inference mode still serve training afterwards (they are cached)."""
    stacked = torch.randn(2, 3, 11, 13, 17)  # sizes no other test caches first
    with torch.inference_mode():
        first = upsample(stacked[:, 1:2].clone())
    x = stacked.transpose(0, 1)[1].unsqueeze(1).requires_grad_()  # strided
    torch.testing.assert_close(upsample(x), first, atol=1e-6, rtol=0)
    upsample(x).sum().backward()
    assert x.grad is not None


def test_upsample_keeps_f_interpolate_under_autocast() -> None:
    x = torch.randn(1, 2, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = upsample(x)
        expected = torch.nn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
    torch.testing.assert_close(y, expected, atol=0, rtol=0)
