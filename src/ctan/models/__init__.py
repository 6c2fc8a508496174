"""Architectures by name: `build_model(arch, tasks, ...)` returns a module mapping x to {task: prediction}.

A new architecture is one module plus one line in `REGISTRY`. Dense predictions are
(B, task.out_channels, *spatial), raw (logits or Gy); image-level predictions are (B, out_channels) logits.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

from torch import nn

from ctan.errors import CtanError
from ctan.models.backbone import MultiTaskNet, stage_channels
from ctan.models.ctan import CTAN
from ctan.models.hps import HardSharing
from ctan.models.mtan import MTAN
from ctan.models.stl import SingleTaskNets
from ctan.tasks import Task

Builder = Callable[..., MultiTaskNet]


def _plain(cls: type[MultiTaskNet]) -> Builder:
    """Architectures without attention heads ignore that setting."""

    def build(
        tasks: list[Task], in_channels: int, spatial_dims: int, width: int, depth: int, attention_heads: int
    ) -> MultiTaskNet:
        return cls(tasks, in_channels, spatial_dims, width, depth)

    return build


def _ctan(**flags: bool) -> Builder:
    return functools.partial(CTAN, **flags)


REGISTRY: dict[str, Builder] = {
    "stl": _plain(SingleTaskNets),
    "hps": _plain(HardSharing),
    "mtan": _plain(MTAN),
    "ctan": _ctan(use_ctae=True, use_ctab=True),
    "ctan_no_ctae": _ctan(use_ctae=False, use_ctab=True),
    "ctan_no_ctab": _ctan(use_ctae=True, use_ctab=False),
}
ARCHITECTURES: tuple[str, ...] = tuple(REGISTRY)
"""The registered architecture names, in the order the docs and benchmarks list them."""

_TASK_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _check(
    arch: str, tasks: list[Task], in_channels: int, spatial_dims: int, width: int, depth: int, heads: int
) -> None:
    if arch not in REGISTRY:
        raise CtanError(None, f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    if not tasks:
        raise CtanError(None, f"{arch}: at least one task is needed")
    names = [getattr(t, "name", None) for t in tasks]
    if not all(isinstance(t, Task) for t in tasks):
        raise CtanError(None, f"{arch}: tasks must be ctan.tasks.Task records, got {tasks!r}")
    if len(set(names)) != len(names):
        raise CtanError(None, f"{arch}: task names must be unique, got {names}")
    for t in tasks:
        if not _TASK_NAME.match(t.name):
            raise CtanError(None, f"{arch}: task name {t.name!r} must be an identifier (letters, digits, _)")
        if t.out_channels < 1:
            raise CtanError(None, f"{arch}: task {t.name!r} has {t.out_channels} output channels")
    if spatial_dims not in (2, 3):
        raise CtanError(None, f"{arch}: spatial_dims must be 2 or 3, got {spatial_dims}")
    for label, value in (("in_channels", in_channels), ("width", width), ("depth", depth), ("heads", heads)):
        if not isinstance(value, int) or value < 1:
            raise CtanError(None, f"{arch}: {label} must be a positive integer, got {value!r}")
    bottleneck = stage_channels(width, depth)[-1]
    if arch.startswith("ctan") and bottleneck % heads:
        raise CtanError(
            None,
            f"{arch}: attention_heads={heads} must divide the {bottleneck} bottleneck channels "
            "(width * 2**depth)",
        )


def build_model(
    arch: str,
    tasks: list[Task],
    in_channels: int,
    spatial_dims: int,
    width: int,
    depth: int,
    attention_heads: int = 2,
) -> nn.Module:
    """Build a registered architecture for ``tasks``; its forward(x) returns {task.name: prediction}."""
    tasks = list(tasks)
    _check(arch, tasks, in_channels, spatial_dims, width, depth, attention_heads)
    return REGISTRY[arch](
        tasks,
        in_channels=in_channels,
        spatial_dims=spatial_dims,
        width=width,
        depth=depth,
        attention_heads=attention_heads,
    )


__all__ = ["ARCHITECTURES", "REGISTRY", "build_model"]
