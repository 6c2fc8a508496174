"""Where `ctan download` + `ctan preprocess` spend their time on the real OpenKBP sample, against the floor.

    python benchmarks/preprocess.py                                   # ../shared/data/openkbp-sample.tar.xz
    python benchmarks/preprocess.py ARCHIVE --spacing 2.5 2.5 2.5 --json

1. End to end, as the pipeline runs it: `download_dataset` (verify the SHA-256, extract, hash every file)
   and `preprocess_dataset` (all cases), giving cases per second.
2. Stage by stage, case by case, with the same functions the pipeline calls: parse (the reader), check,
   resample, write (Zarr, including the content hash of each array; that hash is also timed on its own),
   and hashing the source files. For comparison, the same case written the way zarr writes a local store
   itself (a thread hand-off per file and per parent check) where `write_case` builds it in memory first,
   and what creating as many folders and files as a case has costs on this file system alone.
3. The floor, as issue 12 set it: only `pandas.read_csv` of each case's CSVs, what a pandas-based reader
   must at least do (ctan's reader parses with Arrow's CSV reader, which needs less). Each case's floor
   is timed right before its stages, so both see the same page cache.

torch runs on `--threads` threads (default 1, as the workflow's preprocess jobs run it): with more, its
idle OpenMP workers spin after each resampling call and add CPU to every stage after it.

Times are process CPU and wall seconds; on a shared machine trust CPU more. The work goes to a temporary
folder: `TMPDIR=/dev/shm` puts it in memory, the code's cost without the disk's (the "file system" row
is what the disk alone costs; on some virtual disks it grows from run to run). On a noisy machine the same
code's ratio to the floor can move by a third from run to run: `--repeat N` measures everything N times
(a fresh folder each time) and prints each run's ratios and their median, the figure to quote.
`--json` also writes benchmarks/results/preprocess.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import yaml
from zarr.core.sync import sync

from ctan.config import dataset_settings, load_params
from ctan.datasets import find_root, get_reader
from ctan.fetch import download_dataset
from ctan.preprocess.pipeline import check_case, preprocess_dataset, source_attrs, source_hashes
from ctan.preprocess.resample import resample_case
from ctan.provenance import file_sha256
from ctan.store import _case_nodes, _write_case, array_hash, create_split, write_case

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ARCHIVE = REPO.parent / "shared" / "data" / "openkbp-sample.tar.xz"


class Clock:
    """Accumulates wall and CPU seconds per named stage."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def time(self, name: str, func, *args, **kwargs):
        w, c = time.perf_counter(), time.process_time()
        out = func(*args, **kwargs)
        self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w
        self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c
        return out


def pinned_sha(archive: Path) -> str:
    sums = archive.parent / "SHA256SUMS"
    if sums.is_file():
        for line in sums.read_text().splitlines():
            digest, name = line.split()
            if name == archive.name:
                return digest
    return file_sha256(archive)


def settings_for(work: Path, archive: Path, spacing, shape):
    override = {
        "run": {"datasets": ["bench"]},
        "paths": {k: str(work / k) for k in ("raw", "preprocessed", "models", "results")},
        "datasets": {
            "bench": {
                "format": "openkbp",
                "source": str(archive),
                "sha256": pinned_sha(archive),
                "tasks": ["dose", "structures"],
                "preprocess": {"spacing": spacing, "shape": shape, "ct_window": [-1000, 1500]},
            }
        },
    }
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(override))
    return dataset_settings(load_params([REPO / "params.yaml", path]), "bench")


def read_csvs_only(folder: Path) -> None:
    for csv in sorted(folder.glob("*.csv")):
        pd.read_csv(csv, index_col=0, header=None if csv.stem == "voxel_dimensions" else 0)


def run(archive: Path, spacing, shape, limit: int | None) -> dict:
    clock = Clock()
    with tempfile.TemporaryDirectory(prefix="ctan-bench-") as tmp:
        work = Path(tmp)
        settings = settings_for(work, archive, spacing, shape)
        clock.time("download (verify + extract + hash)", download_dataset, settings)
        clock.time("preprocess end to end", preprocess_dataset, settings)

        reader = get_reader("openkbp")
        root = find_root(settings.raw_dir, "openkbp")
        refs = reader.list_cases(root)[:limit]
        store = create_split(work / "stages.zarr", {})
        direct = create_split(work / "direct.zarr", {})  # the same case as zarr's local store writes it
        for ref in refs:
            folder = reader.patient_folder(root, ref)
            clock.time("floor: pandas.read_csv only", read_csvs_only, folder)
            case = clock.time("parse (reader)", reader.read_case, root, ref)
            clock.time("check", check_case, case, 3, root, True)
            resampled = clock.time("resample", resample_case, case, spacing, shape)
            clock.time("write (Zarr + array hashes)", write_case, store, resampled, source_attrs(case))
            arrays = [resampled.image, *resampled.dense.values()]
            clock.time("  of which array hashes", lambda a=arrays: [array_hash(x) for x in a])
            nodes = _case_nodes(resampled, source_attrs(case))
            write = _write_case(direct._async_group, resampled.case_id, *nodes)
            clock.time("  zarr writing its files itself", sync, write)
            clock.time("source file hashes", source_hashes, case, settings.raw_dir)
        total_cases = len(reader.list_cases(root))
        folders, files = case_entries(work / "stages.zarr" / refs[0].case_id)
        for i in range(len(refs)):
            clock.time(FS_FLOOR, create_entries, work / "fs" / str(i), folders, files)
    return {
        "cases": total_cases,
        "stage_cases": len(refs),
        "case_folders": folders,
        "case_files": files,
        "wall": clock.wall,
        "cpu": clock.cpu,
    }


FS_FLOOR = "  file system: a case's folders + files"


def case_entries(case_dir: Path) -> tuple[int, int]:
    """How many folders (the case's own included) and files a written case consists of."""
    entries = list(case_dir.rglob("*"))
    return 1 + sum(e.is_dir() for e in entries), sum(e.is_file() for e in entries)


def create_entries(where: Path, folders: int, files: int) -> None:
    """Create as many folders (one level deep) and small files as a case has: what any writer of this
    on-disk layout pays the file system (creating an inode costs far more on some virtual disks than
    others)."""
    where.mkdir(parents=True)
    for i in range(folders - 1):
        (where / str(i)).mkdir()
    for i in range(files):
        (where / str(i % max(folders - 1, 1)) / f"f{i}").write_bytes(b"0" * 4096)


def report(result: dict, archive: Path, spacing, shape) -> str:
    n, m = result["cases"], result["stage_cases"]
    wall, cpu = result["wall"], result["cpu"]
    e2e = wall["preprocess end to end"]
    stage_cpu = sum(cpu[s] for s in STAGES)
    lines = [
        f"archive {archive.name}: {n} cases; grid spacing={spacing} shape={shape}",
        f"machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
        f"load average {os.getloadavg()[0]:.1f}; torch threads {torch.get_num_threads()}",
        "",
        f"{'stage':<38}{'wall s':>9}{'CPU s':>9}{'CPU ms/case':>13}{'share':>8}",
    ]
    for name in ["download (verify + extract + hash)", "preprocess end to end"]:
        lines.append(f"{name:<38}{wall[name]:>9.2f}{cpu[name]:>9.2f}{1000 * cpu[name] / n:>13.1f}{'':>8}")
    lines.append(f"stages, {m} cases one by one:")
    compare = ["  of which array hashes", "  zarr writing its files itself", FS_FLOOR]
    for name in [*STAGES[:4], *compare, STAGES[4], "floor: pandas.read_csv only"]:
        share = f"{100 * cpu[name] / stage_cpu:>7.0f}%" if name in STAGES or name.startswith("  ") else ""
        lines.append(
            f"  {name:<36}{wall[name]:>9.2f}{cpu[name]:>9.2f}{1000 * cpu[name] / m:>13.1f}{share:>8}"
        )
    ratio = ratios(result)
    lines += [
        "",
        f"end to end: {n / e2e:.2f} cases/s (wall), {n / cpu['preprocess end to end']:.2f} cases/CPU-s",
        f"a written case: {result['case_folders']} folders, {result['case_files']} files",
        f"CPU per case vs the floor: end to end {ratio['end to end']:.1f}x, "
        f"all stages {ratio['all stages']:.1f}x, parse {ratio['parse']:.2f}x",
    ]
    return "\n".join(lines)


STAGES = ["parse (reader)", "check", "resample", "write (Zarr + array hashes)", "source file hashes"]


def ratios(result: dict) -> dict[str, float]:
    """CPU per case against the floor's: end to end, the stages summed, and the parse alone."""
    n, m, cpu = result["cases"], result["stage_cases"], result["cpu"]
    floor_case = cpu["floor: pandas.read_csv only"] / m
    return {
        "end to end": cpu["preprocess end to end"] / n / floor_case,
        "all stages": sum(cpu[s] for s in STAGES) / m / floor_case,
        "parse": cpu["parse (reader)"] / m / floor_case,
    }


def report_repeats(results: list[dict]) -> str:
    """One line per run (ratios, floor and write stage per case) and the median of each ratio."""
    lines = [
        "",
        f"{len(results)} runs, CPU per case vs the floor:",
        f"{'run':<6}{'end to end':>12}{'all stages':>12}{'parse':>8}{'floor ms':>10}{'write ms':>10}"
        f"{'fs ms':>8}",
    ]
    for i, result in enumerate(results, 1):
        r, m, cpu = ratios(result), result["stage_cases"], result["cpu"]
        floor, write, fs = (1000 * cpu[k] / m for k in ("floor: pandas.read_csv only", STAGES[3], FS_FLOOR))
        shares = f"{r['end to end']:>11.2f}x{r['all stages']:>11.2f}x{r['parse']:>7.2f}x"
        lines.append(f"{i:<6}{shares}{floor:>10.1f}{write:>10.1f}{fs:>8.1f}")
    median = {
        k: statistics.median(ratios(r)[k] for r in results) for k in ("end to end", "all stages", "parse")
    }
    lines.append(
        f"{'median':<6}{median['end to end']:>11.2f}x{median['all stages']:>11.2f}x{median['parse']:>7.2f}x"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archive", nargs="?", type=Path, default=DEFAULT_ARCHIVE, help="OpenKBP archive")
    parser.add_argument("--spacing", type=float, nargs=3, default=None, help="target spacing (z y x) mm")
    parser.add_argument("--shape", type=int, nargs=3, default=None, help="target shape (z y x)")
    parser.add_argument("--cases", type=int, default=None, help="limit the stage-by-stage part to N cases")
    parser.add_argument(
        "--repeat", type=int, default=1, help="measure N times; report each run and the median"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads, as `ctan preprocess --threads` (default 1)"
    )
    parser.add_argument("--json", action="store_true", help="also write benchmarks/results/preprocess.json")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    torch.set_num_threads(args.threads)
    results = []
    for _ in range(args.repeat):
        results.append(run(args.archive, args.spacing, args.shape, args.cases))
        print(report(results[-1], args.archive, args.spacing, args.shape), flush=True)
    if args.repeat > 1:
        print(report_repeats(results))
    if args.json:
        out = REPO / "benchmarks" / "results" / "preprocess.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "archive": str(args.archive),
            "spacing": args.spacing,
            "shape": args.shape,
            "threads": args.threads,
        }
        out.write_text(json.dumps({**meta, "runs": results}, indent=1) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
