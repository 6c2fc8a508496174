"""The one error type users see: a file and what is wrong with it.

The CLI turns a `CtanError` into a single line on stderr and a non-zero exit, so every bad-input
path in the package raises this instead of letting a traceback through.
"""

from __future__ import annotations

from pathlib import Path


class CtanError(Exception):
    """Bad input or an unmet precondition, named by the file it concerns."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        # Library messages can span lines; the user gets exactly one.
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{self.path}: {self.problem}" if self.path else self.problem)
