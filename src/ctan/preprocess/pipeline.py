"""`ctan preprocess`: every case of a downloaded dataset onto the configured grid, one Zarr store per split.

Reads ``settings.raw_dir`` (what `ctan download` produced) with the dataset's reader, resamples each
case (`ctan.preprocess.resample`), writes ``train.zarr``, ``validation.zarr`` and ``test.zarr``
(`ctan.store`), ``manifest.json`` (`ctan.manifest`) and ``plan.json`` (`ctan.preprocess.plan`: what
was done, from what) into a hidden folder beside ``settings.preprocessed_dir``, and moves it into place
only when everything succeeded: a bad case leaves nothing behind. CT stays in HU; the loader normalises
intensities (`ctan.preprocess.intensity`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from tqdm import tqdm

from ctan.config import DatasetSettings, params_hash
from ctan.datasets.base import SPLITS, Case, CaseRef
from ctan.errors import CtanError
from ctan.leakage import check_splits_apart
from ctan.manifest import MANIFEST, build_manifest, case_entry, write_manifest
from ctan.preprocess.plan import build_plan, fingerprint, write_plan
from ctan.preprocess.resample import resample_case
from ctan.provenance import file_sha256
from ctan.workspace import partial_folder

DEFAULT_CT_WINDOW = [-1000.0, 1000.0]


def target_grid(settings: DatasetSettings, spatial_dims: int) -> tuple[list[float] | None, list[int] | None]:
    """(spacing, shape) from ``preprocess:``, checked against the data's dimensionality."""
    spacing = settings.preprocess.get("spacing")
    shape = settings.preprocess.get("shape")
    where = f"datasets.{settings.name}.preprocess"
    if spatial_dims == 2 and spacing is not None:
        raise CtanError(
            None, f"{where}.spacing is for 3D data; {settings.format} is 2D: set only shape [H, W]"
        )
    if shape is not None and len(shape) != spatial_dims:
        raise CtanError(
            None, f"{where}.shape {list(shape)} must have {spatial_dims} entries for {settings.format}"
        )
    return spacing, shape


def _names(reader: ModuleType, root: Path, function: str, constant: str) -> list[str]:
    """Channel or class names: defined by the dataset (bring-your-own structures) or fixed by the format."""
    names = getattr(reader, function, None)
    if callable(names):
        return [str(n) for n in names(root)]
    return [str(n) for n in getattr(reader, constant, ())]


def source_hashes(case: Case, raw_dir: Path) -> dict[str, str]:
    """{path relative to the raw folder: sha256} of the files a case was read from."""
    out = {}
    root = raw_dir.resolve()  # once: resolving a path is a system call per component
    for path in case.sources:
        path = Path(path)
        try:
            rel = path.resolve().relative_to(root).as_posix()
        except ValueError:
            rel = path.as_posix()
        out[rel] = file_sha256(path)
    return out


def _blame(case: Case, name: str, root: Path) -> Path:
    """The file to name for a problem with array ``name``: the one called so if any, else the first."""
    for path in case.sources:
        if Path(path).name.split(".")[0] == name:
            return Path(path)
    return Path(case.sources[0]) if case.sources else root / case.case_id


def check_case(
    case: Case, spatial_dims: int, root: Path, same_grid: bool, structure_names: Sequence[str] | None = None
) -> None:
    """Refuse a case that would poison training: wrong dimensionality, non-finite values, mismatched grids."""
    arrays = {"image": case.image, **case.dense}
    if (
        structure_names is not None
        and "structures" in arrays
        and len(arrays["structures"]) != len(structure_names)
    ):
        raise CtanError(
            _blame(case, "structures", root),
            f"{len(arrays['structures'])} structure channels, but the dataset names {len(structure_names)}",
        )
    for name, array in arrays.items():
        if array.ndim != spatial_dims + 1:
            raise CtanError(
                _blame(case, name, root), f"{name} has shape {array.shape}, expected (C, {spatial_dims} axes)"
            )
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise CtanError(_blame(case, name, root), f"{name} has non-finite values (NaN or inf)")
        if same_grid and array.shape[1:] != case.image.shape[1:]:
            raise CtanError(
                _blame(case, name, root),
                f"{name} grid {array.shape[1:]} differs from the image grid {case.image.shape[1:]}",
            )
    if len(case.spacing) != spatial_dims or not all(np.isfinite(s) and s > 0 for s in case.spacing):
        raise CtanError(_blame(case, "image", root), f"invalid voxel spacing {case.spacing}")


def source_attrs(case: Case) -> dict[str, Any]:
    """The original grid, so predictions can be mapped back to it."""
    return {
        "source_shape": [int(n) for n in case.spatial_shape],
        "source_spacing": [float(s) for s in case.spacing],
        "source_origin": [float(o) for o in case.origin],
        "source_direction": [float(d) for d in case.direction],
    }


def _refs_by_split(
    cases: Sequence[tuple[CaseRef, str]], raw_dir: Path, splits: Sequence[str] = SPLITS
) -> dict[str, list[CaseRef]]:
    """{split stored in: the references of its cases}; every one of ``splits`` needs a case."""
    by_split: dict[str, list[CaseRef]] = {s: [] for s in splits}
    seen: set[str] = set()
    for ref, split in cases:
        if split not in by_split:
            raise CtanError(raw_dir, f"case {ref.case_id} has unknown split {split!r}")
        if ref.case_id in seen:
            raise CtanError(raw_dir, f"case id {ref.case_id} appears more than once")
        seen.add(ref.case_id)
        by_split[split].append(ref)
    empty = [s for s, r in by_split.items() if not r]
    if empty:
        raise CtanError(
            raw_dir,
            f"no cases in split(s) {', '.join(empty)}; every split needs at least one (with a computed "
            "split: more cases, or other fractions in the dataset's `split`; a folder of test cases only "
            "is an external test set: `external_of`)",
        )
    return by_split


def _read(reader: ModuleType, root: Path, ref: CaseRef) -> Case:
    """A reader's case; an I/O error it did not anticipate (a damaged file) still becomes one line."""
    try:
        return reader.read_case(root, ref)
    except OSError as err:
        where = err.filename or root  # the reader did not say which file: name the dataset
        raise CtanError(
            where, f"case {ref.case_id} could not be read: {' '.join(str(err).split())}"
        ) from None


def _up_to_date(out: Path, phash: str, source_sha256: str | None) -> bool:
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("params_hash") == phash and manifest.get("source_sha256") == source_sha256


def check_external_data(
    settings: DatasetSettings, training: DatasetSettings, reader: ModuleType, root: Path
) -> None:
    """Refuse an external test set whose structure channels or classes differ from its training set's,
    named from the training set's download, so that this fails before anything trains on it."""
    from ctan.datasets import find_root
    from ctan.manifest import compatibility_problems

    train_raw = Path(training.raw_dir)
    if not (train_raw / "source.json").is_file():
        raise CtanError(train_raw, f"not downloaded; run `ctan download {training.name}` first")
    train_root = train_raw / training.subdir if training.subdir else find_root(train_raw, training.format)
    describe = {
        "structure_names": lambda r: _names(reader, r, "structure_names", "STRUCTURES"),
        "class_names": lambda r: _names(reader, r, "class_names", "CLASS_NAMES"),
    }
    problems = compatibility_problems(
        {k: f(train_root) for k, f in describe.items()}, {k: f(root) for k, f in describe.items()}
    )
    if problems:
        raise CtanError(
            root,
            f"external test set {settings.name} does not match its training dataset {training.name}: "
            + "; ".join(problems),
        )


def preprocess_dataset(
    settings: DatasetSettings, force: bool = False, training: DatasetSettings | None = None
) -> Path:
    """Write ``settings.preprocessed_dir`` (see the module docstring); return that folder.

    An external test set (``settings.external_of``) needs its training dataset's settings as
    ``training``: its cases are checked against that set's, and all written to ``test.zarr``.
    """
    from ctan.datasets import dataset_cases, find_root, get_reader
    from ctan.store import create_split, write_case

    started = time.perf_counter()
    raw_dir = Path(settings.raw_dir)
    source_json = raw_dir / "source.json"
    if not source_json.is_file():
        raise CtanError(
            raw_dir, f"not downloaded (no source.json); run `ctan download {settings.name}` first"
        )
    try:
        source_sha256 = json.loads(source_json.read_text()).get("sha256")
    except (OSError, ValueError) as err:
        raise CtanError(source_json, f"unreadable: {err}") from None

    reader = get_reader(settings.format)
    spatial_dims = int(reader.SPATIAL_DIMS)
    spacing, shape = target_grid(settings, spatial_dims)
    unknown = [t for t in settings.tasks if t not in reader.TASKS]
    if unknown:
        offered = ", ".join(reader.TASKS)
        raise CtanError(
            None,
            f"datasets.{settings.name}.tasks: format {settings.format} offers no task {', '.join(unknown)} "
            f"({offered})",
        )
    root = raw_dir / settings.subdir if settings.subdir else find_root(raw_dir, settings.format)
    if settings.external_of:
        if training is None or training.name != settings.external_of:
            raise CtanError(None, f"{settings.name}: pass the settings of {settings.external_of}")
        check_external_data(settings, training, reader, root)
    splits = ("test",) if settings.external_of else SPLITS
    by_split = _refs_by_split(dataset_cases(settings, root), raw_dir, splits)

    out = Path(settings.preprocessed_dir)
    phash = params_hash(settings.data_section)
    if out.exists() and not force:
        if _up_to_date(out, phash, source_sha256):
            print(f"{out}: up to date with these parameters and source; nothing to do")
            return out
        raise CtanError(
            out, "exists (other parameters, other source or an incomplete run); pass --force to replace it"
        )

    names = _names(reader, root, "structure_names", "STRUCTURES")
    classes = _names(reader, root, "class_names", "CLASS_NAMES")
    intensity = (
        {"ct_window": [float(v) for v in settings.preprocess.get("ct_window") or DEFAULT_CT_WINDOW]}
        if spatial_dims == 3
        else {"scale": 255}
    )
    entries: list[dict[str, Any]] = []
    labels: dict[str, list[dict[str, int]]] = {}  # per split, each case's image-level labels
    channels: set[int] = set()
    source_spacings: list[list[float]] = []
    source_shapes: list[list[int]] = []
    total = sum(len(r) for r in by_split.values())
    with partial_folder(out) as work:
        data = work / "data"
        data.mkdir()
        with tqdm(total=total, desc=f"preprocess {settings.name}", unit="case", disable=None) as bar:
            for split, refs in by_split.items():
                store = create_split(
                    data / f"{split}.zarr",
                    {
                        "dataset": settings.name,
                        "format": settings.format,
                        "split": split,
                        "spatial_dims": spatial_dims,
                        "case_ids": [r.case_id for r in refs],
                        "structure_names": names,
                        "class_names": classes,
                        "tasks": list(settings.tasks),
                        "intensity": intensity,
                    },
                )
                for ref in refs:
                    case = _read(reader, root, ref)
                    case.split = split  # an external test set's cases are test cases, whatever their folder
                    channels.add(int(case.image.shape[0]))
                    source_spacings.append([float(s) for s in case.spacing])
                    source_shapes.append([int(n) for n in case.image.shape[1:]])
                    check_case(case, spatial_dims, root, spatial_dims == 3 or shape is None, names)
                    hashes = write_case(store, resample_case(case, spacing, shape), extra=source_attrs(case))
                    labels.setdefault(split, []).append(dict(case.labels))
                    entries.append(case_entry(ref.case_id, split, source_hashes(case, raw_dir), hashes))
                    bar.update()
        notes = check_splits_apart(entries, raw_dir)
        manifest = build_manifest(
            dataset=settings.name,
            format=settings.format,
            source_sha256=source_sha256,
            params_hash=phash,
            spatial_dims=spatial_dims,
            structure_names=names,
            class_names=classes,
            tasks=list(settings.tasks),
            cases=entries,
            image_channels=min(channels) if len(channels) == 1 else None,
            plan={"dataset": settings.external_of or settings.name, **settings.preprocess},
            external_of=settings.external_of,
        )
        write_manifest(data, manifest)
        write_plan(
            data,
            build_plan(
                dataset=settings.name,
                format=settings.format,
                spatial_dims=spatial_dims,
                source=fingerprint(source_spacings, source_shapes),
                spacing=spacing,
                shape=shape,
                intensity=intensity,
                patch_size=settings.training.get("patch_size") if spatial_dims == 3 else None,
                external_of=settings.external_of,
            ),
        )
        if out.exists():
            os.replace(out, work / "replaced")
        os.replace(data, out)
    counts = ", ".join(f"{len(r)} {s}" for s, r in by_split.items())
    print(f"{out}: {total} cases ({counts}) in {time.perf_counter() - started:.1f} s")
    for note in [*notes, *absent_classes(labels, [reader.TASKS[t] for t in settings.tasks])]:
        print(f"note: {note}")
    return out


def absent_classes(labels: dict[str, list[dict[str, int]]], tasks: Sequence[Any]) -> list[str]:
    """One line per split that lacks a class of an image-level task ({split: each case's labels}).

    A computed split is stratified where the counts allow and plain random where they do not, so a
    small or skewed dataset can leave a class out of a split: its recall then goes unmeasured there
    (and a test split without it scores balanced accuracy over the other classes only).
    """
    notes = []
    for task in tasks:
        if task.kind != "classification":
            continue
        names = task.class_names or tuple(str(i) for i in range(task.classes))
        for split, cases in labels.items():
            seen = {case[task.name] for case in cases if task.name in case}
            missing = [name for i, name in enumerate(names) if i not in seen]
            if cases and missing:
                notes.append(
                    f"the {split} split has no {task.name} {', '.join(missing)} "
                    f"({len(cases)} cases); a split.csv can place them"
                )
    return notes
