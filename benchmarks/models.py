"""Cost of each architecture: parameters, MACs, training-step time and peak memory.

    python benchmarks/models.py --table              # params + MACs, demo and paper-scale configs
    python benchmarks/models.py                      # fwd+bwd time and peak memory, demo configs
    python benchmarks/models.py --profile ctan --datasets stoic_demo   # where the time goes
    python benchmarks/models.py --params params.yaml --params config/real-sample.yaml \
        --threads 1 --archs hps ctan mtan                                # real-sample shapes
    python benchmarks/models.py ... --compile        # the same, every model through torch.compile

Configurations come from params.yaml, or from several --params files merged in order as the `ctan`
CLI merges them (shape, batch size, width, depth, attention heads). The
paper-scale ones are our assumption (the paper gives no sizes): see PAPER_SCALE. MACs are counted by
torch.utils.flop_counter.FlopCounterMode on a batch of one (FLOPs / 2; convolutions, matmuls and
attention only, no element-wise ops). Step times are medians, measured round-robin over the
architectures in one process so that load from other processes hits all alike. Peak memory is measured
in a fresh subprocess per architecture: the peak RSS (VmHWM, reset once the model and batch exist)
minus the RSS at that point, or torch.cuda.max_memory_allocated minus the allocated memory on CUDA.
Achieved FLOP/s are a training step's FLOPs (FlopCounterMode over forward and backward: convolutions,
matmuls, attention) over its median time, also given as a share of the FLOP/s of an fp32 matrix product
measured in the same process between the timed rounds (so that machine load hits both alike).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from ctan.config import dataset_settings, load_params
from ctan.device import keep_freed_memory
from ctan.models import ARCHITECTURES, build_model
from ctan.tasks import Task

REPO = Path(__file__).resolve().parents[1]

# Task heads per dataset format, sized like the demo data (structure counts come from the data at
# training time; only kind and channel counts matter for cost).
TASKS = {
    "openkbp": [
        Task("dose", "regression", "dose", channels=1),
        Task("structures", "segmentation", "structures", channels=10, multilabel=True),
    ],
    "nifti_cases": [
        Task("dose", "regression", "dose", channels=1),
        Task("structures", "segmentation", "structures", channels=4, multilabel=True),
    ],
    "ham10000": [
        Task("lesion", "segmentation", "lesion", channels=1),
        Task("diagnosis", "classification", "diagnosis", classes=7),
    ],
    "stoic": [
        Task("covid", "classification", "covid", classes=2),
        Task("severity", "classification", "severity", classes=2),
    ],
}
IN_CHANNELS = {"openkbp": 1, "nifti_cases": 1, "ham10000": 3, "stoic": 1}


@dataclass(frozen=True)
class Config:
    name: str
    format: str
    shape: tuple[int, ...]
    batch_size: int
    width: int
    depth: int
    heads: int

    @property
    def spatial_dims(self) -> int:
        return len(self.shape)

    @property
    def tasks(self) -> list[Task]:
        return TASKS[self.format]


# Our choice for "paper scale" (the paper's sizes are not known to us): the public datasets' native
# grid (OpenKBP 128³; HAM10000 resized to 256x256; STOIC resampled to 128³), a U-Net of width 32 and
# depth 4 (nnU-Net-like first stage), 4 attention heads; Prostate (in-house) assumed like OpenKBP.
# Only counted (--table), never timed, so the batch size is 1.
PAPER_SCALE = [
    Config("openkbp_paper", "openkbp", (128, 128, 128), 1, 32, 4, 4),
    Config("prostate_paper", "nifti_cases", (128, 128, 128), 1, 32, 4, 4),
    Config("ham10000_paper", "ham10000", (256, 256), 1, 32, 4, 4),
    Config("stoic_paper", "stoic", (128, 128, 128), 1, 32, 4, 4),
]


def demo_configs(params_files: list[Path]) -> list[Config]:
    params = load_params(params_files)
    out = []
    for name in params["run"]["datasets"]:
        s = dataset_settings(params, name)
        out.append(
            Config(
                name,
                s.format,
                tuple(s.preprocess["shape"]),
                int(s.training["batch_size"]),
                int(s.model["width"]),
                int(s.model["depth"]),
                int(s.model["attention_heads"]),
            )
        )
    return out


def make(cfg: Config, arch: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    with torch.device(device):
        return build_model(
            arch,
            cfg.tasks,
            in_channels=IN_CHANNELS[cfg.format],
            spatial_dims=cfg.spatial_dims,
            width=cfg.width,
            depth=cfg.depth,
            attention_heads=cfg.heads,
        )


def count(cfg: Config, arch: str) -> tuple[int, int]:
    """(parameters, forward MACs for one input); on the meta device, so 128³ costs nothing."""
    model = make(cfg, arch, "meta")
    x = torch.empty(1, IN_CHANNELS[cfg.format], *cfg.shape, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops() // 2


def loss_of(out: dict[str, torch.Tensor]) -> torch.Tensor:
    """A stand-in loss touching every output; the cost of real losses is negligible next to the model."""
    return sum(o.float().square().mean() for o in out.values())


def training_step(model: torch.nn.Module, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    loss_of(model(x)).backward()
    if x.is_cuda:
        torch.cuda.synchronize()


def setup(cfg: Config, arch: str, device: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = make(cfg, arch, device).train()
    return model, torch.randn(cfg.batch_size, IN_CHANNELS[cfg.format], *cfg.shape, device=device)


MATMUL_SIZE = 1024


def matmul_seconds(device: str) -> float:
    """Seconds of one fp32 MATMUL_SIZE² matrix product (2 * n³ FLOPs)."""
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device)
    a @ b
    if a.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    c = a @ b
    if c.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def step_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one training step (forward and backward) as FlopCounterMode counts them."""
    counter = FlopCounterMode(display=False)
    with counter:
        training_step(model, x)
    return counter.get_total_flops()


def step_times(
    cfg: Config, archs: list[str], steps: int, device: str, compile: bool = False
) -> tuple[dict[str, float], dict[str, int], float]:
    """Median fwd+bwd seconds per architecture, timed round-robin so that load from other processes
    on a shared machine hits every architecture alike; the step FLOPs of each; and the median fp32
    matmul FLOP/s, measured once per round between the architectures.

    ``compile``: each model goes through ``torch.compile`` (FLOPs counted on the eager model); the
    first step, which compiles (or loads inductor's on-disk cache), is timed and printed."""
    setups = {a: setup(cfg, a, device) for a in archs}
    flops = {}
    for a, (model, x) in list(setups.items()):
        training_step(model, x)  # warm-up: allocator, oneDNN primitive cache
        flops[a] = step_flops(model, x)
        if compile:
            compiled = torch.compile(model, dynamic=False)  # each configuration its own shapes
            t0 = time.perf_counter()
            training_step(compiled, x)
            print(f"{cfg.name} {a}: first compiled step {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            training_step(compiled, x)
            setups[a] = (compiled, x)
    times: dict[str, list[float]] = {a: [] for a in archs}
    matmul: list[float] = []
    for _ in range(steps):
        matmul.append(2 * MATMUL_SIZE**3 / matmul_seconds(device))
        for a, (model, x) in setups.items():
            t0 = time.perf_counter()
            training_step(model, x)
            times[a].append(time.perf_counter() - t0)
    return {a: statistics.median(t) for a, t in times.items()}, flops, statistics.median(matmul)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss_reset() -> int:
    """Reset this process's peak RSS to its current RSS and return that, in KiB.

    getrusage's ru_maxrss would do on a fresh interpreter, but Linux keeps it across fork + exec, so a
    child of a large parent inherits the parent's peak; /proc/self/clear_refs (value 5) resets VmHWM.
    """
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS")


def peak_memory(cfg: Config, arch: str, device: str) -> float:
    """Peak MiB of a training step beyond what the model and batch hold (run in a fresh process)."""
    model, x = setup(cfg, arch, device)
    if x.is_cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_reset()
    for _ in range(2):  # the second step also holds the gradients of the first
        training_step(model, x)
    if x.is_cuda:
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return (_status_kib("VmHWM") - base) / 1024


def profile(cfg: Config, arch: str, device: str, rows: int = 20) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model, x = setup(cfg, arch, device)
    training_step(model, x)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(3):
            training_step(model, x)
    key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def config_to_json(cfg: Config) -> dict:
    """A configuration as JSON for a worker process (`config_from_json` reads it back)."""
    return cfg.__dict__ | {"shape": list(cfg.shape)}


def config_from_json(data: dict) -> Config:
    return Config(**{**data, "shape": tuple(data["shape"])})


def run_worker(spec: str) -> None:
    args = json.loads(spec)
    torch.set_num_threads(args["threads"])
    keep_freed_memory()
    cfg = config_from_json(args["config"])
    print(json.dumps({"peak_mib": peak_memory(cfg, args["arch"], args["device"])}))


def measure_memory(cfg: Config, arch: str, threads: int, device: str) -> float:
    spec = {
        "config": config_to_json(cfg),
        "arch": arch,
        "threads": threads,
        "device": device,
    }
    done = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"]


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def describe(cfg: Config) -> str:
    tasks = " + ".join(f"{t.name}({t.out_channels})" for t in cfg.tasks)
    shape = "x".join(map(str, cfg.shape))
    return f"{cfg.name}: {shape}, {IN_CHANNELS[cfg.format]}ch, {tasks}, width {cfg.width}, depth {cfg.depth}"


def table(configs: list[Config], archs: list[str]) -> str:
    """Two markdown tables: parameters (millions) and forward MACs for one input (billions)."""
    counts = {cfg.name: {a: count(cfg, a) for a in archs} for cfg in configs}
    params = [[describe(c)] + [f"{counts[c.name][a][0] / 1e6:.3f}" for a in archs] for c in configs]
    macs = [[describe(c)] + [f"{counts[c.name][a][1] / 1e9:.3f}" for a in archs] for c in configs]
    ratio = [[c.name, f"{counts[c.name]['ctan'][1] / counts[c.name]['hps'][1]:.2f}"] for c in configs]
    out = [
        "Parameters (millions)\n",
        markdown(["configuration", *archs], params),
        "\nForward multiply-accumulates for one input (GMACs; FlopCounterMode FLOPs / 2)\n",
        markdown(["configuration", *archs], macs),
    ]
    if "ctan" in archs and "hps" in archs:
        out += ["\nCTAN / HPS forward MACs\n", markdown(["configuration", "ctan / hps"], ratio)]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", action="store_true", help="parameter and MAC table (no timing)")
    ap.add_argument("--profile", metavar="ARCH", help="torch.profiler table of one training step")
    ap.add_argument(
        "--params",
        type=Path,
        action="append",
        help="parameter file; repeat to merge overrides in order, as the ctan CLI does "
        "(default: params.yaml)",
    )
    ap.add_argument("--datasets", nargs="*", help="demo datasets to time (default: run.datasets)")
    ap.add_argument("--archs", nargs="*", default=list(ARCHITECTURES), choices=ARCHITECTURES)
    ap.add_argument("--steps", type=int, default=7, help="timed steps per architecture, after a warm-up")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="time every model through torch.compile (inductor); its first step's compile time goes "
        "to stderr; peak memory is not measured",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return run_worker(args.worker)

    configs = demo_configs(args.params or [REPO / "params.yaml"])
    if args.datasets:
        configs = [c for c in configs if c.name in args.datasets]
    if args.table:
        print(table(configs + PAPER_SCALE, args.archs))
        return
    if args.profile:
        torch.set_num_threads(args.threads)
        for cfg in configs:
            print(f"## {args.profile} on {describe(cfg)}, batch {cfg.batch_size}\n")
            print(profile(cfg, args.profile, args.device))
        return

    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the ctan commands run (ctan.device)
    compiled = ", torch.compile" if args.compile else ""
    print(f"device {args.device}, {args.threads} threads, torch {torch.__version__}, ", end="")
    print(f"{args.steps} steps{compiled}\n")
    times, rates, mems, ratios = [], [], [], []
    for cfg in configs:
        seconds, flops, matmul = step_times(cfg, args.archs, args.steps, args.device, args.compile)
        peak = {}
        if not args.compile:
            peak = {a: measure_memory(cfg, a, args.threads, args.device) for a in args.archs}
        label = f"{describe(cfg)}, batch {cfg.batch_size}"
        times.append([label] + [f"{seconds[a] * 1000:.0f}" for a in args.archs])
        achieved = {a: flops[a] / seconds[a] for a in args.archs}
        rates.append(
            [label, f"{matmul / 1e9:.0f}"]
            + [f"{achieved[a] / 1e9:.1f} ({100 * achieved[a] / matmul:.0f} %)" for a in args.archs]
        )
        mems.append([label] + [f"{peak.get(a, float('nan')):.0f}" for a in args.archs])
        if "ctan" in seconds and "hps" in seconds:
            ratios.append(
                [
                    cfg.name,
                    f"{seconds['ctan'] / seconds['hps']:.2f}",
                    f"{flops['ctan'] / flops['hps']:.2f}",
                ]
            )
        print(f"measured {cfg.name}", file=sys.stderr)
    print("Training step (forward + backward), median ms\n")
    print(markdown(["configuration", *args.archs], times))
    print("\nAchieved GFLOP/s of a training step (share of an fp32 matmul's in the same process)\n")
    print(markdown(["configuration", f"fp32 matmul {MATMUL_SIZE}²", *args.archs], rates))
    if not args.compile:
        print("\nPeak memory of a training step beyond model and batch (RSS or CUDA allocated), MiB\n")
        print(markdown(["configuration", *args.archs], mems))
    if ratios:
        print("\nCTAN / HPS\n")
        print(markdown(["dataset", "step time", "training-step FLOPs"], ratios))


if __name__ == "__main__":
    main()
