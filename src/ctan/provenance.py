"""Provenance: code version, file and folder hashes (`ctan audit` lives in `ctan.audit`)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

# The package's code whose change changes a stage's results, relative to the package: editing it reruns
# the stage in Snakemake (workflow/rules/common.smk lists these files as inputs; dvc.yaml's deps are held
# to the same files by a test) and, for "train", changes `ctan.training.checkpoint.code_hash`, so a
# checkpoint does not resume and a tuning choice is not reused across the edit. Plumbing shared by every
# command (cli, config, errors, tracking) is left out on purpose. Only .py files, so bytecode caches
# never count.
STAGE_CODE: dict[str, tuple[str, ...]] = {
    "download": ("fetch.py", "datasets"),
    "preprocess": ("preprocess", "store.py", "manifest.py", "datasets"),
    "train": ("training", "models", "loader.py", "preprocess/intensity.py", "tasks.py", "inference.py"),
    "evaluate": ("evaluation.py", "metrics", "inference.py"),
    "summary": ("summary.py", "comparison.py", "metrics", "provenance.py", "plots.py"),
}


def stage_code(stage: str, package: Path | None = None) -> list[Path]:
    """The .py files of `STAGE_CODE[stage]` under ``package`` (default: this package), in hashing order."""
    package = Path(package) if package else Path(__file__).resolve().parent
    files: list[Path] = []
    for entry in STAGE_CODE[stage]:
        path = package / entry
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path] if path.is_file() else []
    return files


def code_version(repo: Path | None = None) -> tuple[str, bool]:
    """(git commit, dirty flag) of the checkout the running ctan code comes from (``repo``: another
    one); ("unknown", True) where that is no git checkout (an installed copy). Not the working
    directory's: a run made in a workspace of its own, or inside another project's repository, would
    record that folder's commit (or none) for code it does not hold."""
    cwd = str(repo or Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown", True
    return commit, bool(status)


def machine(device: str = "cpu") -> dict[str, Any]:
    """What a number was computed on: CPU model, torch version, torch threads and device. The same
    commit and seed give bit-identical results only on the same kind of CPU and torch build."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return out


def machine_text(m: dict[str, Any]) -> str:
    """``AMD EPYC (2 cores), torch 2.13.0+cpu, 1 thread, cpu``: one line for a report."""
    threads = m.get("threads")
    where = m.get("gpu") or m.get("device", "?")
    return (
        f"{m.get('cpu', '?')} ({m.get('cores', '?')} cores), torch {m.get('torch', '?')}, "
        f"{threads} thread{'s' if threads != 1 else ''}, {where}"
    )


def file_sha256(path: Path) -> str:
    return _file_digest(path, "sha256")


def _file_digest(path: Path, algorithm: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, algorithm).hexdigest()


def tree_sha256(path: Path, ignore: tuple[str, ...] = (".snakemake_timestamp",)) -> str:
    """Hash of a folder's files (relative path + bytes), independent of timestamps and walk order."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    return tree_listing(path, ignore)[0]


def tree_listing(
    folder: Path, ignore: tuple[str, ...] = (".snakemake_timestamp",), progress: bool = False
) -> tuple[str, dict[str, str]]:
    """(`tree_sha256` of a folder, {relative path: file sha256}): what a download's source.json records."""
    from tqdm import tqdm

    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in ignore)
    digest = hashlib.sha256()
    listing: dict[str, str] = {}
    for file in tqdm(files, desc="hashing", unit="file", disable=None if progress else True, leave=False):
        rel, sha = file.relative_to(folder).as_posix(), file_sha256(file)
        listing[rel] = sha
        digest.update(rel.encode() + b"\0" + sha.encode() + b"\n")
    return digest.hexdigest(), listing


def dvc_md5(path: Path, ignore: tuple[str, ...] = (".snakemake_timestamp",)) -> str:
    """The hash `dvc.lock` records for an output: file md5, or for a folder md5 of its listing + ".dir".

    Computed the way dvc-data does (sorted [{"md5", "relpath"}] as JSON), so a summary row's data hash can
    be compared with dvc.lock without DVC in the loop; `.snakemake_timestamp` is in `.dvcignore`.
    """
    path = Path(path)
    if path.is_file():
        return _md5(path)
    files = sorted(
        (p for p in path.rglob("*") if p.is_file() and p.name not in ignore),
        key=lambda p: p.relative_to(path).parts,
    )
    listing = [{"md5": _md5(p), "relpath": p.relative_to(path).as_posix()} for p in files]
    return hashlib.md5(json.dumps(listing, sort_keys=True).encode()).hexdigest() + ".dir"


def _md5(path: Path) -> str:
    return _file_digest(path, "md5")
