"""OpenKBP reader against legal variants of the challenge CSVs: a structure file with its header and
no rows (an empty contour) is no contour, as the challenge's DVH scorer counts it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ctan.datasets import openkbp
from ctan.datasets.base import CaseRef
from ctan.metrics import dose as dose_metrics

FILES = {
    "ct": ",data\n0,1000.0\n130,1064.0\n",
    "dose": ",data\n130,70.5\n131,60.0\n",
    "possible_dose_mask": ",data\n130,\n131,\n",
    "voxel_dimensions": "3.906\n3.906\n2.5\n",
    "PTV70": ",data\n130,\n",
    "Brainstem": ",data\n",  # exported, but contoured on no voxel
}


def test_a_header_only_structure_is_not_present(tmp_path: Path) -> None:
    """It was present with an empty channel: any voxel predicted there scored Dice 0 and an HD95 of the
    image diagonal, against a structure nobody contoured."""
    folder = tmp_path / "provided-data" / "train-pats" / "pt_1"
    folder.mkdir(parents=True)
    for name, text in FILES.items():
        (folder / f"{name}.csv").write_text(text)
    case = openkbp.read_case(tmp_path, CaseRef("pt_1", "train"))
    present = dict(zip(openkbp.STRUCTURES, case.structure_present, strict=True))
    assert present["PTV70"] and not present["Brainstem"]
    assert not any(present[name] for name in openkbp.STRUCTURES if name not in FILES)
    assert not case.dense["structures"][openkbp.STRUCTURES.index("Brainstem")].any()
    # The challenge's scorer agrees: no DVH metric for the empty structure.
    reference = dose_metrics.read_reference_patient(folder)
    metrics = dose_metrics.dvh_metrics(reference["dose"], reference["structures"], (3.906, 3.906, 2.5))
    assert {roi for roi, _ in metrics} == {"PTV70"}
    assert np.count_nonzero(case.dense["structures"]) == 1
