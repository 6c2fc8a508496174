"""Dataset readers by format name, and finding a dataset's root folder inside a download.

A new format is one new module in this package offering the interface described in `base` plus one
entry in `FORMATS`.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from ctan.datasets.base import CaseRef
from ctan.errors import CtanError

if TYPE_CHECKING:
    from ctan.config import DatasetSettings

FORMATS: tuple[str, ...] = ("openkbp", "ham10000", "stoic", "nifti_cases")

# An external test set's cases are listed without a computed split (all in one) and all stored as test.
EXTERNAL_SPLIT = {"validation": 0.0, "test": 0.0, "seed": 0}

# How deep below the download folder a dataset root may sit (archives add one or two wrapper folders).
MAX_ROOT_DEPTH = 4


def get_reader(format: str) -> ModuleType:
    """The reader module of a format (``ctan.datasets.<format>``)."""
    if format not in FORMATS:
        raise CtanError(None, f"unknown dataset format {format!r}; known formats: {', '.join(FORMATS)}")
    return importlib.import_module(f"ctan.datasets.{format}")


def find_root(path: str | Path, format: str) -> Path:
    """The one folder at or below ``path`` that holds the format's MARKER.

    Searched breadth-first up to `MAX_ROOT_DEPTH` levels, never below a folder that already is a root
    and never into hidden folders. None or several roots is an error: guessing would silently read the
    wrong data.
    """
    reader = get_reader(format)
    marker = reader.MARKER
    # A format may know other roots than its marker's folder (OpenKBP: a bare folder of pt_* patients).
    is_root = getattr(reader, "is_root", lambda folder: (folder / marker).exists())
    path = Path(path)
    if not path.is_dir():
        raise CtanError(path, "dataset folder not found")
    roots: list[Path] = []
    level = [path]
    for _ in range(MAX_ROOT_DEPTH + 1):
        below: list[Path] = []
        for folder in level:
            if is_root(folder):
                roots.append(folder)
                continue
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                continue
            below += [Path(e.path) for e in entries if e.is_dir() and not _skipped(e.name)]
        level = below
        if not level:
            break
    if not roots:
        raise CtanError(
            path,
            f"no {format} dataset found: no folder down to {MAX_ROOT_DEPTH} levels below this one contains "
            f"{marker}; if the data sits deeper, set the dataset's `subdir` to the folder that does",
        )
    if len(roots) > 1:
        listed = ", ".join(r.relative_to(path).as_posix() or "." for r in roots[:4])
        raise CtanError(path, f"{len(roots)} {format} datasets found ({listed}); set `subdir` to pick one")
    return roots[0]


def _skipped(name: str) -> bool:
    """Hidden folders, and the resource-fork copies macOS's Finder adds to every zip it makes."""
    return name.startswith(".") or name == "__MACOSX"


def dataset_cases(settings: DatasetSettings, root: Path) -> list[tuple[CaseRef, str]]:
    """Every case (the reference its reader reads it by) with the split it is stored in: its own split,
    or ``test`` for every case of an external test set, whatever folder or split file it came from."""
    reader = get_reader(settings.format)
    if settings.external_of is None:
        return [(ref, ref.split) for ref in reader.list_cases(root, settings.split)]
    return [(ref, "test") for ref in reader.list_cases(root, EXTERNAL_SPLIT)]
