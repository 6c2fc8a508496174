"""Preprocessed Zarr stores: one sharded Zarr v3 store per split, one OME-Zarr 0.5 image per case.

Layout of ``<preprocessed>/<dataset>/<split>.zarr``::

    zarr.json                 attrs: ctan = {dataset, format, split, spatial_dims, case_ids,
                                            structure_names, class_names, tasks, intensity}
    <case_id>/                OME-Zarr image; attrs: ome = {version, multiscales: [image, <float targets>]}
                              (axes c,z,y,x or c,y,x, in mm), ctan = {spacing, origin, direction, labels,
                              structure_present, source_shape, source_spacing, source_origin,
                              source_direction}
    <case_id>/image           (C, *spatial): CT in HU float32, or RGB uint8
    <case_id>/<float target>  (C, *spatial): dose in Gy, a further multiscale of the same image
    <case_id>/labels/         OME-Zarr labels group: ome = {version, labels: [<integer targets>]}
    <case_id>/labels/<name>/  OME-Zarr image-label (source ../../); its one level is the array ``0``:
                              possible_dose_mask, structures, lesion (uint8 masks)

Every array carries ``dimension_names`` equal to its axes, so the case groups validate as OME-Zarr 0.5
images (``ome-zarr-models``; tests/test_store.py). Read arrays by name through `SplitStore`, which
resolves a name to its path (stores written before ``labels/`` existed, all arrays flat, still read).

Every array is written as a single shard (one file per array) because DVC is slow with many small
files (see shared/notes/pitfalls.md); inner chunks keep partial reads cheap.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.core.array_spec import ArraySpec
from zarr.core.buffer import Buffer
from zarr.core.group import AsyncGroup, GroupMetadata
from zarr.core.sync import sync
from zarr.storage import LocalStore, MemoryStore, StorePath

from ctan.datasets.base import Case

NGFF_VERSION = "0.5"
LABELS = "labels"  # the OME-Zarr labels group of a case
LEVEL = "0"  # the one resolution level of a label image


class _InlineBlosc(BloscCodec):
    """zarr's Blosc codec, encoding on the calling thread: the same metadata and bytes (test).

    zarr hands every chunk to a worker thread to keep its event loop free for I/O; `write_case` encodes a
    case into memory, where there is no I/O to overlap, and the hand-offs cost about a fifth of the
    encoding's CPU (benchmarks/preprocess.py's write stage)."""

    async def _encode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> Buffer | None:
        return self._encode_sync(chunk_bytes, chunk_spec)


# zstd-3 with byte shuffle: about 40 % less CPU than zstd-5 bitshuffle at a smaller size
# (benchmarks/preprocess.py on the OpenKBP sample); compression dominates preprocessing time.
_BLOSC = {"cname": "zstd", "clevel": 3, "shuffle": "shuffle"}
_COMPRESSOR = _InlineBlosc(**_BLOSC)


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


def _axis_names(case: Case) -> list[str]:
    return ["c", *["z", "y", "x"][-len(case.spacing) :]]


def _multiscale(case: Case, name: str, path: str) -> dict[str, Any]:
    """One single-level OME-Zarr multiscale: axes c + space (mm), scale and translation to world."""
    axes = [{"name": "c", "type": "channel"}] + [
        {"name": n, "type": "space", "unit": "millimeter"} for n in _axis_names(case)[1:]
    ]
    transforms = [{"type": "scale", "scale": [1.0, *map(float, case.spacing)]}]
    if case.origin:
        transforms.append({"type": "translation", "translation": [0.0, *map(float, case.origin)]})
    return {"name": name, "axes": axes, "datasets": [{"path": path, "coordinateTransformations": transforms}]}


def _is_label(data: np.ndarray) -> bool:
    """Integer targets (masks) are OME-Zarr labels; float ones (dose) are not."""
    return np.issubdtype(data.dtype, np.integer)


async def _write_array(group: AsyncGroup, name: str, data: np.ndarray, axes: list[str]) -> None:
    chunks = _chunks(data.shape)
    await group.create_array(
        name,
        data=data,
        chunks=chunks,
        shards=_shards(data.shape, chunks),
        compressors=_COMPRESSOR,
        dimension_names=axes,
    )


async def _write_case(
    root: AsyncGroup,
    case_id: str,
    attrs: dict[str, Any],
    images: dict[str, np.ndarray],
    labels: dict[str, tuple[dict[str, Any], np.ndarray]],
    axes: list[str],
) -> None:
    """The case's groups, each created with its attributes, and its arrays, written concurrently."""
    group = await root.create_group(case_id, attributes=attrs)
    writes = [_write_array(group, name, data, axes) for name, data in images.items()]
    if labels:
        label_group = await group.create_group(
            LABELS, attributes={"ome": {"version": NGFF_VERSION, "labels": list(labels)}}
        )

        async def write_label(name: str, ome: dict[str, Any], data: np.ndarray) -> None:
            image_label = await label_group.create_group(name, attributes={"ome": ome})
            await _write_array(image_label, LEVEL, data, axes)

        writes += [write_label(name, ome, data) for name, (ome, data) in labels.items()]
    await asyncio.gather(*writes)


def write_case(root: zarr.Group, case: Case, extra: dict[str, Any] | None = None) -> dict[str, str]:
    """Write one (already resampled) case into an open split group; return {array: content hash}.

    zarr builds the case (every metadata document and shard) in memory, in one call into its event loop,
    and `_write_files` puts the finished files on disk: a local store hands each metadata and data file,
    and each check of a parent node, to a thread of its own, which cost more CPU than encoding the case
    (about twice the CPU of this way on the OpenKBP real sample, docs/architecture.md). The files are
    byte for byte those zarr writes itself.
    """
    attrs, images, labels, axes = _case_nodes(case, extra)
    staged: dict[str, Buffer] = {}
    # A root group object on an empty memory store: nothing to open, check or write first.
    staging = AsyncGroup(GroupMetadata(zarr_format=3), StorePath(MemoryStore(store_dict=staged)))
    sync(_write_case(staging, case.case_id, attrs, images, labels, axes))
    _write_files(root, case.case_id, {k: v for k, v in staged.items() if k.startswith(f"{case.case_id}/")})
    arrays = {**images, **{name: data for name, (_, data) in labels.items()}}
    return {name: array_hash(data) for name, data in arrays.items()}


def _case_nodes(
    case: Case, extra: dict[str, Any] | None
) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, tuple[dict[str, Any], np.ndarray]], list[str]]:
    """(case group attributes, image arrays, {label: (its OME attributes, mask)}, axes) of a case."""
    axes = _axis_names(case)
    images = {"image": case.image, **{k: v for k, v in case.dense.items() if not _is_label(v)}}
    images = {k: np.ascontiguousarray(v) for k, v in images.items()}  # the RGB image is uint8: not a label
    labels = {k: np.ascontiguousarray(v) for k, v in case.dense.items() if _is_label(v)}
    attrs = {
        "ome": {
            "version": NGFF_VERSION,
            "multiscales": [_multiscale(case, case.case_id if n == "image" else n, n) for n in images],
        },
        "ctan": {
            "spacing": [float(s) for s in case.spacing],
            "origin": [float(o) for o in case.origin],
            "direction": [float(d) for d in case.direction],
            "labels": {k: int(v) for k, v in case.labels.items()},
            "structure_present": [bool(p) for p in case.structure_present],
            **(extra or {}),
        },
    }
    image_labels = {
        name: (
            {
                "version": NGFF_VERSION,
                "image-label": {"source": {"image": "../../"}},
                "multiscales": [_multiscale(case, name, LEVEL)],
            },
            data,
        )
        for name, data in labels.items()
    }
    return attrs, images, image_labels, axes


def _write_files(root: zarr.Group, case_id: str, files: dict[str, Buffer]) -> None:
    """Write a case's zarr-encoded files under a split group on the local file system, one plain write
    each. A case already in the split is refused, as zarr refuses to create a node twice.

    Not atomic file by file: `ctan preprocess` writes a split in a partial folder and renames the
    finished store into place, so a reader never sees a half-written case.
    """
    if not isinstance(root.store, LocalStore):
        raise TypeError(f"write_case writes split stores on the local file system, not {root.store!r}")
    base = Path(root.store.root, root.path)
    if (base / case_id).exists():
        raise FileExistsError(f"{base / case_id}: case {case_id!r} is already in this split store")
    # Each folder once, parents first: one mkdir call a folder (mkdir(parents=True) tries, fails and
    # retries up the tree; creating a folder is much of a small case's cost on some disks).
    folders = {parent for key in files for parent in Path(key).parents if parent != Path(".")}
    for folder in sorted(folders, key=lambda f: len(f.parts)):
        (base / folder).mkdir()
    for key, buffer in files.items():
        with open(base / key, "wb") as handle:
            handle.write(buffer.as_buffer_like())


def create_split(path: Path, attrs: dict[str, Any]) -> zarr.Group:
    """Create an empty split store; ``attrs`` go under the ``ctan`` key of its root group."""
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.attrs["ctan"] = attrs
    return root


def array_folder(case_dir: Path, name: str) -> Path:
    """Where array ``name`` of a case lives on disk: ``labels/<name>/0`` for a label, else ``<name>``
    (also for stores written before ``labels/`` existed). For readers that bypass zarr (the loader's
    one-pass preload); `SplitStore.array` is the zarr way."""
    label = case_dir / LABELS / name / LEVEL
    return label if (label / "zarr.json").is_file() else case_dir / name


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

    def _label_names(self, case_id: str) -> list[str]:
        case = self.group[case_id]
        if LABELS not in case:  # written before labels/ existed: every array flat in the case group
            return []
        return list(case[LABELS].attrs["ome"]["labels"])

    def array(self, case_id: str, name: str) -> zarr.Array:
        """The lazily read array (image, dose, or a label such as structures); slice it to read a patch."""
        if name in self._label_names(case_id):
            return self.group[case_id][LABELS][name][LEVEL]
        return self.group[case_id][name]

    def array_names(self, case_id: str) -> list[str]:
        direct = [name for name, _ in self.group[case_id].arrays()]
        return sorted(direct + self._label_names(case_id))

    def read_case(self, case_id: str) -> dict[str, Any]:
        """Every array of a case as numpy, plus its attrs under ``attrs``."""
        out: dict[str, Any] = {n: self.array(case_id, n)[...] for n in self.array_names(case_id)}
        out["attrs"] = self.case_attrs(case_id)
        return out
