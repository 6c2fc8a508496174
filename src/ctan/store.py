"""Preprocessed Zarr stores: one sharded Zarr v3 store per split, one OME-NGFF-style image group per case.

Layout of ``<preprocessed>/<dataset>/<split>.zarr``::

    zarr.json                 attrs: ctan = {dataset, format, split, spatial_dims, case_ids,
                                            structure_names, class_names, tasks, intensity}
    <case_id>/                group; attrs: ome = {version, multiscales: [...]} (axes c,z,y,x in mm),
                              ctan = {spacing, origin, direction, labels, structure_present,
                                      source_shape, source_spacing, source_origin, source_direction}
    <case_id>/image           (C, *spatial): CT in HU float32, or RGB uint8
    <case_id>/<dense target>  (C, *spatial): dose, possible_dose_mask, structures, lesion

Every array is written as a single shard (one file per array) because DVC is slow with many small
files (see shared/notes/pitfalls.md); inner chunks keep partial reads cheap.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from ctan.datasets.base import Case

NGFF_VERSION = "0.5"
# zstd-3 with byte shuffle: about 40 % less CPU than zstd-5 bitshuffle at a smaller size
# (benchmarks/preprocess.py on the OpenKBP sample); compression dominates preprocessing time.
_COMPRESSOR = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")


def array_hash(array: np.ndarray) -> str:
    """Content hash of a decoded array: dtype, shape and bytes, independent of chunking and codec."""
    digest = hashlib.sha256()
    digest.update(f"{array.dtype.str}|{array.shape}|".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    # Channel by channel, spatial blocks of at most 64 voxels per axis.
    return (1, *(min(s, 64) for s in shape[1:]))


def _shards(shape: tuple[int, ...], chunks: tuple[int, ...]) -> tuple[int, ...]:
    # One shard holds the whole array; zarr needs it to be a whole number of chunks.
    return tuple(-(-s // c) * c for s, c in zip(shape, chunks, strict=True))


def _ngff_multiscales(case: Case, names: list[str]) -> dict[str, Any]:
    axis_names = ["z", "y", "x"][-len(case.spacing) :]
    axes = [{"name": "c", "type": "channel"}] + [
        {"name": n, "type": "space", "unit": "millimeter"} for n in axis_names
    ]
    transforms = [{"type": "scale", "scale": [1.0, *map(float, case.spacing)]}]
    if case.origin:
        transforms.append({"type": "translation", "translation": [0.0, *map(float, case.origin)]})
    return {
        "version": NGFF_VERSION,
        "multiscales": [
            {
                "name": case.case_id,
                "axes": axes,
                "datasets": [{"path": "image", "coordinateTransformations": transforms}],
            }
        ],
        "labels": [n for n in names if n != "image"],
    }


def write_case(root: zarr.Group, case: Case, extra: dict[str, Any] | None = None) -> dict[str, str]:
    """Write one (already resampled) case into an open split group; return {array: content hash}."""
    arrays = {"image": case.image, **case.dense}
    group = root.create_group(case.case_id)
    group.attrs["ome"] = _ngff_multiscales(case, list(arrays))
    group.attrs["ctan"] = {
        "spacing": [float(s) for s in case.spacing],
        "origin": [float(o) for o in case.origin],
        "direction": [float(d) for d in case.direction],
        "labels": {k: int(v) for k, v in case.labels.items()},
        "structure_present": [bool(p) for p in case.structure_present],
        **(extra or {}),
    }
    hashes = {}
    for name, data in arrays.items():
        data = np.ascontiguousarray(data)
        chunks = _chunks(data.shape)
        group.create_array(
            name,
            data=data,
            chunks=chunks,
            shards=_shards(data.shape, chunks),
            compressors=_COMPRESSOR,
        )
        hashes[name] = array_hash(data)
    return hashes


def create_split(path: Path, attrs: dict[str, Any]) -> zarr.Group:
    """Create an empty split store; ``attrs`` go under the ``ctan`` key of its root group."""
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.attrs["ctan"] = attrs
    return root


@dataclass
class SplitStore:
    """Read access to one split store, as the loader and evaluator need it."""

    path: Path
    group: zarr.Group

    @classmethod
    def open(cls, path: str | Path) -> SplitStore:
        path = Path(path)
        if not (path / "zarr.json").is_file():
            from ctan.errors import CtanError

            raise CtanError(
                path, "not a preprocessed split store (no zarr.json); run `ctan preprocess` first"
            )
        return cls(path, zarr.open_group(str(path), mode="r"))

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs["ctan"])

    @property
    def case_ids(self) -> list[str]:
        return list(self.attrs["case_ids"])

    def case_attrs(self, case_id: str) -> dict[str, Any]:
        return dict(self.group[case_id].attrs["ctan"])

    def array(self, case_id: str, name: str) -> zarr.Array:
        """The lazily read array; slice it to read only a patch."""
        return self.group[case_id][name]

    def array_names(self, case_id: str) -> list[str]:
        return sorted(name for name, _ in self.group[case_id].arrays())

    def read_case(self, case_id: str) -> dict[str, Any]:
        """Every array of a case as numpy, plus its attrs under ``attrs``."""
        out: dict[str, Any] = {n: self.array(case_id, n)[...] for n in self.array_names(case_id)}
        out["attrs"] = self.case_attrs(case_id)
        return out
