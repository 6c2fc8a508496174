"""Provenance: code version, file and folder hashes, and the audit of a results summary."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path


def code_version(repo: Path | None = None) -> tuple[str, bool]:
    """(git commit, dirty flag) of the working tree; ("unknown", True) outside git."""
    cwd = str(repo or Path.cwd())
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
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name not in ignore):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        digest.update(file_sha256(file).encode() + b"\n")
    return digest.hexdigest()


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


def audit(summary: Path) -> int:
    """Re-hash the data and models behind every row of a summary; 0 if all unchanged, 1 otherwise."""
    import csv

    from ctan.errors import CtanError

    if not summary.is_file():
        raise CtanError(summary, "not found; run `snakemake --cores 8 results/summary.csv` first")
    with open(summary, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "data_hash" not in rows[0]:
        raise CtanError(summary, "not a ctan summary (no data_hash column)")

    data_now: dict[str, str] = {}
    model_now: dict[str, str] = {}
    changed_units: set[tuple[str, str]] = set()
    problems: list[str] = []
    flagged: set[int] = set()
    for i, row in enumerate(rows, start=2):
        reasons = []
        data_path = row["data_path"]
        if data_path not in data_now:
            data_now[data_path] = dvc_md5(Path(data_path)) if Path(data_path).is_dir() else "missing"
        if data_now[data_path] != row["data_hash"]:
            reasons.append(
                f"data {data_path} changed ({row['data_hash'][:12]} -> {data_now[data_path][:12]})"
            )
        for item in filter(None, row["model_sha256"].split(";")):
            model_path, expected = item.rsplit("=", 1)
            if model_path not in model_now:
                model_now[model_path] = (
                    file_sha256(Path(model_path)) if Path(model_path).is_file() else "missing"
                )
            if model_now[model_path] != expected:
                reasons.append(f"model {model_path} changed")
        if reasons:
            changed_units.add((row["dataset"], row["architecture"]))
            problems.append(_describe(i, row, reasons))
            flagged.add(i)
    # A Δ_MTL row depends on its architecture's models and on STL's.
    for i, row in enumerate(rows, start=2):
        if (
            i not in flagged
            and row["row_type"] == "delta_mtl"
            and (
                (row["dataset"], row["architecture"]) in changed_units
                or (row["dataset"], "stl") in changed_units
            )
        ):
            problems.append(_describe(i, row, ["depends on changed models or data"]))
    ok = len(rows) - len(problems)
    for line in problems:
        print(f"CHANGED {line}")
    print(f"{summary}: {ok} of {len(rows)} rows unchanged")
    return 1 if problems else 0


def _describe(line: int, row: dict[str, str], reasons: list[str]) -> str:
    what = f"{row['dataset']}/{row['architecture']}/seed {row['seed']}/{row['task']}/{row['metric']}"
    return f"line {line}: {what}: " + "; ".join(dict.fromkeys(reasons))
