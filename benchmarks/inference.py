"""Whole-volume prediction against sliding windows (ctan.inference): time and peak memory on the CPU.

    python benchmarks/inference.py                                  # 96x256x256 volume, 48x96x96 patches
    python benchmarks/inference.py --shape 64 160 160 --patch 32 64 64 --arch hps

A patch-trained 3D network (two dense tasks, OpenKBP-like: dose + 10 structures; width 8, depth 3 as
the real-sample configuration) predicts one volume of ``--shape`` once in a single forward pass and once
by `ctan.inference.predict_volume` with windows of ``--patch``. Each way runs in a fresh process of its
own (one torch thread, as the workflow's evaluate jobs), which reports its wall time and its peak RSS
beyond the RSS once the model and the volume exist (VmHWM after a reset, as benchmarks/models.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import _status_kib, rss_reset  # noqa: E402

from ctan.device import keep_freed_memory  # noqa: E402
from ctan.inference import predict_volume  # noqa: E402
from ctan.models import build_model  # noqa: E402
from ctan.tasks import Task  # noqa: E402

TASKS = [
    Task("dose", "regression", "dose", channels=1),
    Task("structures", "segmentation", "structures", channels=10, multilabel=True),
]


def worker(spec: dict) -> dict:
    torch.set_num_threads(1)
    keep_freed_memory()
    torch.manual_seed(0)
    model = build_model(
        spec["arch"], TASKS, in_channels=1, spatial_dims=3, width=8, depth=3, attention_heads=2
    )
    model.eval()
    x = torch.randn(1, 1, *spec["shape"])
    patch = spec["patch"] if spec["windows"] else None
    import monai.inferers  # noqa: F401  (imported before the reset: the import is not the prediction's memory)

    base = rss_reset()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = predict_volume(model, x, patch)
    seconds = time.perf_counter() - t0
    assert out["dose"].shape[2:] == x.shape[2:]
    return {"seconds": seconds, "peak_mib": (_status_kib("VmHWM") - base) / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=[96, 256, 256])
    ap.add_argument("--patch", type=int, nargs=3, default=[48, 96, 96])
    ap.add_argument("--arch", default="ctan")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    rows = []
    for windows in (False, True):
        spec = {"arch": args.arch, "shape": args.shape, "patch": args.patch, "windows": windows}
        done = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(spec)],
            capture_output=True,
            text=True,
            check=True,
        )
        result = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(
            (
                f"sliding windows of {'x'.join(map(str, args.patch))}" if windows else "one forward pass",
                result,
            )
        )
    print(
        f"{args.arch}, volume {'x'.join(map(str, args.shape))}, one torch thread, torch {torch.__version__}\n"
    )
    print("| prediction | wall s | peak MiB beyond model and volume |\n|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['seconds']:.1f} | {r['peak_mib']:.0f} |")


if __name__ == "__main__":
    main()
