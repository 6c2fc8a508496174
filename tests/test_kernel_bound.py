"""benchmarks/kernel_bound.py: reading oneDNN's trace, counting a step's operator calls."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # kernel_bound imports its sibling, models
spec = importlib.util.spec_from_file_location("kernel_bound", REPO / "benchmarks" / "kernel_bound.py")
kernel_bound = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kernel_bound)

# Lines as oneDNN 3.x writes them with ONEDNN_VERBOSE=1 (two executions, headers, a creation).
TRACE = "\n".join(
    [
        "onednn_verbose,v1,info,oneDNN v3.12.0 (commit 80afa71049cd69a3df32adcccb623b12cd7baa22)",
        "onednn_verbose,v1,primitive,info,template:operation,engine,primitive,implementation,prop_kind,"
        "memory_descriptors,attributes,auxiliary,problem_desc,exec_time",
        "onednn_verbose,v1,primitive,create:cache_miss,cpu,convolution,jit:avx512_core,forward_training,"
        "src:f32::blocked:abcd::f0,,alg:convolution_direct,mb16_ic8oc8_ih48oh48kh3sh1dh0ph1_iw48ow48kw3sw1dw0pw1,0.25",
        "onednn_verbose,v1,primitive,exec,cpu,reorder,jit:uni,undef,"
        "src:f32::blocked:abcd::f0 dst:f32:p:blocked:Acdb16a::f0,attr-scratchpad:user,,8x8x3x3,0.00292969",
        "onednn_verbose,v1,primitive,exec,cpu,convolution,jit:avx512_core,forward_training,"
        "src:f32::blocked:abcd::f0,,alg:convolution_direct,mb16_ic8oc8_ih48oh48kh3sh1dh0ph1_iw48ow48kw3sw1dw0pw1,1.5",
        "some other output of the step",
    ]
)


def test_onednn_time_sums_executions_only():
    assert abs(kernel_bound.onednn_milliseconds(TRACE) - (0.00292969 + 1.5)) < 1e-9


class _Net(torch.nn.Module):
    """The smallest model the benchmarks' training step takes: one returning ``{task: prediction}``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"task": self.conv(x)}


def test_operator_calls_count_forward_and_backward():
    net, x = _Net(), torch.randn(1, 2, 8, 8)
    with torch.no_grad(), kernel_bound._OperatorCalls() as forward_only:
        net(x)
    assert forward_only.calls >= 1
    assert kernel_bound.operator_calls(net, x) > forward_only.calls + 2  # the loss and the backward too
