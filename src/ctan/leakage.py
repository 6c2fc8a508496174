"""One case in two splits: the test set leaking into training.

A patient copied into two split folders (``train-pats`` and ``test-pats``), a case listed twice under two
names, or an "external" test set that holds patients of the training set makes the test scores
optimistic without any error. Two cases are the same case here when their preprocessed images are
byte for byte the same (the manifest's SHA-256 of the ``image`` array): preprocessing is deterministic,
so the same source image gives the same array whatever the file or case is called, and two different
scans do not.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ctan.errors import CtanError


def _by_image(cases: Iterable[Mapping[str, Any]]) -> dict[str, list[tuple[str, str, str]]]:
    """{image SHA-256: [(case_id, split, its first source file), ...]} of manifest case entries."""
    out: dict[str, list[tuple[str, str, str]]] = {}
    for case in cases:
        image = (case.get("arrays") or {}).get("image")
        if image:
            first = next(iter(case.get("sources") or {}), "")
            out.setdefault(image, []).append((str(case["case_id"]), str(case["split"]), first))
    return out


def check_splits_apart(cases: Iterable[Mapping[str, Any]], raw_dir: Path) -> list[str]:
    """Refuse cases whose images are the same in different splits (naming both, and the file of the
    last); return a note for each repeat within one split (counted twice in training or testing)."""
    notes = []
    for image, holders in _by_image(cases).items():
        if len(holders) < 2:
            continue
        named = ", ".join(f"{case} ({split})" for case, split, _ in holders)
        if len({split for _, split, _ in holders}) > 1:
            raise CtanError(
                raw_dir / holders[-1][2],
                f"cases {named} hold the same image (SHA-256 {image[:12]}...): one case in two splits "
                "leaks the test set into training; remove all but one of them from the source, or put "
                "them in one split (a split.csv, where the format takes one)",
            )
        notes.append(f"cases {named} hold the same image: counted {len(holders)} times in their split")
    return notes


def check_external_apart(
    training: Mapping[str, Any], external: Mapping[str, Any], where: str | Path, names: tuple[str, str]
) -> None:
    """Refuse an external test set that holds cases of its training dataset (``names``: the external
    set's and the training dataset's), matched on identically preprocessed images."""
    ours = _by_image(training.get("cases", []))
    shared = [
        (case, ours[image][0]) for image, holders in _by_image(external.get("cases", [])).items()
        if image in ours for case, _, _ in holders
    ]  # fmt: skip
    if shared:
        pairs = ", ".join(f"{case} = {names[1]} {other} ({split})" for case, (other, split, _) in shared[:3])
        more = f" and {len(shared) - 3} more" if len(shared) > 3 else ""
        raise CtanError(
            where,
            f"external test set {names[0]} holds cases of its training dataset: {pairs}{more}; its scores "
            "would not be on unseen patients: remove them from its source",
        )
