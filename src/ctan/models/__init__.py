"""Architectures by name: `build_model(arch, tasks, ...)` returns a module mapping x to {task: prediction}.

A new architecture is one module plus one line in `REGISTRY`. Dense predictions are
(B, task.out_channels, *spatial), raw (logits or Gy); image-level predictions are (B, out_channels) logits.
"""

from __future__ import annotations

import importlib
import re
from typing import TYPE_CHECKING, Any

from ctan.errors import CtanError
from ctan.tasks import Task

if TYPE_CHECKING:
    from ctan.models.backbone import MultiTaskNet

# name -> (module, class, keyword flags). Importing this package loads no torch: the CLI's choices, the
# parameter validation and the Snakefile's wildcards read ARCHITECTURES from here.
REGISTRY: dict[str, tuple[str, str, dict[str, Any]]] = {
    "stl": ("ctan.models.stl", "SingleTaskNets", {}),
    "hps": ("ctan.models.hps", "HardSharing", {}),
    "mtan": ("ctan.models.mtan", "MTAN", {}),
    "ctan": ("ctan.models.ctan", "CTAN", {"use_ctae": True, "use_ctab": True}),
    "ctan_no_ctae": ("ctan.models.ctan", "CTAN", {"use_ctae": False, "use_ctab": True}),
    "ctan_no_ctab": ("ctan.models.ctan", "CTAN", {"use_ctae": True, "use_ctab": False}),
}
ARCHITECTURES: tuple[str, ...] = tuple(REGISTRY)
"""The registered architecture names, in the order the docs and benchmarks list them."""


def architecture(arch: str) -> tuple[type[MultiTaskNet], dict[str, Any]]:
    """The class of a registered architecture and the flags that make it this variant."""
    if arch not in REGISTRY:
        raise CtanError(None, f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    module, name, flags = REGISTRY[arch]
    return getattr(importlib.import_module(module), name), dict(flags)


def attention_heads_problem(width: int, depth: int, heads: int) -> str | None:
    """Why CTAB cannot split its bottleneck channels (width * 2**depth) into ``heads``, or None.
    Torch-free, so that the parameters are checked when they are loaded, not when CTAN is first built."""
    bottleneck = width * 2**depth
    if bottleneck % heads:
        return f"attention_heads={heads} must divide the {bottleneck} bottleneck channels (width * 2**depth)"
    return None


def uses_attention_heads(arch: str) -> bool:
    return REGISTRY[arch][1] == "CTAN"


_TASK_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _check(
    arch: str, tasks: list[Task], in_channels: int, spatial_dims: int, width: int, depth: int, heads: int
) -> None:
    architecture(arch)  # a known name
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


def build_model(
    arch: str,
    tasks: list[Task],
    in_channels: int,
    spatial_dims: int,
    width: int,
    depth: int,
    attention_heads: int = 2,
) -> MultiTaskNet:
    """Build a registered architecture for ``tasks``; its forward(x) returns {task.name: prediction}."""
    tasks = list(tasks)
    _check(arch, tasks, in_channels, spatial_dims, width, depth, attention_heads)
    cls, flags = architecture(arch)
    try:  # each architecture checks the settings only it uses (CTAN: heads against channels)
        cls.check_settings(width, depth, attention_heads)
    except ValueError as err:
        raise CtanError(None, f"{arch}: {err}") from None
    if cls.takes_attention_heads:
        flags["attention_heads"] = attention_heads
    return cls(tasks, in_channels, spatial_dims, width, depth, **flags)


__all__ = ["ARCHITECTURES", "REGISTRY", "architecture", "attention_heads_problem", "build_model"]
