"""Does bf16 autocast learn as fp32 does, and what does it buy? Evidence for `training.precision`.

    python benchmarks/precision.py                         # demo datasets, ctan, seeds 0 1
    python benchmarks/precision.py --params params.yaml --params config/real-sample.yaml \
        --datasets ham10000_sample --archs hps ctan --seeds 0 1 --lr 0.001

Trains every dataset x architecture x seed once per precision with `ctan train`'s own code path
(untuned: ``--lr`` for all, everything else from the parameter files) into a temporary workspace, one
thread, one job at a time, and prints per precision the median training-step time and the best
validation epoch's selection score and metrics. fp32's seed-to-seed spread is the yardstick: bf16
"learns as fp32 does" where its scores differ from fp32's by no more than fp32's seeds differ from each
other. bf16 needs native bf16 instructions (AVX-512 BF16 or AMX) on a CPU; elsewhere it is several times
slower and `ctan train` warns.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
from pathlib import Path

import torch

from ctan.config import load_params
from ctan.device import keep_freed_memory
from ctan.tracking import init_tracking
from ctan.training.trainer import train

REPO = Path(__file__).resolve().parents[1]
PRECISIONS = ("fp32", "bf16")


def run(
    params: dict, dataset: str, arch: str, seed: int, precision: str, root: Path, lr: float
) -> list[dict]:
    """Train once; one record per model folder (STL trains one network per task)."""
    params = copy.deepcopy(params)
    params["paths"] = {**params["paths"], "models": str(root / "models" / precision)}
    params["training"] = {**params["training"], "precision": precision, "lr": lr}
    for name in params["datasets"]:  # per-dataset training overrides would win over the global lr
        params["datasets"][name].setdefault("training", {}).update({"precision": precision, "lr": lr})
    records = []
    for out in train(params, dataset, arch, seed, tuned=False):
        history = json.loads((out / "history.json").read_text())
        best = history["epochs"][history["best_epoch"] - 1]
        records.append(
            {
                "dataset": dataset,
                "arch": arch if out.name.startswith("seed") else f"{arch}:{out.name}",
                "seed": seed,
                "precision": precision,
                "step_s": statistics.median(e["step_seconds"] for e in history["epochs"]),
                "best_epoch": history["best_epoch"],
                "score": best["selection_score"],
                "metrics": {
                    f"{task}/{k}": v for task, m in best["val_metrics"].items() for k, v in m.items()
                },
            }
        )
    return records


def table(records: list[dict]) -> str:
    rows = [
        "| dataset | arch | precision | step (ms) | selection score by seed | best epochs |",
        "|---|---|---|---|---|---|",
    ]
    keys = sorted(
        {(r["dataset"], r["arch"], r["precision"]) for r in records},
        key=lambda k: (k[0], k[1], PRECISIONS.index(k[2])),
    )
    for dataset, arch, precision in keys:
        rs = sorted(
            (r for r in records if (r["dataset"], r["arch"], r["precision"]) == (dataset, arch, precision)),
            key=lambda r: r["seed"],
        )
        step = statistics.median(r["step_s"] for r in rs) * 1e3
        scores = ", ".join(f"{r['score']:.4f}" for r in rs)
        epochs = ", ".join(str(r["best_epoch"]) for r in rs)
        rows.append(f"| {dataset} | {arch} | {precision} | {step:.1f} | {scores} | {epochs} |")
    return "\n".join(rows)


def verdict(records: list[dict]) -> str:
    """Per dataset and architecture: bf16's score change against fp32's seed-to-seed spread."""
    lines = []
    for dataset, arch in sorted({(r["dataset"], r["arch"]) for r in records}):
        by = {
            p: {
                r["seed"]: r
                for r in records
                if (r["dataset"], r["arch"], r["precision"]) == (dataset, arch, p)
            }
            for p in PRECISIONS
        }
        seeds = sorted(set(by["fp32"]) & set(by["bf16"]))
        if not seeds:
            continue
        change = max(abs(by["bf16"][s]["score"] - by["fp32"][s]["score"]) for s in seeds)
        fp32 = [by["fp32"][s]["score"] for s in seeds]
        spread = max(fp32) - min(fp32) if len(fp32) > 1 else float("nan")
        speed = statistics.median(by["fp32"][s]["step_s"] for s in seeds) / statistics.median(
            by["bf16"][s]["step_s"] for s in seeds
        )
        lines.append(
            f"{dataset} {arch}: |bf16 - fp32| score up to {change:.4f} (fp32 seed spread {spread:.4f}); "
            f"bf16 steps {speed:.2f}x as fast"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--params", type=Path, action="append", help="parameter files, merged in order (default: params.yaml)"
    )
    ap.add_argument("--datasets", nargs="+", help="default: run.datasets")
    ap.add_argument("--archs", nargs="+", default=["ctan"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--lr", type=float, default=0.001, help="one learning rate for every run (default 0.001)")
    ap.add_argument("--json", type=Path, help="also write the records here")
    args = ap.parse_args()
    params = load_params(args.params or [REPO / "params.yaml"])
    torch.set_num_threads(1)
    keep_freed_memory()
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        print("warning: this CPU has no native bf16; bf16 step times here say nothing about one that has")
    records = []
    with tempfile.TemporaryDirectory(prefix="ctan-precision-") as tmp:
        root = Path(tmp)
        params["mlflow"] = {**params["mlflow"], "tracking_uri": f"sqlite:///{root / 'mlflow.db'}"}
        init_tracking(params)
        for dataset in args.datasets or params["run"]["datasets"]:
            for arch in args.archs:
                for seed in args.seeds:
                    for precision in PRECISIONS:
                        records += run(params, dataset, arch, seed, precision, root, args.lr)
                        print(f"done {dataset} {arch} seed {seed} {precision}", flush=True)
    print()
    print(table(records))
    print()
    print(verdict(records))
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
