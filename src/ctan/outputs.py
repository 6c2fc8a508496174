"""Outputs written all or none: a command that fails part-way leaves no file behind (or the previous
ones), so no later step trusts half a result."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ctan.errors import CtanError


@contextmanager
def staged(*outs: Path) -> Iterator[tuple[Path, ...]]:
    """Temporary names beside ``outs`` (same folder, so a rename moves them), renamed onto ``outs`` only
    when the whole block succeeds: a failure part-way leaves no output, or the previous ones, behind."""
    outs = tuple(Path(o) for o in outs)
    temps = tuple(o.with_name(f".{o.name}.tmp") for o in outs)
    try:
        for out in outs:
            if out.is_dir():
                raise CtanError(out, "is a folder; give the path of a file to write")
            out.parent.mkdir(parents=True, exist_ok=True)
        yield temps
        for temp, out in zip(temps, outs, strict=True):
            temp.replace(out)
    except OSError as err:
        raise CtanError(err.filename or outs[0], f"cannot write: {err.strerror or err}") from None
    finally:
        for temp in temps:
            if temp.is_file():
                temp.unlink()
