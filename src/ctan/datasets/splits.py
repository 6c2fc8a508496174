"""Splits for datasets that publish none: by group, deterministic, stratified where possible.

A group is the unit that must never straddle two splits (a HAM10000 lesion, a STOIC patient, a
bring-your-own case). The split depends only on the set of groups, their strata and the split
parameters ``{validation, test, seed}`` from params.yaml, never on file order, so it is reproducible.
A user-provided ``split.csv`` replaces the computed split where a study needs a fixed one.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ctan.datasets.base import SPLITS, read_table
from ctan.errors import CtanError

DEFAULT_SPLIT: dict[str, Any] = {"validation": 0.15, "test": 0.2, "seed": 0}


def split_settings(split_params: Mapping[str, Any] | None) -> tuple[float, float, int]:
    """(validation fraction, test fraction, seed) with defaults filled in and checked."""
    params = {**DEFAULT_SPLIT, **(split_params or {})}
    validation, test, seed = float(params["validation"]), float(params["test"]), int(params["seed"])
    if not (0 <= validation < 1 and 0 <= test < 1 and validation + test < 1):
        raise CtanError(
            None, f"split fractions validation={validation}, test={test} must be >= 0 and sum to < 1"
        )
    return validation, test, seed


def _take(
    groups: list[Hashable], strata: list[Hashable] | None, n: int, seed: int
) -> tuple[list[Hashable], list[Hashable]]:
    """Split ``n`` groups off ``groups``: stratified where sklearn can, plain random otherwise."""
    # Imported here: sklearn costs seconds at start-up, and training jobs only read stored splits.
    from sklearn.model_selection import train_test_split

    if n == 0:
        return groups, []
    if strata is not None:
        try:
            return train_test_split(groups, test_size=n, random_state=seed, stratify=strata)
        except ValueError:  # a stratum too small for this split size: fall back to a plain shuffle
            pass
    return train_test_split(groups, test_size=n, random_state=seed)


def _count(fraction: float, n: int) -> int:
    """Groups for a split: the rounded fraction, at least one where it asks for any and 3+ groups exist."""
    count = round(fraction * n)
    return 1 if fraction > 0 and count == 0 and n >= 3 else count


def assign_splits(
    strata_by_group: Mapping[Hashable, Hashable | None], split_params: Mapping[str, Any] | None = None
) -> dict[Hashable, str]:
    """{group: split} for every group; stratified by the given stratum where the counts allow.

    Groups are sorted first, so the result does not depend on the order the dataset lists them in.
    """
    validation, test, seed = split_settings(split_params)
    groups = sorted(strata_by_group, key=str)
    n = len(groups)
    n_test, n_val = _count(test, n), _count(validation, n)
    if n - n_test - n_val < 1:
        raise CtanError(None, f"{n} groups are too few for validation={validation}, test={test}")
    stratified = all(strata_by_group[g] is not None for g in groups)
    strata = [strata_by_group[g] for g in groups] if stratified else None
    rest, test_groups = _take(groups, strata, n_test, seed)
    rest_strata = [strata_by_group[g] for g in rest] if stratified else None
    train_groups, val_groups = _take(rest, rest_strata, n_val, seed + 1)
    out = {g: "train" for g in train_groups}
    out.update({g: "validation" for g in val_groups})
    out.update({g: "test" for g in test_groups})
    return out


def read_split_file(path: Path, id_column: str, known_ids: Sequence[str]) -> dict[str, str]:
    """{id: split} from a user's ``split.csv``; every known id must be listed exactly once."""
    columns = tuple(sorted({id_column, "split"}))
    table = read_table(path, columns, f"; expected {id_column},split", dtype=str, keep_default_na=False)
    ids = table[id_column].str.strip()
    splits = table["split"].str.strip()
    bad = sorted(set(splits) - set(SPLITS))
    if bad:
        raise CtanError(path, f"unknown split value(s) {', '.join(map(repr, bad))}; use {', '.join(SPLITS)}")
    duplicated = sorted(set(ids[ids.duplicated()]))
    if duplicated:
        raise CtanError(path, f"{id_column} listed more than once: {', '.join(duplicated[:5])}")
    mapping = dict(zip(ids, splits, strict=True))
    unlisted = [i for i in known_ids if i not in mapping]
    if unlisted:
        raise CtanError(path, f"{len(unlisted)} case(s) have no split, e.g. {', '.join(unlisted[:5])}")
    unknown = sorted(set(mapping) - set(known_ids))
    if unknown:
        raise CtanError(
            path, f"{len(unknown)} listed {id_column}(s) are not in the dataset, e.g. {unknown[0]}"
        )
    return mapping
