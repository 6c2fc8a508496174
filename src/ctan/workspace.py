"""Names that become folder names, and the one check that keeps every output path inside its folder.

Dataset, task and architecture names are path components (``<paths.raw>/<dataset>``,
``<paths.models>/<dataset>/<arch>/seed<n>/<task>``), so they must be plain identifiers: a letter, then
letters, digits or ``_``. The schema (``params.schema.yaml``: ``datasets`` property names,
``run.datasets``), the CLI and Snakemake's wildcard constraints all accept exactly `NAME_PATTERN`, and
every output path the package builds from a name goes through `inside`, which refuses a path that
resolves outside its configured folder (a ``..`` component, an absolute part, or a symbolic link that
leads elsewhere) or that a file stands in the way of.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ctan.errors import CtanError

NAME_PATTERN = r"[A-Za-z][A-Za-z0-9_]*"
_NAME = re.compile(NAME_PATTERN)


def blocking_parent(path: Path) -> tuple[Path, str] | None:
    """Why no file or folder can be made at ``path``: ``(its nearest existing parent, "file")`` when that
    parent is a file, ``(parent, "read-only")`` when it cannot be written; None when it can."""
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                return parent, "file"
            if not os.access(parent, os.W_OK | os.X_OK):
                return parent, "read-only"
            return None
    return None


def check_name(kind: str, name: str) -> str:
    """``name`` itself if it is a plain identifier; else CtanError naming the ``kind`` (dataset, task...)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise CtanError(
            None,
            f"{kind} name {name!r} is not a plain identifier "
            "(a letter, then letters, digits or _; it becomes a folder name)",
        )
    return name


def inside(root: str | Path, *parts: str) -> Path:
    """``root / part / ...``, refused (CtanError) unless it resolves strictly inside ``root``.

    The path is returned as built (relative stays relative), so messages and provenance read as before.
    """
    root = Path(root)
    path = root.joinpath(*parts)
    resolved, top = path.resolve(), root.resolve()
    if resolved == top or not resolved.is_relative_to(top):
        raise CtanError(path, f"resolves outside its configured folder {root}; refusing to write there")
    for folder in (*reversed(path.parents), path):  # every one of them must be (or become) a folder
        if folder.exists() and not folder.is_dir():
            raise CtanError(
                folder, f"is a file where ctan keeps the folder {path}; move the file away (or rename it)"
            )
    return path
