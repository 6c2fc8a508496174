"""The manifest of a preprocessed dataset: what was read (source file hashes) and what was written
(array content hashes), so a number in a results table can be traced back to exact bytes.

``<paths.preprocessed>/<dataset>/manifest.json``::

    {dataset, format, source_sha256, params_hash, spatial_dims, structure_names, class_names, tasks,
     image_channels, plan: {dataset, spacing, shape, ct_window}, external_of,
     cases: [{case_id, split, sources: {path relative to the raw folder: sha256},
              arrays: {name: content hash}}],
     data_hash}

``plan`` is the preprocessing the stores were made with and whose it is: the dataset's own, or for an
external test set (``external_of``: its training dataset) the training dataset's.

``data_hash`` is one SHA-256 over every case's array hashes; it changes exactly when some array's
decoded content changes, whatever the chunking or codec (see `ctan.store.array_hash`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ctan.errors import CtanError

MANIFEST = "manifest.json"


def case_entry(
    case_id: str, split: str, sources: Mapping[str, str], arrays: Mapping[str, str]
) -> dict[str, Any]:
    """One case's record: its source files and its arrays, each with a hash."""
    return {
        "case_id": case_id,
        "split": split,
        "sources": dict(sorted(sources.items())),
        "arrays": dict(sorted(arrays.items())),
    }


def data_hash(cases: Iterable[Mapping[str, Any]]) -> str:
    """SHA-256 over (split, case id, array name, array hash) of every case, independent of order."""
    digest = hashlib.sha256()
    for case in sorted(cases, key=lambda c: (c["split"], c["case_id"])):
        for name, value in sorted(case["arrays"].items()):
            digest.update(f"{case['split']}\0{case['case_id']}\0{name}\0{value}\n".encode())
    return digest.hexdigest()


def build_manifest(
    *,
    dataset: str,
    format: str,
    source_sha256: str | None,
    params_hash: str,
    spatial_dims: int,
    structure_names: list[str],
    class_names: list[str],
    tasks: list[str],
    cases: list[dict[str, Any]],
    plan: dict[str, Any] | None = None,
    external_of: str | None = None,
    image_channels: int | None = None,
) -> dict[str, Any]:
    return {
        "dataset": dataset,
        "format": format,
        "source_sha256": source_sha256,
        "params_hash": params_hash,
        "spatial_dims": spatial_dims,
        "structure_names": list(structure_names),
        "class_names": list(class_names),
        "tasks": list(tasks),
        **({"image_channels": image_channels} if image_channels is not None else {}),
        **({"plan": plan} if plan is not None else {}),
        "external_of": external_of,
        "cases": cases,
        "data_hash": data_hash(cases),
    }


# What an external test set must share with its training dataset, and how a difference is named.
COMPATIBLE = (
    ("format", "format"),
    ("spatial_dims", "spatial dimensions"),
    ("tasks", "tasks"),
    ("image_channels", "image channels"),
    ("structure_names", "structures"),
    ("class_names", "classes"),
)


def compatibility_problems(training: Mapping[str, Any], external: Mapping[str, Any]) -> list[str]:
    """How an external test set's data differ from its training dataset's (empty if they do not).

    Both arguments hold (some of) the `COMPATIBLE` keys, e.g. two manifests; a key either lacks is not
    compared. A list names what is missing from the external set and what it has in addition.
    """
    problems = []
    for key, what in COMPATIBLE:
        if key not in training or key not in external or training[key] == external[key]:
            continue
        ours, theirs = training[key], external[key]
        if isinstance(ours, list) and isinstance(theirs, list):
            missing = [x for x in ours if x not in theirs]
            extra = [x for x in theirs if x not in ours]
            parts = ([f"missing {', '.join(map(str, missing))}"] if missing else []) + (
                [f"not in the training set: {', '.join(map(str, extra))}"] if extra else []
            )
            detail = "; ".join(parts) or f"another order ({', '.join(map(str, theirs))})"
            problems.append(f"{what} differ ({detail})")
        else:
            problems.append(f"{what} differ ({theirs} here, {ours} in the training set)")
    return problems


def write_manifest(folder: Path, manifest: Mapping[str, Any]) -> Path:
    path = Path(folder) / MANIFEST
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return path


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a preprocessed folder; CtanError if missing or not a manifest."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise CtanError(path, f"missing; run `ctan preprocess {Path(folder).name}` first")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CtanError(path, f"unreadable manifest: {err}") from None
    if not isinstance(manifest, dict) or "data_hash" not in manifest:
        raise CtanError(path, "not a ctan manifest (no data_hash)")
    return manifest


def verify_stores(folder: Path) -> list[str]:
    """Re-hash every array in the stores against the manifest; the list of differences (empty if none)."""
    from ctan.store import SplitStore, array_hash

    manifest = read_manifest(folder)
    problems = []
    stores: dict[str, SplitStore] = {}
    for case in manifest["cases"]:
        split = case["split"]
        if split not in stores:
            stores[split] = SplitStore.open(Path(folder) / f"{split}.zarr")
        for name, expected in case["arrays"].items():
            actual = array_hash(stores[split].array(case["case_id"], name)[...])
            if actual != expected:
                problems.append(f"{split}/{case['case_id']}/{name}: {expected[:12]} -> {actual[:12]}")
    if data_hash(manifest["cases"]) != manifest["data_hash"]:
        problems.append("data_hash does not match the case hashes")
    return problems
