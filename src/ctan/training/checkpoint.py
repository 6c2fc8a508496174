"""Checkpoints that resume exactly and load with `torch.load(weights_only=True)`.

A checkpoint resumes only the run that wrote it, and only while that run is unfinished: same parameters
and data (``config_hash``), same training code (``code_hash``), epochs left. Anything else starts over,
so a forced rerun (``snakemake -f``, which deletes the finished ``model.pt``) really retrains.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """Write next to the target and rename, so a job killed mid-write leaves the previous checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(path, map_location=map_location, weights_only=True)


# The package's code whose change changes a trained model: the "train" entry of STAGE_CODE in
# workflow/rules/common.smk (editing these files reruns `train` there, and must not resume here).
TRAINING_CODE: tuple[str, ...] = ("training", "models", "loader.py", "preprocess/intensity.py", "tasks.py")


def code_hash() -> str:
    """SHA-256 over the training code's .py files (relative path and bytes)."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for entry in TRAINING_CODE:
        path = package / entry
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(file.relative_to(package).as_posix().encode() + b"\0")
            digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def why_not_resume(state: dict[str, Any], config_hash: str, code: str, epochs: int) -> str | None:
    """None if ``state`` may resume this run; else the reason to start over."""
    if state.get("config_hash") != config_hash:
        return "parameters or data changed since this checkpoint"
    if state.get("code_hash") != code:
        return "the training code changed since this checkpoint"
    if int(state["epoch"]) >= epochs:
        return f"its run has finished (epoch {int(state['epoch'])} of {epochs}): a rerun retrains"
    return None
