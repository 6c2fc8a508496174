"""The common interface every dataset module offers: list cases, read one case, official splits.

A dataset module (``openkbp``, ``ham10000``, ``stoic``, ``nifti_cases``) defines:

- ``FORMAT: str`` – its registry name;
- ``SPATIAL_DIMS: int`` – 2 or 3;
- ``TASKS: dict[str, Task]`` – the tasks it can offer;
- ``list_cases(root: Path) -> list[CaseRef]`` – every case with its split, cheap (no pixel reads),
  raising `CtanError` for an empty or malformed dataset;
- ``read_case(root: Path, ref: CaseRef) -> Case`` – one case in physical units.

``root`` is the extracted raw dataset folder (what ``ctan download`` produced).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SPLITS = ("train", "validation", "test")


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
