"""Checkpoints that resume exactly and load with `torch.load(weights_only=True)`.

A trained model (``model.pt``) gets a ``model.pt.sha256`` beside it, in `sha256sum` format, written
when it is saved; `verify` refuses a model whose bytes no longer match it (`ctan evaluate` calls it
before loading, so a damaged model is never scored and its new hash never recorded).

A checkpoint resumes only the run that wrote it, and only while that run is unfinished: same parameters
and data (``config_hash``), same training code (``code_hash``), epochs left. Anything else starts over,
so a forced rerun (``snakemake -f``, which deletes the finished ``model.pt``) really retrains.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ctan.errors import CtanError
from ctan.provenance import file_sha256, stage_code
from ctan.workspace import temporary


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """Write next to the target and rename, so a job killed mid-write leaves the previous checkpoint (and
    a temporary that `ctan.workspace.sweep_temporaries` removes when the folder is trained next)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary(path)
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The saved dictionary; a damaged or foreign file is a `CtanError` naming it."""
    try:
        saved = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # a damaged file raises any of UnpicklingError, RuntimeError, EOFError, ...
        raise CtanError(path, f"not a readable checkpoint ({type(err).__name__}); retrain it") from None
    if not isinstance(saved, dict):
        raise CtanError(path, "not a ctan checkpoint (no dictionary inside); retrain it")
    return saved


def digest_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.sha256")


def save_model(obj: dict[str, Any], path: Path) -> str:
    """`save_atomic`, plus the file's SHA-256 beside it (``<name>.sha256``); returns the digest.

    The digest is taken from the bytes about to be renamed into place and written first, so a model and
    its digest never disagree unless one of them changed afterwards (or a kill fell between the two
    renames, which `verify` then reports like any damage).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary(path)
    torch.save(obj, tmp)
    digest = file_sha256(tmp)
    record = digest_path(path)
    record_tmp = temporary(record)
    record_tmp.write_text(f"{digest}  {path.name}\n")
    os.replace(record_tmp, record)
    os.replace(tmp, path)
    return digest


def verify(path: Path) -> str:
    """The model's SHA-256 if it matches the one recorded when it was trained; CtanError otherwise."""
    record = digest_path(path)
    if not record.is_file():
        raise CtanError(
            path, f"no recorded SHA-256 ({record.name} is missing); retrain it (snakemake --forcerun {path})"
        )
    expected = (record.read_text().split() or [""])[0]
    actual = file_sha256(path)
    if actual != expected:
        raise CtanError(
            path,
            f"SHA-256 {actual[:12]}… differs from {expected[:12] or '(empty)'}… recorded in {record.name} "
            f"when it was trained: the file changed since; refusing to load it; retrain it "
            f"(snakemake --forcerun {path})",
        )
    return actual


def code_hash() -> str:
    """SHA-256 over the training code's .py files (relative path and bytes): `STAGE_CODE["train"]`,
    the files whose edit reruns `train` in Snakemake, so a resume or a reused choice never crosses one."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for file in stage_code("train", package):
        digest.update(file.relative_to(package).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def why_not_resume(state: dict[str, Any], config_hash: str, code: str, epochs: int) -> str | None:
    """None if ``state`` may resume this run; else the reason to start over."""
    missing = sorted(CHECKPOINT_KEYS - set(state))
    if missing:
        if "state_dict" in state and "model_config" in state:  # what `ctan train` writes as model.pt
            return "a trained model.pt, not a training checkpoint (no optimizer state or epoch history)"
        return f"not a training checkpoint (no {', '.join(missing[:4])}" + (
            f" and {len(missing) - 4} more)" if len(missing) > 4 else ")"
        )
    if state.get("config_hash") != config_hash:
        return "parameters or data changed since this checkpoint"
    if state.get("code_hash") != code:
        return "the training code changed since this checkpoint"
    if int(state["epoch"]) >= epochs:
        return f"its run has finished (epoch {int(state['epoch'])} of {epochs}): a rerun retrains"
    return None


@dataclass
class TrainingState:
    """What an unfinished run is made of: written to ``checkpoint.pt`` after every epoch and read back
    only by `resume`, so the two sides of a checkpoint's keys live together."""

    model: nn.Module
    weighting: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0  # 0: none yet
    best_score: float = -math.inf
    best_model: dict[str, torch.Tensor] | None = None
    run_id: str | None = None

    @property
    def epoch(self) -> int:
        """The last finished epoch (epochs count from 1)."""
        return len(self.history)

    def add(self, record: dict[str, Any], better: bool) -> None:
        """Append an epoch's record; keep a copy of the weights when the selection rule prefers it."""
        self.history.append(record)
        if self.best_epoch == 0 or better:
            self.best_epoch, self.best_score = record["epoch"], record["selection_score"]
            self.best_model = copy.deepcopy(self.model.state_dict())

    def contents(self, config_hash: str, code: str) -> dict[str, Any]:
        """What `save` writes and `_load` reads back: the fields, and what identifies the run."""
        return {
            "config_hash": config_hash,
            "code_hash": code,
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "weighting": self.weighting.state_dict(),
            "weighting_extra": json.dumps(self.weighting.extra_state()),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "history": json.dumps(self.history),
            "best_epoch": self.best_epoch,
            "best_score": self.best_score,
            "best_model": self.best_model,
            "run_id": self.run_id,
        }

    def save(self, path: Path, config_hash: str, code: str) -> None:
        save_atomic(self.contents(config_hash, code), path)

    def resume(self, path: Path, config_hash: str, code: str, epochs: int) -> str:
        """Load ``path`` into this state where `why_not_resume` allows it; says what happened."""
        if not path.is_file():
            return ""
        try:
            saved = load(path)
            refusal = why_not_resume(saved, config_hash, code, epochs)
        except Exception as err:  # unreadable, or written by other code: nothing to resume from
            refusal = f"unreadable ({type(err).__name__})"
        if refusal is None:
            fresh = copy.deepcopy(self.contents("", ""))  # put back if loading fails halfway
            try:
                self._load(saved)
            except Exception as err:  # hashes match but the contents do not fit this run
                self._load(fresh)
                refusal = f"inconsistent ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        if refusal is not None:
            return f"{path}: {refusal}; starting afresh"
        return f"resuming {path.parent} after epoch {saved['epoch']}"

    def _load(self, saved: dict[str, Any]) -> None:
        """Everything from ``saved``, checked to agree with itself before the run relies on it."""
        history = json.loads(saved["history"])
        if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
            raise ValueError("history is not a list of epoch records")
        if [r.get("epoch") for r in history] != list(range(1, int(saved["epoch"]) + 1)):
            raise ValueError(f"the history's epochs are not 1 to {saved['epoch']}")
        best_epoch = int(saved["best_epoch"])
        if not 0 <= best_epoch <= len(history) or (best_epoch > 0) != (saved["best_model"] is not None):
            raise ValueError(f"best epoch {best_epoch} does not match the history or the kept weights")
        if saved["best_model"] is not None:
            self.model.load_state_dict(saved["best_model"])  # the kept weights must fit this model too
        self.model.load_state_dict(saved["model"])
        self.weighting.load_state_dict(saved["weighting"])
        self.weighting.load_extra_state(json.loads(saved["weighting_extra"]))
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.history = history
        self.best_epoch, self.best_score = best_epoch, float(saved["best_score"])
        self.best_model = saved["best_model"]
        self.run_id = saved.get("run_id") or None


# What `TrainingState.save` writes (its fields, and what identifies the run): a file without all of them
# is not a training checkpoint.
CHECKPOINT_KEYS = frozenset(f.name for f in fields(TrainingState)) | {
    "config_hash",
    "code_hash",
    "epoch",
    "weighting_extra",
}
