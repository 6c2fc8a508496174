"""How far a training step could go on this CPU if everything but oneDNN's kernels were free.

    python benchmarks/kernel_bound.py --params params.yaml --params config/real-sample.yaml --threads 1

For every configuration in the merged parameter files and every architecture, a training step is
split into the time oneDNN's primitives (convolutions, their gradients, the layout reorders around
them) run, as oneDNN's own trace reports it (ONEDNN_VERBOSE), and the rest: element-wise work,
normalisation, pooling, attention, and the per-operator cost of PyTorch's dispatcher and autograd,
which grows with the number of operator calls a step makes. Prints, per architecture, the median step
time, the oneDNN time, the operator calls a step, the achieved FLOP/s as a share of an fp32 matmul
measured in the same process, and the ceiling of that share: the step's FLOPs over the oneDNN time
alone. A ceiling below a throughput target means no change outside the kernels can reach it.

The trace runs in a child process (oneDNN reads ONEDNN_VERBOSE when it starts) on the same model and
batch; its step times are not used, since writing the trace slows them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from models import (
    REPO,
    Config,
    config_from_json,
    config_to_json,
    demo_configs,
    describe,
    markdown,
    setup,
    step_times,
    training_step,
)
from torch.utils._python_dispatch import TorchDispatchMode

from ctan.device import keep_freed_memory
from ctan.models import ARCHITECTURES

MARK = "kernel_bound: traced steps follow"


class _OperatorCalls(TorchDispatchMode):
    """Counts the aten operator calls that reach the kernels, backward included."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def operator_calls(model: torch.nn.Module, x: torch.Tensor) -> int:
    with _OperatorCalls() as counter:
        training_step(model, x)
    return counter.calls


def onednn_milliseconds(trace: str) -> float:
    """Total execution time of the primitives in a oneDNN verbose trace (the last field of each
    ``onednn_verbose,...,exec,...`` line, in ms)."""
    total = 0.0
    for line in trace.splitlines():
        fields = line.split(",")
        if fields[0] == "onednn_verbose" and "exec" in fields[:4] and fields[-1].strip():
            try:
                total += float(fields[-1])
            except ValueError:
                continue  # a header line, not an execution
    return total


def traced_step(cfg: Config, arch: str, threads: int, steps: int) -> tuple[float, int]:
    """oneDNN milliseconds a step, and the operator calls a step makes, from a child process that trains
    ``steps`` steps under the trace."""
    spec = json.dumps({"config": config_to_json(cfg), "arch": arch, "threads": threads, "steps": steps})
    env = {**os.environ, "ONEDNN_VERBOSE": "1", "DNNL_VERBOSE": "1"}
    done = subprocess.run(
        [sys.executable, __file__, "--worker", spec], capture_output=True, text=True, env=env, check=False
    )
    if done.returncode != 0 or MARK not in done.stdout:
        raise SystemExit(f"traced run of {cfg.name} {arch} failed:\n{done.stderr[-2000:]}")
    before, trace = done.stdout.split(MARK, 1)
    calls = json.loads(before.strip().splitlines()[-1])["operator_calls"]
    total = onednn_milliseconds(trace)
    if total <= 0:
        raise SystemExit(
            f"oneDNN traced no kernel for {cfg.name} {arch}: this torch does not run its CPU convolutions "
            f"through oneDNN (torch.backends.mkldnn.is_available() is {torch.backends.mkldnn.is_available()})"
        )
    return total / steps, calls


def run_worker(spec: str) -> None:
    s = json.loads(spec)
    torch.set_num_threads(s["threads"])
    keep_freed_memory()
    model, x = setup(config_from_json(s["config"]), s["arch"], "cpu")
    for _ in range(2):  # primitive creation happens here, outside the traced steps
        training_step(model, x)
    print(json.dumps({"operator_calls": operator_calls(model, x)}))
    print(MARK, flush=True)
    for _ in range(s["steps"]):
        training_step(model, x)
    sys.stdout.flush()


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        return run_worker(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, action="append", help="merged in order (default: params.yaml)")
    ap.add_argument("--datasets", nargs="*", help="datasets to measure (default: run.datasets)")
    ap.add_argument("--archs", nargs="*", default=["hps", "ctan"], choices=ARCHITECTURES)
    ap.add_argument("--steps", type=int, default=7, help="timed steps per architecture (default 7)")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1, as the workflow trains)"
    )
    args = ap.parse_args()
    params = args.params or [REPO / "params.yaml"]
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the ctan commands run (ctan.device)
    configs = demo_configs(params)
    if args.datasets:
        unknown = sorted(set(args.datasets) - {c.name for c in configs})
        if unknown:
            raise SystemExit(f"no configuration named {', '.join(unknown)} in {', '.join(map(str, params))}")
        configs = [c for c in configs if c.name in args.datasets]
    print(f"cpu, {args.threads} threads, torch {torch.__version__}, {args.steps} steps\n")
    header = [
        "configuration",
        "arch",
        "step ms",
        "oneDNN ms",
        "rest ms",
        "operator calls",
        "achieved",
        "ceiling",
    ]
    rows = []
    for cfg in configs:
        times, flops, matmul = step_times(cfg, args.archs, args.steps, "cpu")
        for arch in args.archs:
            kernels, calls = traced_step(cfg, arch, args.threads, args.steps)
            step = times[arch] * 1000
            rows.append(
                [
                    describe(cfg),
                    arch,
                    f"{step:.1f}",
                    f"{kernels:.1f}",
                    f"{step - kernels:.1f}",
                    str(calls),
                    f"{flops[arch] / times[arch] / matmul:.0%}",
                    f"{flops[arch] / (kernels / 1000) / matmul:.0%}",
                ]
            )
        print(f"measured {cfg.name} (fp32 matmul {matmul / 1e9:.0f} GFLOP/s)", file=sys.stderr)
    print(markdown(header, rows))
    print(
        "\nachieved: the step's FLOPs over its median time, as a share of the matmul's FLOP/s; ceiling: "
        "the same FLOPs over the oneDNN time alone."
    )


if __name__ == "__main__":
    main()
