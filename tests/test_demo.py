"""The demo generator: real on-disk formats, deterministic bytes, counts per split, shared information."""

from __future__ import annotations

import hashlib
import importlib.util
import re
import tarfile
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml
from PIL import Image

from ctan.datasets import demo
from ctan.errors import CtanError

REPO = Path(__file__).resolve().parents[1]
COUNTS = {
    "openkbp": {"train": 2, "validation": 1, "test": 1},
    "nifti_cases": {"train": 2, "validation": 1, "test": 1},
    "ham10000": {"train": 10, "validation": 7, "test": 7},
    "stoic": {"train": 6, "validation": 3, "test": 3},
}
FORMATS = list(COUNTS)


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("demo")
    return {f: demo.generate(f, base / f, COUNTS[f], seed=5) for f in FORMATS}


@pytest.mark.parametrize("format", FORMATS)
def test_same_seed_gives_byte_identical_files(format, generated, tmp_path):
    again = demo.generate(format, tmp_path / "again", COUNTS[format], seed=5)
    assert _tree_digest(again) == _tree_digest(generated[format])
    other = demo.generate(format, tmp_path / "other", COUNTS[format], seed=6)
    assert _tree_digest(other) != _tree_digest(generated[format])


def test_a_case_does_not_depend_on_the_size_of_other_splits(generated, tmp_path):
    bigger = demo.generate("openkbp", tmp_path / "b", {"train": 2, "validation": 2, "test": 1}, seed=5)
    for patient in ("train-pats/pt_2", "validation-pats/pt_201"):
        a = _tree_digest(generated["openkbp"] / "provided-data" / patient)
        assert a == _tree_digest(bigger / "provided-data" / patient)


def test_openkbp_layout_numbering_and_sparse_format(generated):
    data = generated["openkbp"] / "provided-data"
    assert sorted(p.name for p in (data / "train-pats").iterdir()) == ["pt_1", "pt_2"]
    assert sorted(p.name for p in (data / "validation-pats").iterdir()) == ["pt_201"]
    assert sorted(p.name for p in (data / "test-pats").iterdir()) == ["pt_241"]
    patient = data / "train-pats" / "pt_1"
    assert (patient / "voxel_dimensions.csv").read_text().splitlines() == [
        "3.906000000000000139e+00",
        "3.906000000000000139e+00",
        "3.000000000000000000e+00",
    ]
    tables = {
        p.stem: pd.read_csv(p, index_col=0) for p in patient.glob("*.csv") if p.stem != "voxel_dimensions"
    }
    for name, table in tables.items():
        assert (patient / f"{name}.csv").read_text().startswith(",data\n"), name
        assert table.index.is_monotonic_increasing and table.index.is_unique, name
        assert table.index.min() >= 0 and table.index.max() < 128**3, name
    for name in set(tables) - {"ct", "dose"}:
        assert tables[name]["data"].isna().all(), f"{name}: masks leave the data column empty"
    ct, dose = tables["ct"]["data"], tables["dose"]["data"]
    assert ct.min() >= 1 and (ct == ct.round()).all() and 900 < ct.median() < 1100  # HU + 1000
    assert (tables["possible_dose_mask"].index == dose.index).all() and dose.min() > 0
    assert {"PTV70", "PTV56", "SpinalCord", "Brainstem"} <= set(tables)


def test_sparse_csv_writer_matches_pandas(tmp_path):
    index = np.array([3, 17, 2_000_000])
    values = np.array([913.0, 14.658, 0.001])
    for data in (values, None):
        demo._write_sparse_csv(tmp_path / "ours.csv", index, data)
        frame = pd.DataFrame({"data": np.full(3, np.nan) if data is None else data}, index=index)
        frame.to_csv(tmp_path / "pandas.csv")
        assert (tmp_path / "ours.csv").read_bytes() == (tmp_path / "pandas.csv").read_bytes()


@pytest.mark.realdata
def test_openkbp_files_look_like_the_real_challenge_files(shared_data, generated):
    """Compare with the first patient of the real sample (streamed: only the archive's start is read)."""
    real: dict[str, str] = {}
    with tarfile.open(shared_data / "openkbp-sample.tar.xz", "r:xz") as archive:
        patient = None
        for member in archive:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 2 or not parts[-2].startswith("pt_"):
                continue
            if patient not in (None, parts[-2]):
                break
            patient = parts[-2]
            real[Path(member.name).name] = archive.extractfile(member).read().decode()
    ours = {p.name: p.read_text() for p in (generated["openkbp"] / "provided-data/train-pats/pt_1").iterdir()}
    assert set(ours) <= set(real) | {"Esophagus.csv", "RightParotid.csv", "PTV63.csv", "LeftParotid.csv"}
    for name in ("ct.csv", "dose.csv", "possible_dose_mask.csv", "PTV70.csv", "voxel_dimensions.csv"):
        real_lines, our_lines = real[name].splitlines(), ours[name].splitlines()
        assert real_lines[0] == our_lines[0], name
        pattern = {
            "ct.csv": r"\d+,\d+\.0",
            "dose.csv": r"\d+,\d+\.\d{1,3}",
            "voxel_dimensions.csv": r"\d\.\d{18}e\+00",
        }
        line = re.compile(pattern.get(name, r"\d+,"))
        assert all(line.fullmatch(x) for x in real_lines[1:50]), f"real {name}: the test's pattern is wrong"
        assert all(line.fullmatch(x) for x in our_lines[1:]), name


@pytest.mark.parametrize("format", FORMATS)
def test_real_readers_read_the_demo_with_its_counts_and_labels(format, generated):
    if importlib.util.find_spec(f"ctan.datasets.{format}") is None:
        pytest.skip(f"reader ctan.datasets.{format} does not exist yet")
    from ctan.datasets import find_root, get_reader

    reader = get_reader(format)
    root = find_root(generated[format], format)
    assert root == generated[format] and (root / reader.MARKER).exists()
    refs = reader.list_cases(root, {"validation": 0.5, "test": 0.25, "seed": 1})  # the split file wins
    assert Counter(r.split for r in refs) == Counter(COUNTS[format])
    cases = [reader.read_case(root, ref) for ref in refs]
    for case in cases:
        assert case.image.ndim == reader.SPATIAL_DIMS + 1
        for task in reader.TASKS.values():
            if task.dense:
                assert case.dense[task.target].shape[1:] == case.image.shape[1:], task.name
                assert case.dense[task.target].max() > 0, task.name
            else:
                assert task.target in case.labels, task.name
    labels = {name: Counter(c.labels.get(name) for c in cases) for name in ("diagnosis", "covid", "severity")}
    if format == "ham10000":
        train = {c.labels["diagnosis"] for c in cases if c.split == "train"}
        assert train == set(range(7)), "every diagnosis in the training split"
        metadata = pd.read_csv(root / "HAM10000_metadata.csv")
        assert metadata["lesion_id"].nunique() < len(metadata), "some lesions have two images"
        assert metadata.groupby("lesion_id")["dx"].nunique().max() == 1
    if format == "stoic":
        assert set(labels["covid"]) == {0, 1} and set(labels["severity"]) == {0, 1}
        assert all(c.labels["covid"] == 1 for c in cases if c.labels["severity"] == 1), (
            "severe only when COVID"
        )
        for split in ("validation", "test"):
            assert {c.labels["severity"] for c in cases if c.split == split} == {0, 1}, split
    if format == "openkbp":
        assert not all(all(c.structure_present) for c in cases), "some structure is absent"
        assert all(c.dense["possible_dose_mask"].sum() > 0 for c in cases)


def _read_sparse(path: Path) -> np.ndarray:
    table = pd.read_csv(path, index_col=0)
    out = np.zeros(128**3, np.float32)
    out[table.index.values] = table["data"].fillna(1).values
    return out.reshape(128, 128, 128)


def test_dose_follows_the_targets_and_targets_show_on_ct(generated):
    patient = generated["openkbp"] / "provided-data/train-pats/pt_1"
    ct, dose = _read_sparse(patient / "ct.csv") - 1000, _read_sparse(patient / "dose.csv")
    ptv70, possible = (
        _read_sparse(patient / "PTV70.csv") > 0,
        _read_sparse(patient / "possible_dose_mask.csv") > 0,
    )
    assert np.median(dose[ptv70]) == pytest.approx(70, abs=2)
    assert dose[possible & ~ptv70].mean() < 40 and dose[~possible].max() == 0
    ptv56 = _read_sparse(patient / "PTV56.csv") > 0
    assert 50 < np.median(dose[ptv56]) < 62
    assert np.median(ct[ptv70]) - np.median(ct[possible & ~ptv70 & ~ptv56]) > 25  # a denser mass

    case = generated["nifti_cases"] / "cases/case_001"
    dose = np.asarray(nib.load(case / "dose.nii.gz").dataobj)
    ptv = np.asarray(nib.load(case / "masks/PTV.nii.gz").dataobj) > 0
    assert np.median(dose[ptv]) == pytest.approx(78, abs=2) and dose[~ptv].mean() < 30


def test_nifti_cases_look_scanner_made(generated):
    root = generated["nifti_cases"]
    assert pd.read_csv(root / "split.csv").columns.tolist() == ["case", "split"]
    ct = nib.load(root / "cases/case_001/ct.nii.gz")
    assert ct.shape == demo.NIFTI_SHAPE and ct.get_data_dtype() == np.int16
    assert nib.aff2axcodes(ct.affine) == ("L", "P", "S")  # DICOM order, not canonical RAS
    assert np.all(np.abs(ct.affine[:3, 3]) > 1) and 2.5 < abs(ct.affine[0, 0]) < 3.2
    for path in (root / "cases/case_001").rglob("*.nii.gz"):
        assert np.allclose(nib.load(path).affine, ct.affine), path.name
        assert path.read_bytes()[4:8] == b"\0\0\0\0", f"{path.name}: gzip mtime must be 0"


def test_diagnosis_shapes_the_lesion(generated):
    root = generated["ham10000"]
    metadata = pd.read_csv(root / "HAM10000_metadata.csv")
    assert metadata.columns.tolist() == [
        "lesion_id",
        "image_id",
        "dx",
        "dx_type",
        "age",
        "sex",
        "localization",
    ]
    assert set(metadata["dx"]) == set(demo.HAM_CLASSES)
    assert (root / "HAM10000_metadata.csv").read_bytes().count(b"\r\n") == len(metadata) + 1
    area: dict[str, list[float]] = {}
    for row in metadata.itertuples():
        image = Image.open(root / "HAM10000_images" / f"{row.image_id}.jpg")
        mask = Image.open(
            root / "HAM10000_segmentations_lesion_tschandl" / f"{row.image_id}_segmentation.png"
        )
        assert image.size == (64, 48) and image.mode == "RGB" and mask.size == (192, 144) and mask.mode == "L"
        values = np.asarray(mask)
        assert set(np.unique(values)) == {0, 255}
        area.setdefault(row.dx, []).append((values > 0).mean())
    mean = {dx: np.mean(a) for dx, a in area.items()}
    assert mean["mel"] > mean["nv"] > mean["df"] and mean["bkl"] > mean["vasc"]


def test_ground_glass_extent_decides_covid_and_severity(generated):
    root = generated["stoic"]
    reference = pd.read_csv(root / "metadata/reference.csv", dtype=str)
    assert reference.columns.tolist() == ["PatientID", "probCOVID", "probSevere", "age", "sex"]
    assert reference["age"].str.fullmatch(r"0\d5Y").all() and set(reference["sex"]) <= {"M", "F"}
    assert sorted(pd.read_csv(root / "split.csv", dtype=str)["PatientID"]) == sorted(reference["PatientID"])
    extent: dict[tuple[str, str], list[float]] = {}
    for row in reference.itertuples():
        image = sitk.ReadImage(str(root / "data/mha" / f"{row.PatientID}.mha"))
        assert image.GetPixelID() == sitk.sitkInt16 and image.GetSize() == (48, 48, 32)
        assert image.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
        hu = sitk.GetArrayFromImage(image)
        lung = ((hu > -950) & (hu < -600)).sum()  # not the air around the body
        opacity = ((hu > -450) & (hu < -150)).sum()
        extent.setdefault((row.probCOVID, row.probSevere), []).append(opacity / (lung + opacity))
    assert set(extent) == {("0", "0"), ("1", "0"), ("1", "1")}
    assert max(extent[("0", "0")]) < 0.005 < 0.02 < min(extent[("1", "0")])
    # Severe cases: clearly more ground glass (and consolidation, not counted here) than other COVID-19.
    assert np.mean(extent[("1", "1")]) > 1.5 * np.mean(extent[("1", "0")])


def test_bad_arguments_are_refused(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(CtanError, match="empty folder"):
        demo.generate("stoic", tmp_path / "full", COUNTS["stoic"], 0)
    with pytest.raises(CtanError, match="validation"):
        demo.generate("stoic", tmp_path / "a", {"train": 2, "validation": 0, "test": 1}, 0)
    with pytest.raises(CtanError, match="train"):
        demo.generate("stoic", tmp_path / "e", {"seed": 1}, 0)
    with pytest.raises(CtanError, match="no demo generator"):
        demo.generate("dicom", tmp_path / "b", COUNTS["stoic"], 0)
    with pytest.raises(CtanError, match="200 patients"):
        demo.generate("openkbp", tmp_path / "c", {"train": 201, "validation": 1, "test": 1}, 0)
    # extra keys of a params `demo:` section are ignored
    demo.generate("stoic", tmp_path / "d", {**COUNTS["stoic"], "seed": 3}, 3)


@pytest.mark.slow
def test_the_default_demo_datasets_generate(tmp_path):
    """Every demo dataset of the default run generates (about 5 s on 2 cores; no timed assertion: a
    loaded CI machine must not fail a test for being slow)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for name in params["run"]["datasets"]:
        entry = params["datasets"][name]
        if entry["source"] == "demo":
            root = demo.generate(entry["format"], tmp_path / name, entry["demo"], entry["demo"]["seed"])
            assert any(root.iterdir()), name


def test_openkbp_phantom_stays_inside_its_computed_box():
    for seed in range(10):
        hu, _, _, _ = demo._openkbp_patient(np.random.default_rng(seed))
        body = hu > -1000
        for axis in range(3):
            profile = body.any(axis=tuple(a for a in range(3) if a != axis))
            assert not profile[0] and not profile[-1], (seed, axis)
