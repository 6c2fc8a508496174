"""The common interface every dataset module offers: list cases, read one case, official splits.

A dataset module (``openkbp``, ``ham10000``, ``stoic``, ``nifti_cases``) defines:

- ``FORMAT: str`` – its registry name;
- ``SPATIAL_DIMS: int`` – 2 or 3;
- ``WORLD: str | None`` – the patient frame its (origin, direction) are in: ``"LPS"`` (DICOM's, listed
  (S, P, L) in (z, y, x) order), ``"RAS"`` (NIfTI's, listed (S, A, R)), or None (photographs);
- ``TASKS: dict[str, Task]`` – the tasks it can offer;
- ``list_cases(root: Path) -> list[CaseRef]`` – every case with its split, cheap (no pixel reads),
  raising `CtanError` for an empty or malformed dataset;
- ``read_case(root: Path, ref: CaseRef) -> Case`` – one case in physical units.

``root`` is the extracted raw dataset folder (what ``ctan download`` produced). The readers share
`read_table` and `cached_per_file` for their CSV label tables, so a bad table reads the same in each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache, wraps
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from ctan.errors import CtanError

SPLITS = ("train", "validation", "test")

T = TypeVar("T")


@dataclass(frozen=True)
class CaseRef:
    case_id: str
    split: str


@dataclass
class Case:
    """One case, as read from its official files, before any resampling.

    image:    (C, *spatial) – CT in HU as float32 (C=1), or RGB uint8 (C=3) for dermoscopy.
              Spatial axes are (z, y, x) for 3D and (y, x) for 2D.
    spacing:  mm per spatial axis, same order as the array axes.
    origin:   world position (mm) of voxel 0, same axis order.
    direction: flattened direction cosine matrix (row-major, D×D), same axis order.
    dense:    dense targets, each (C, *spatial) on the image grid: ``dose`` float32 Gy,
              ``possible_dose_mask`` uint8, ``structures`` uint8 (one channel per structure),
              ``lesion`` uint8 (0/1).
    labels:   image-level targets: ``diagnosis`` int, ``covid`` int, ``severity`` int.
    structure_present: for ``structures``, whether each structure was contoured (absent ≠ empty).
    sources:  the files this case was read from (hashed into the manifest).
    """

    case_id: str
    split: str
    image: np.ndarray
    spacing: tuple[float, ...]
    origin: tuple[float, ...] = ()
    direction: tuple[float, ...] = ()
    dense: dict[str, np.ndarray] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    structure_present: tuple[bool, ...] = ()
    sources: tuple[Path, ...] = ()

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.image.shape[1:])


def read_table(path: Path, columns: tuple[str, ...], hint: str = "", **read_csv: Any) -> pd.DataFrame:
    """A CSV that must hold ``columns``, or a `CtanError` naming the file instead of a pandas traceback.

    Column names are stripped of surrounding spaces (``PatientID, probCOVID`` is a header of two known
    columns); a semicolon-separated file is named as such."""
    try:
        table = pd.read_csv(path, **read_csv)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as err:
        raise CtanError(path, f"not a readable CSV: {err}") from None
    # "PatientID, probCOVID" (a space after each comma, as people type it) names the same columns.
    table.columns = [c.strip() if isinstance(c, str) else c for c in table.columns]
    missing = [c for c in columns if c not in table.columns]
    if missing:
        if len(table.columns) == 1 and ";" in str(table.columns[0]):
            hint += "; separated by ';' instead of ','? (save it as comma-separated CSV)"
        raise CtanError(path, f"missing column(s) {', '.join(missing)}{hint}")
    return table


def cached_per_file(read: Callable[[Path], T]) -> Callable[[Path], T]:
    """``read`` of a file, kept until the file changes (mtime or size): readers look one row up per case."""

    @lru_cache(maxsize=4)
    def by_version(path: str, mtime_ns: int, size: int) -> T:
        return read(Path(path))

    @wraps(read)
    def cached(path: Path) -> T:
        if not path.is_file():
            raise CtanError(path, "missing")
        stat = path.stat()
        return by_version(str(path), stat.st_mtime_ns, stat.st_size)

    return cached


SHEAR_TOLERANCE = 1e-4
"""Largest |cosine| allowed between two voxel axes (float32 affines reach ~1e-7): a CT grid is a rotation
times a scaling; more is a sheared (gantry-tilted) grid that (spacing, direction) cannot describe."""

MAX_DOSE_GY = 300.0
"""No external-beam plan comes near it (the OpenKBP sample peaks at 72-80 Gy): a dose above is in cGy."""


def shear(linear: np.ndarray) -> float:
    """Largest |cosine| between two voxel axes (columns) of a 3x3 matrix: 0 for a rotation times a
    scaling, whatever the readers' axis order."""
    linear = np.asarray(linear, dtype=float)
    norms = np.linalg.norm(linear, axis=0)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0):
        return float("inf")  # a zero or undefined axis: no grid at all
    unit = linear / norms
    return float(np.abs(unit.T @ unit - np.eye(len(unit))).max())


def check_orthogonal(linear: np.ndarray, path: Path) -> None:
    """Refuse a sheared voxel grid, naming the file."""
    skew = shear(linear)
    if skew > SHEAR_TOLERANCE:
        raise CtanError(
            path,
            f"the voxel grid is sheared (voxel axes not orthogonal: largest |cos| between axes {skew:.3g}); "
            "resample the image onto an orthogonal grid first",
        )


def check_dose(dose: np.ndarray, path: Path) -> None:
    """Refuse negative dose and dose in cGy (> `MAX_DOSE_GY`), naming the file; NaN is the reader's."""
    if not dose.size:
        return
    low, high = float(dose.min()), float(dose.max())
    if low < 0:
        raise CtanError(path, f"negative dose {low:g} Gy")
    if high > MAX_DOSE_GY:
        raise CtanError(path, f"dose up to {high:g}: doses are in Gy (is this file in cGy?)")


HU_FLOOR = -4096.0
"""Below any CT number a scanner writes (air is -1000 HU; out-of-field padding is at most -3024)."""


def check_hu(ct: np.ndarray, path: Path) -> None:
    """Refuse a CT that is not in Hounsfield units, naming the file: one with nothing below 0 HU (no air,
    no fat: stored with an offset such as +1024, or as 8-bit) or with values below any scanner's floor
    (byte order or scaling read wrong)."""
    if not ct.size:
        return
    low = float(ct.min())
    if low < HU_FLOOR:
        raise CtanError(
            path, f"CT values down to {low:g} HU, below any scanner's (air is -1000): byte order or scaling?"
        )
    if low >= 0:
        raise CtanError(
            path,
            f"no voxel below 0 HU (lowest {low:g}; air is -1000 HU, fat about -100): not in HU? "
            "(stored with an offset such as +1024, or as 8-bit)",
        )
