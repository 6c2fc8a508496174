"""Dataset readers by format name, and finding a dataset's root folder inside a download.

A new format is one new module in this package offering the interface described in `base` plus one
entry in `FORMATS`.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

from ctan.errors import CtanError

FORMATS: tuple[str, ...] = ("openkbp", "ham10000", "stoic", "nifti_cases")

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
    marker = get_reader(format).MARKER
    path = Path(path)
    if not path.is_dir():
        raise CtanError(path, "dataset folder not found")
    roots: list[Path] = []
    level = [path]
    for _ in range(MAX_ROOT_DEPTH + 1):
        below: list[Path] = []
        for folder in level:
            if (folder / marker).exists():
                roots.append(folder)
                continue
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                continue
            below += [Path(e.path) for e in entries if e.is_dir() and not e.name.startswith(".")]
        level = below
        if not level:
            break
    if not roots:
        raise CtanError(path, f"no {format} dataset found: no folder contains {marker}")
    if len(roots) > 1:
        listed = ", ".join(str(r) for r in roots[:4])
        raise CtanError(path, f"{len(roots)} {format} datasets found ({listed}); set `subdir` to pick one")
    return roots[0]
