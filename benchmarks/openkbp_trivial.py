"""The trivial OpenKBP baseline: one constant dose everywhere a dose is possible, scored like the challenge.

    python benchmarks/openkbp_trivial.py                       # the real sample, ../shared/data
    python benchmarks/openkbp_trivial.py --root DIR --out DIR  # an extracted provided-data folder

The constant ``c`` is the mean over training patients of each patient's mean dose inside its
possible-dose mask: ``c = (1/P) Σ_p (Σ dose_p·mask_p / Σ mask_p)``. Each test patient's prediction
is ``c · possible_dose_mask``, written with `write_dose_csv`, and the folder is scored with
``ctan openkbp-score`` (the command is printed and run). Any model worth training must beat this.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from ctan.metrics.dose import read_sparse_csv, write_dose_csv

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO.parent / "shared" / "data" / "openkbp-sample.tar.xz"


def mean_dose_in_mask(patients: list[Path]) -> float:
    """Mean over patients of each patient's mean dose (Gy) inside its possible-dose mask."""
    means = []
    for folder in patients:
        dose = read_sparse_csv(folder / "dose.csv")
        mask = read_sparse_csv(folder / "possible_dose_mask.csv").astype(bool)
        means.append(float(dose[mask].mean()))
    return float(np.mean(means))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="a provided-data folder (default: extract the sample)")
    parser.add_argument("--out", type=Path, help="where to write the predictions and score.json")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="openkbp_trivial_"))
    root = args.root
    if root is None:
        with tarfile.open(ARCHIVE, "r:xz") as archive:
            members = (m for m in archive if "/ct.csv" not in m.name)  # the CT is not needed
            archive.extractall(out / "data", members=members, filter="data")
        root = out / "data" / "open-kbp-sample" / "provided-data"
    train = sorted(p for p in (root / "train-pats").iterdir() if p.name.startswith("pt_"))
    test = sorted(p for p in (root / "test-pats").iterdir() if p.name.startswith("pt_"))
    c = mean_dose_in_mask(train)
    print(f"constant dose c = {c:.4f} Gy (mean over {len(train)} training patients of mean dose in the mask)")
    for folder in test:
        mask = read_sparse_csv(folder / "possible_dose_mask.csv")
        write_dose_csv(out / "predictions" / f"{folder.name}.csv", c * mask, axes="challenge")
    command = [
        "ctan",
        "openkbp-score",
        "--reference",
        str(root / "test-pats"),
        "--predictions",
        str(out / "predictions"),
        "--output",
        str(out / "score.json"),
    ]
    print("$ " + " ".join(command), flush=True)
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main())
