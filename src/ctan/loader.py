"""The torch Dataset over the preprocessed split stores, and the training augmentation.

Why it looks like this:

- Stores keep physical units (HU, 8-bit RGB); the image is normalised here with the window recorded in
  the store (`ctan.preprocess.intensity`), so a change of window needs no new preprocessing.
- Every random choice of an item comes from a generator seeded with (seed, epoch, index), so an epoch
  gives the same items whatever the number of DataLoader workers, and a resumed run sees the same data.
- A 3D patch is read by slicing the Zarr array: only the chunks under the patch are decoded.
- The store is opened lazily in each process (never pickled), so ``num_workers > 0`` is safe. A
  DataLoader serves the whole run, fed ``(epoch, index)`` keys by `EpochSampler`, so its workers
  persist: a forked worker keeps the cases the main process decoded and needs no epoch state.
- Decoded cases are kept in memory up to ``cache_mb`` per process: Zarr's fixed cost per read (about a
  millisecond an array) otherwise dominates small 2D items. A cached case is the same array a read
  would give, so caching never changes what an item holds.
- The cache is filled in one pass when a process first reads the split (`CaseDataset.preload`), case
  after case until ``cache_mb`` is used: each array is decoded straight from its shard file
  (`read_shard`, ~20x less overhead than a read through zarr for a small 2D array), so the first epoch
  does not wait on per-item reads. Arrays in any layout `read_shard` does not know go through zarr.
- The DataLoader asks for a batch at once (`CaseDataset.__getitems__`): whole 2D images in memory are
  normalised, flipped and colour-jittered as one array, with the bits the items have one by one.
- Training iterates a loader through `prefetched`, which builds the next batches in a thread while
  the model trains on this one.

Augmentation (``augment=True``): 3D random patches of ``patch_size`` and random flips along each axis
(a flip along x, the patient's left-right axis, also swaps the channels of paired Left/Right
structures, so labels stay anatomically right); 2D random flips and a small colour jitter (brightness,
contrast, saturation). Without augmentation a patch is the centred one, and ``patch_size=None`` gives
the whole case.
"""

from __future__ import annotations

import json
import os
import queue
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numcodecs.blosc
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ctan.errors import CtanError
from ctan.preprocess.intensity import normalise_ct, normalise_rgb
from ctan.store import SplitStore, array_folder
from ctan.tasks import Task

T = TypeVar("T")

FLIP_PROBABILITY = 0.5
JITTER = {"brightness": 0.1, "contrast": 0.1, "saturation": 0.1}  # factors drawn from 1 ± these
_JITTER_LOW = np.array([1 - v for v in JITTER.values()])
_JITTER_HIGH = np.array([1 + v for v in JITTER.values()])
_GREY_ROW = np.array([[0.299, 0.587, 0.114]], dtype=np.float32)  # ITU-R BT.601 luma, as torchvision uses


@dataclass(frozen=True)
class Augmentation:
    """The random choices for one item. ``start`` is the patch corner in voxels (may be negative
    where the patch is larger than the case: the rest is padded); ``flips`` are spatial axes."""

    start: tuple[int, ...] = ()
    flips: tuple[int, ...] = ()
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0


def patch_start(
    shape: Sequence[int], patch: Sequence[int], rng: np.random.Generator | None = None
) -> tuple[int, ...]:
    """Corner of a patch inside ``shape``: uniformly random with ``rng``, else centred."""
    out = []
    for n, p in zip(shape, patch, strict=True):
        lo, hi = min(0, n - p), max(0, n - p)
        out.append(int(rng.integers(lo, hi + 1)) if rng is not None else (n - p) // 2)
    return tuple(out)


def read_window(array: Any, start: Sequence[int], size: Sequence[int], fill: float = 0) -> np.ndarray:
    """``array[:, start:start+size]`` over the spatial axes, reading only that region; the part
    outside the array is padded with ``fill``."""
    shape = array.shape[1:]
    lo = [max(s, 0) for s in start]
    hi = [min(s + p, n) for s, p, n in zip(start, size, shape, strict=True)]
    data = np.asarray(array[(slice(None), *(slice(a, b) for a, b in zip(lo, hi, strict=True)))])
    pad = [(a - s, s + p - b) for s, p, a, b in zip(start, size, lo, hi, strict=True)]
    if any(before or after for before, after in pad):
        data = np.pad(data, [(0, 0), *pad], constant_values=fill)
    return data


_EMPTY = 2**64 - 1  # a shard index entry for a chunk that was never written (all fill value)


def read_shard(path: Path) -> np.ndarray | None:
    """The whole array at ``path`` (a Zarr v3 array folder), decoded directly from its single shard, or
    None unless it is laid out as `ctan.store` writes arrays: one shard holding the whole array, inner
    chunks of bytes + Blosc, the shard index (little-endian, CRC32C) at the end."""
    try:
        meta = json.loads((path / "zarr.json").read_text())
        shape = tuple(meta["shape"])
        shard_shape = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])  # one shard: >= shape
        (codec,) = meta["codecs"]
        config = codec["configuration"]
        inner = [c["name"] for c in config["codecs"]]
        index_codecs = [(c["name"], c.get("configuration", {}).get("endian")) for c in config["index_codecs"]]
        layout_known = (
            meta.get("zarr_format") == 3
            and meta.get("node_type") == "array"
            and not meta.get("storage_transformers")
            and meta["chunk_grid"]["name"] == "regular"
            and len(shard_shape) == len(shape)
            and all(a >= b for a, b in zip(shard_shape, shape, strict=True))
            and meta["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}}
            and codec["name"] == "sharding_indexed"
            and config.get("index_location", "end") == "end"
            and index_codecs == [("bytes", "little"), ("crc32c", None)]
            and inner == ["bytes", "blosc"]
            and config["codecs"][0].get("configuration", {}).get("endian") in (None, "little")
        )
        if not layout_known:
            return None
        dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        chunk = tuple(config["chunk_shape"])
        fill = meta["fill_value"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    out = np.full(shape, fill, dtype=dtype)
    shard = path / "c" / "/".join("0" * len(shape))
    if not shard.is_file():  # zarr does not write a shard that holds only the fill value
        return out
    data = shard.read_bytes()
    grid = tuple(s // c for s, c in zip(shard_shape, chunk, strict=True))
    entries = int(np.prod(grid))
    index = np.frombuffer(data, "<u8", count=2 * entries, offset=len(data) - 16 * entries - 4)
    for i, at in enumerate(np.ndindex(*grid)):
        offset, length = int(index[2 * i]), int(index[2 * i + 1])
        outside = any(a * c >= s for a, c, s in zip(at, chunk, shape, strict=True))
        if outside or (offset == _EMPTY and length == _EMPTY):
            continue
        block = np.frombuffer(numcodecs.blosc.decompress(data[offset : offset + length]), dtype)
        block = block.reshape(chunk)
        region = tuple(slice(a * c, min((a + 1) * c, s)) for a, c, s in zip(at, chunk, shape, strict=True))
        out[region] = block[tuple(slice(0, r.stop - r.start) for r in region)]
    return out.astype(dtype.newbyteorder("="), copy=False)


def flip(array: np.ndarray, axes: Sequence[int]) -> np.ndarray:
    """Flip the given spatial axes of a (C, *spatial) array."""
    if not axes:
        return array
    return np.ascontiguousarray(np.flip(array, axis=tuple(a + 1 for a in axes)))


def colour_jitter(rgb: np.ndarray, brightness: float, contrast: float, saturation: float) -> np.ndarray:
    """Adjust a (3, H, W) image in [0, 1] as torchvision's ColorJitter does, in that order; clipped.
    `colour_jitter_batch` of a batch of one, on a float32 copy."""
    batch = np.array(rgb, dtype=np.float32)[None]
    return colour_jitter_batch(batch, np.array([[brightness, contrast, saturation]]))[0]


def colour_jitter_batch(rgb: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """`colour_jitter` of a float32 (B, 3, H, W) batch in place, item i with ``factors[i]`` =
    (brightness, contrast, saturation). Float32 throughout on one buffer: numpy's per-call overhead,
    not the arithmetic, is what a small image costs, so the element-wise steps run once for the batch;
    the grey projections (a BLAS product and its mean) run per item, so an item's bits do not depend
    on the batch it is in."""
    out = rgb.reshape(len(rgb), 3, -1)
    f = factors.astype(np.float32).reshape(len(rgb), 3, 1, 1)
    out *= f[:, 0]
    _unit(out)
    mean = np.stack([np.dot(_GREY_ROW, item).mean() for item in out]).reshape(-1, 1, 1)
    out -= mean
    out *= f[:, 1]
    out += mean
    _unit(out)
    grey = np.stack([np.dot(_GREY_ROW, item) for item in out])
    out -= grey
    out *= f[:, 2]
    out += grey
    return _unit(out).reshape(rgb.shape)


def _unit(x: np.ndarray) -> np.ndarray:
    """Clip to [0, 1] in place (np.clip's wrapper costs more than the work on a small image)."""
    np.maximum(x, 0, out=x)
    return np.minimum(x, 1, out=x)


_SIDE = re.compile(r"^(Left|Right)(.+)$|^(.+?)[_ ]?(L|R)$")


def lateral_pairs(names: Sequence[str]) -> list[tuple[int, int]]:
    """Channel index pairs of structures that mirror each other (``LeftParotid``/``RightParotid``,
    ``Femur_L``/``Femur_R``)."""

    def key(name: str) -> tuple[str, str] | None:
        m = _SIDE.match(name)
        if not m:
            return None
        if m.group(1):
            return m.group(1)[0], m.group(2)
        return m.group(4), m.group(3)

    index = {key(n): i for i, n in enumerate(names) if key(n)}
    return [(i, index[("R", k[1])]) for k, i in index.items() if k[0] == "L" and ("R", k[1]) in index]


def swap_channels(array: np.ndarray, pairs: Sequence[tuple[int, int]]) -> np.ndarray:
    """Exchange paired channels (first axis)."""
    if not pairs:
        return array
    order = list(range(array.shape[0]))
    for a, b in pairs:
        order[a], order[b] = b, a
    return array[order]


class CaseDataset(Dataset):
    """Items of one split store: ``{"case_id", "image", <task.name>: target, ...}`` (see module doc).

    ``image`` is float32 (C, *spatial), normalised; dense targets are float32 (C, *spatial); labels
    are int64 scalars; ``possible_dose_mask`` (float32) comes with a dose task and
    ``structure_present`` (bool, S) with a structures task.
    """

    def __init__(
        self,
        store_dir: str | Path,
        split: str,
        tasks: Sequence[Task],
        patch_size: Sequence[int] | None = None,
        augment: bool = False,
        seed: int = 0,
        cache_mb: int = 0,
    ) -> None:
        self.path = Path(store_dir) / f"{split}.zarr"
        store = SplitStore.open(self.path)
        attrs = store.attrs
        self.case_ids: list[str] = list(attrs.get("case_ids", []))
        if not self.case_ids:
            raise CtanError(self.path, "the split store holds no cases")
        self.spatial_dims = int(attrs["spatial_dims"])
        self.tasks = list(tasks)
        self.patch_size = None if patch_size is None else tuple(int(p) for p in patch_size)
        if self.patch_size is not None and len(self.patch_size) != self.spatial_dims:
            raise CtanError(
                self.path,
                f"patch_size {list(self.patch_size)} does not match {self.spatial_dims} spatial axes",
            )
        self.augment = bool(augment)
        self.seed = int(seed)
        self.epoch = 0
        self.intensity = dict(attrs.get("intensity") or {})
        self.structure_names = list(attrs.get("structure_names") or [])
        self._pairs = lateral_pairs(self.structure_names) if self.spatial_dims == 3 else []
        self._with_dose_mask = any(t.target == "dose" for t in self.tasks)
        self._check(store)
        self._store: SplitStore | None = None
        self._pid: int | None = None
        self._arrays: dict[tuple[str, str], Any] = {}  # per process: opening an array reads its metadata
        self._attrs: dict[str, dict[str, Any]] = {}
        self.cache_bytes = int(cache_mb) * 2**20
        self._cached = 0

    def _check(self, store: SplitStore) -> None:
        """Fail at construction, naming the store, rather than in a worker mid-epoch."""
        case_id = self.case_ids[0]
        arrays = set(store.array_names(case_id))
        labels = store.case_attrs(case_id).get("labels", {})
        needed = {t.target for t in self.tasks if t.dense} | {"image"}
        if self._with_dose_mask:
            needed.add("possible_dose_mask")
        missing = sorted(needed - arrays) + sorted(
            t.target for t in self.tasks if not t.dense and t.target not in labels
        )
        if missing:
            raise CtanError(self.path / case_id, f"no {', '.join(missing)} for the requested tasks")
        if "ct_window" not in self.intensity and store.array(case_id, "image").dtype != np.uint8:
            raise CtanError(
                self.path, "no CT window in the store's intensity attributes; re-run `ctan preprocess`"
            )

    def __len__(self) -> int:
        return len(self.case_ids)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose random augmentation the items get."""
        self.epoch = int(epoch)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_store"], state["_pid"] = None, None  # each worker opens its own
        state["_arrays"], state["_attrs"], state["_cached"] = {}, {}, 0
        return state

    def _open(self) -> SplitStore:
        if self._store is None or self._pid != os.getpid():
            self._store = SplitStore.open(self.path)
            self._pid = os.getpid()
            # A forked worker inherits the decoded cases (copy-on-write); open Zarr arrays it reopens.
            self._arrays = {k: v for k, v in self._arrays.items() if isinstance(v, np.ndarray)}
            if not self._arrays:
                self.preload()
        return self._store

    def _needed_arrays(self) -> list[str]:
        names = ["image", *(t.target for t in self.tasks if t.dense)]
        return names + (["possible_dose_mask"] if self._with_dose_mask else [])

    def preload(self) -> None:
        """Fill this process's cache in one pass over the split, case by case, up to ``cache_mb``."""
        for case_id in self.case_ids:
            try:  # the case's attributes, from its group's zarr.json, as `SplitStore.case_attrs` reads them
                meta = json.loads((self.path / case_id / "zarr.json").read_text())
                self._attrs.setdefault(case_id, dict(meta["attributes"]["ctan"]))
            except (OSError, ValueError, KeyError, TypeError):
                pass
            for name in self._needed_arrays():
                if (case_id, name) in self._arrays:
                    continue
                array = read_shard(array_folder(self.path / case_id, name))
                if array is None or self._cached + array.nbytes > self.cache_bytes:
                    return
                self._arrays[case_id, name] = array
                self._cached += array.nbytes

    def _array(self, case_id: str, name: str) -> Any:
        key = (case_id, name)
        if key not in self._arrays:
            array = self._open().array(case_id, name)
            nbytes = int(np.prod(array.shape)) * array.dtype.itemsize
            if self._cached + nbytes <= self.cache_bytes:
                array = np.asarray(array[...])
                self._cached += nbytes
            self._arrays[key] = array
        return self._arrays[key]

    def _case_attrs(self, case_id: str) -> dict[str, Any]:
        if case_id not in self._attrs:
            self._attrs[case_id] = self._open().case_attrs(case_id)
        return self._attrs[case_id]

    def augmentation(
        self, index: int, shape: Sequence[int] | None = None, epoch: int | None = None
    ) -> Augmentation:
        """The random choices for item ``index`` in ``epoch`` (default: the current one); a pure
        function of seed, epoch, index and the case's shape."""
        epoch = self.epoch if epoch is None else int(epoch)
        if shape is None:
            shape = self._array(self.case_ids[index], "image").shape[1:]
        if not self.augment:
            start = patch_start(shape, self.patch_size) if self.patch_size else ()
            return Augmentation(start=start)
        rng = np.random.default_rng([self.seed, epoch, index])
        start = patch_start(shape, self.patch_size, rng) if self.patch_size else ()
        flips = tuple(a for a in range(self.spatial_dims) if rng.random() < FLIP_PROBABILITY)
        if self.spatial_dims == 2:
            brightness, contrast, saturation = rng.uniform(_JITTER_LOW, _JITTER_HIGH).tolist()
            return Augmentation(start, flips, brightness, contrast, saturation)
        return Augmentation(start=start, flips=flips)

    def _normalise(self, image: np.ndarray) -> np.ndarray:
        if "ct_window" in self.intensity:
            return normalise_ct(image, self.intensity["ct_window"])
        return normalise_rgb(image)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """Item ``key`` of the current epoch, or ``key = (epoch, index)`` as `EpochSampler` yields it
        (so a persistent worker needs no epoch state of its own)."""
        epoch, index = key if isinstance(key, tuple) else (None, key)
        self._open()
        case_id = self.case_ids[index]
        image_array = self._array(case_id, "image")
        shape = image_array.shape[1:]
        aug = self.augmentation(index, shape, epoch)
        size = self.patch_size or shape
        start = aug.start or (0,) * len(shape)
        x_flipped = self.spatial_dims == 3 and (self.spatial_dims - 1) in aug.flips

        def dense(name: str) -> np.ndarray:
            data = read_window(self._array(case_id, name), start, size)
            data = flip(data.astype(np.float32, copy=False), aug.flips)
            return swap_channels(data, self._pairs) if name == "structures" and x_flipped else data

        fill = self.intensity["ct_window"][0] if "ct_window" in self.intensity else 0
        image = flip(self._normalise(read_window(image_array, start, size, fill)), aug.flips)
        if self.spatial_dims == 2 and self.augment and image.shape[0] == 3:
            image = colour_jitter(image, aug.brightness, aug.contrast, aug.saturation)
        item: dict[str, Any] = {"case_id": case_id, "image": torch.from_numpy(np.ascontiguousarray(image))}
        attrs = self._case_attrs(case_id)
        for task in self.tasks:
            if task.dense:
                item[task.name] = torch.from_numpy(dense(task.target))
            else:
                item[task.name] = torch.tensor(int(attrs["labels"][task.target]), dtype=torch.int64)
            if task.target == "structures":
                channels = self._array(case_id, "structures").shape[0]
                present = np.asarray(attrs.get("structure_present") or [True] * channels, bool)
                present = swap_channels(present, self._pairs) if x_flipped else present
                item["structure_present"] = torch.from_numpy(np.ascontiguousarray(present))
        if self._with_dose_mask:
            item["possible_dose_mask"] = torch.from_numpy(dense("possible_dose_mask"))
        self._add_covid(item, attrs)
        return item

    def _add_covid(self, item: dict[str, Any], attrs: dict[str, Any]) -> None:
        """Severity is scored among COVID-positive cases (STOIC's AUC), so its items carry the COVID
        label even where the covid task is not trained (an STL severity network)."""
        labels = attrs.get("labels", {})
        if "covid" not in item and "covid" in labels and any(t.target == "severity" for t in self.tasks):
            item["covid"] = torch.tensor(int(labels["covid"]), dtype=torch.int64)

    def __getitems__(self, keys: Sequence[int | tuple[int, int]]) -> list[dict[str, Any]]:
        """The items of ``keys``, as `__getitem__` gives them one by one (the DataLoader asks for a
        batch at once). Whole 2D images held in memory are normalised, flipped and colour-jittered as
        one array: on a 48x48 item numpy's per-call overhead, not the arithmetic, is the cost."""
        keys = [k if isinstance(k, tuple) else (None, k) for k in keys]
        cases = [self.case_ids[index] for _, index in keys]
        if self.spatial_dims != 2 or self.patch_size is not None or not keys:
            return [self[k] for k in keys]
        self._open()
        names = ["image", *(t.target for t in self.tasks if t.dense)]
        arrays = {n: [self._array(c, n) for c in cases] for n in names}
        in_memory = all(isinstance(a, np.ndarray) for per in arrays.values() for a in per)
        special = self._with_dose_mask or any(t.target == "structures" for t in self.tasks)
        if not in_memory or len({a.shape for a in arrays["image"]}) != 1 or special:
            return [self[k] for k in keys]
        augs = [self.augmentation(index, arrays["image"][0].shape[1:], epoch) for epoch, index in keys]
        images = self._normalise(np.stack(arrays["image"]))
        dense = {n: np.stack(arrays[n]).astype(np.float32) for n in names[1:]}
        for i, aug in enumerate(augs):
            if aug.flips:
                axes = tuple(a + 1 for a in aug.flips)
                images[i] = np.flip(images[i], axis=axes)
                for d in dense.values():
                    d[i] = np.flip(d[i], axis=axes)
        if self.augment and images.shape[1] == 3:
            factors = np.array([(a.brightness, a.contrast, a.saturation) for a in augs])
            images = colour_jitter_batch(images, factors)
        image_t = torch.from_numpy(images)
        dense_t = {n: torch.from_numpy(d) for n, d in dense.items()}
        items = []
        for i, case_id in enumerate(cases):
            item: dict[str, Any] = {"case_id": case_id, "image": image_t[i]}
            labels = self._case_attrs(case_id).get("labels", {})
            for task in self.tasks:
                if task.dense:
                    item[task.name] = dense_t[task.target][i]
                else:
                    item[task.name] = torch.tensor(int(labels[task.target]), dtype=torch.int64)
            self._add_covid(item, self._case_attrs(case_id))
            items.append(item)
        return items


def stack_items(items: list[dict[str, Any]]) -> dict[str, Any]:
    """``default_collate``, or one line naming the cases where whole volumes of different sizes (a
    native grid: ``preprocess.shape`` null) cannot be stacked into a batch."""
    shapes = {tuple(item["image"].shape) for item in items}
    if len(shapes) > 1:
        sizes = ", ".join(f"{item['case_id']} {tuple(item['image'].shape[1:])}" for item in items[:3])
        raise CtanError(
            None,
            f"cases of one batch differ in size ({sizes}): on a native grid (preprocess.shape null) "
            "set training.patch_size (3D), a preprocess shape, or training.batch_size 1",
        )
    return torch.utils.data.default_collate(items)


class EpochSampler(Sampler[tuple[int, int]]):
    """``(epoch, index)`` keys for one pass over a `CaseDataset`: shuffled by (seed, epoch) alone when
    ``shuffle`` (in the order ``DataLoader(shuffle=True)`` with that generator gives), else in order.

    One DataLoader serves every epoch: set the epoch, iterate. Its workers can then persist (they keep
    their decoded cases), and an item is the same whichever process builds it."""

    def __init__(self, size: int, seed: int, shuffle: bool) -> None:
        self.size, self.seed, self.shuffle, self.epoch = int(size), int(seed), bool(shuffle), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            # The draw DataLoader(shuffle=True, generator=...) made for its workers' base seed comes
            # first, so the orders are those of earlier versions and published runs still reproduce.
            torch.empty((), dtype=torch.int64).random_(generator=generator)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = range(self.size)
        return ((self.epoch, i) for i in order)


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = object()


def prefetched(batches: Iterable[T], depth: int = 2) -> Iterator[T]:
    """``batches``, built up to ``depth`` ahead in a background thread while the model trains.

    Without loader workers the DataLoader builds each batch in the training thread, so every step
    waited for its batch: on the HAM10000 real sample 6 % of a HPS training epoch, 11 % of a STL
    diagnosis one. The batches are the same and in the same order (each item's randomness comes from
    its own seed), only built earlier. A DataLoader with workers is iterated as it is: they already
    build ahead, and workers forked from this thread could inherit locks held elsewhere. An error in
    the thread is raised here; closing the generator (or leaving the loop) stops the thread.
    """
    if getattr(batches, "num_workers", 0) > 0:
        yield from batches
        return
    slots: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        # torch ops here (collating) use the thread count the caller set: torch applies it per thread.
        try:
            for batch in batches:
                if not put(batch):
                    return
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which raises it
            put(_Failed(error))
            return
        put(_END)

    thread = threading.Thread(target=work, name="ctan-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()
