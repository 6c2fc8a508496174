"""What building batches ahead (`ctan.loader.prefetched`) buys: training epochs with and without it.

    python benchmarks/prefetch.py --params params.yaml --params config/real-sample.yaml \
        --dataset ham10000_sample --arch stl --task diagnosis

One process, one thread, one model and loader (num_workers 0, as the workflow trains): training
epochs alternate between `run_epoch` as `ctan train` runs it and the same with batches built in the
training thread, in alternating order so that load from other processes hits both alike. Prints the
median epoch wall time and data-wait share of each (the first epoch of each is left out: it fills the
cache and allocator).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from ctan.config import dataset_settings, load_params
from ctan.device import keep_freed_memory
from ctan.manifest import read_manifest
from ctan.tasks import dataset_tasks
from ctan.training import trainer
from ctan.training.weighting import build_weighting

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, action="append", help="merged in order (default: params.yaml)")
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--arch", default="hps")
    ap.add_argument("--task", help="for --arch stl: the single task's network")
    ap.add_argument("--epochs", type=int, default=8, help="epochs of each kind (default 8)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    keep_freed_memory()
    params = load_params(args.params or [REPO / "params.yaml"])
    settings = dataset_settings(params, args.dataset).trainable()
    manifest = read_manifest(settings.preprocessed_dir)
    tasks = dataset_tasks(settings, manifest, only=args.task)
    cfg = {**trainer.training_values(settings, args.arch, args.task, False), "num_workers": 0}
    train_set, val_set = trainer.splits(settings, manifest, tasks, cfg, 0)
    train_loader, _ = trainer.loaders(train_set, val_set, cfg, 0)
    model, _ = trainer.model_for(args.arch, tasks, settings, manifest, train_set[0]["image"].shape[0])
    weighting = build_weighting(cfg["weighting"], [t.name for t in tasks], cfg["dwa_temperature"])
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    ahead = trainer.prefetched
    kinds = {"built ahead": ahead, "built in the step": lambda loader: (batch for batch in loader)}
    seconds: dict[str, list[float]] = {k: [] for k in kinds}
    waits: dict[str, list[float]] = {k: [] for k in kinds}
    try:
        for epoch in range(args.epochs):
            for kind in list(kinds) if epoch % 2 else list(kinds)[::-1]:
                trainer.prefetched = kinds[kind]
                train_loader.sampler.set_epoch(epoch)
                t0 = time.perf_counter()
                cpu = torch.device("cpu")
                record = trainer.run_epoch(model, weighting, tasks, train_loader, cpu, optimizer)
                seconds[kind].append(time.perf_counter() - t0)
                waits[kind].append(record["data_wait_fraction"])
    finally:
        trainer.prefetched = ahead
    network = f"{args.arch}:{args.task}" if args.task else args.arch
    print(f"{args.dataset} {network}, {len(train_loader)} steps an epoch")
    for kind in kinds:
        print(
            f"  {kind:18s} epoch {statistics.median(seconds[kind][1:]):.3f} s (median of "
            f"{len(seconds[kind]) - 1}), data wait {100 * statistics.median(waits[kind][1:]):.1f} %"
        )


if __name__ == "__main__":
    main()
