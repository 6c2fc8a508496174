"""What computing 3D convolution gradients on channels-last copies buys (`ctan.models.blocks.Conv3d`).

    python benchmarks/conv_backward.py --params params.yaml --params config/real-sample.yaml --threads 1

For every 3D configuration in the merged parameter files (2D ones are skipped: there the models keep
PyTorch's own path) and every architecture, training steps of one model on one batch alternate between
PyTorch's own convolution backward and the channels-last one, in alternating order so that load from
other processes hits both alike. Prints the median step time of each, their ratio, and how far the
gradients of the same weights and batch differ (the largest difference over all parameters, relative
to that parameter's largest gradient); the forward, and so the loss, is the same bit for bit.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from models import REPO, demo_configs, describe, markdown, setup, training_step

from ctan.device import keep_freed_memory
from ctan.models import ARCHITECTURES
from ctan.models.blocks import channels_last_backward


def gradients(model: torch.nn.Module, x: torch.Tensor, enabled: bool) -> list[torch.Tensor]:
    with channels_last_backward(enabled):
        training_step(model, x)
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def largest_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(
        ((g - h).abs().max() / h.abs().max().clamp_min(1e-30)).item() for g, h in zip(a, b, strict=True)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, action="append", help="merged in order (default: params.yaml)")
    ap.add_argument("--datasets", nargs="*", help="datasets to time (default: run.datasets, 3D ones)")
    ap.add_argument("--archs", nargs="*", default=list(ARCHITECTURES), choices=ARCHITECTURES)
    ap.add_argument("--steps", type=int, default=9, help="timed steps of each kind (default 9)")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1, as the workflow trains)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the ctan commands run (ctan.device)
    configs = [c for c in demo_configs(args.params or [REPO / "params.yaml"]) if c.spatial_dims == 3]
    if args.datasets:
        configs = [c for c in configs if c.name in args.datasets]
    if not configs:
        raise SystemExit("no 3D configuration to time: the channels-last backward applies to 3D models only")
    print(f"cpu, {args.threads} threads, torch {torch.__version__}, {args.steps} steps of each kind\n")
    rows = []
    for cfg in configs:
        for arch in args.archs:
            model, x = setup(cfg, arch, "cpu")
            # Both paths run once here, which also warms the allocator and oneDNN's primitive cache.
            difference = largest_difference(gradients(model, x, True), gradients(model, x, False))
            seconds: dict[bool, list[float]] = {True: [], False: []}
            for step in range(args.steps):
                for enabled in (True, False) if step % 2 else (False, True):
                    with channels_last_backward(enabled):
                        t0 = time.perf_counter()
                        training_step(model, x)
                        seconds[enabled].append(time.perf_counter() - t0)
            plain, channels_last = statistics.median(seconds[False]), statistics.median(seconds[True])
            rows.append(
                [
                    f"{describe(cfg)}, batch {cfg.batch_size}",
                    arch,
                    f"{plain * 1000:.0f}",
                    f"{channels_last * 1000:.0f}",
                    f"{channels_last / plain:.2f}",
                    f"{difference:.1e}",
                ]
            )
    header = ["configuration", "arch", "PyTorch's backward (ms)", "channels-last backward (ms)", "ratio"]
    print(markdown([*header, "largest gradient difference"], rows))


if __name__ == "__main__":
    main()
