"""OpenKBP reader: real patients read voxel-exactly, axes and spacing mapped right, bad files refused.

Also covers the format registry (`get_reader`, `find_root`).
"""

from __future__ import annotations

import dataclasses
import gzip
import tarfile
from pathlib import Path

import numpy as np
import pytest

from ctan.datasets import FORMATS, find_root, get_reader, openkbp
from ctan.datasets.base import CaseRef
from ctan.errors import CtanError

PATIENTS = ("validation-pats/pt_209", "validation-pats/pt_202")  # first in the archive: little to decompress
N = 128


@pytest.fixture(scope="session")
def openkbp_root(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real patients, extracted from the sample archive once (the archive is read only up to them)."""
    out = tmp_path_factory.mktemp("openkbp")
    wanted = tuple(f"open-kbp-sample/provided-data/{p}/" for p in PATIENTS)
    started: set[str] = set()
    with tarfile.open(shared_data / "openkbp-sample.tar.xz", "r|xz") as tar:
        for member in tar:
            hit = next((w for w in wanted if member.name.startswith(w)), None)
            if hit and member.isfile():
                tar.extract(member, out, filter="data")
                started.add(hit)
            elif started == set(wanted):
                break
    return out / "open-kbp-sample"


def csv_rows(path: Path, n: int | None = None) -> list[tuple[int, str]]:
    """(flat index, raw value text) of a challenge CSV, parsed by hand, not by the reader's code."""
    lines = path.read_text().splitlines()[1:]
    rows = [(int(line.split(",")[0]), line.split(",")[1]) for line in lines]
    return rows if n is None else rows[:n]


def ours(flat: int) -> tuple[int, int, int]:
    """Where a challenge flat index lands in our (z, y, x) array: raw[i, j, k] -> ours[127-k, i, j]."""
    i, rest = divmod(flat, N * N)
    j, k = divmod(rest, N)
    return N - 1 - k, i, j


def write_patient(folder: Path, **files: str | None) -> Path:
    """A tiny synthetic patient; ``name=None`` leaves a file out, ``name="..."`` replaces its text."""
    content = {
        "ct": ",data\n0,1000.0\n130,1064.0\n",
        "dose": ",data\n130,70.5\n131,0.0\n",
        "possible_dose_mask": ",data\n130,\n131,\n",
        "voxel_dimensions": "3.906\n3.906\n2.5\n",
        "PTV70": ",data\n130,\n",
    }
    content.update(files)
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in content.items():
        if text is not None:
            (folder / f"{name}.csv").write_text(text)
    return folder


@pytest.fixture
def synthetic_root(tmp_path: Path) -> Path:
    write_patient(tmp_path / "provided-data" / "train-pats" / "pt_1")
    return tmp_path


def read_synthetic(root: Path) -> None:
    openkbp.read_case(root, CaseRef("pt_1", "train"))


# --- real data ---------------------------------------------------------------------------------------


@pytest.mark.realdata
def test_real_patient_values_land_on_the_right_voxels(openkbp_root: Path) -> None:
    folder = openkbp_root / "provided-data" / "validation-pats" / "pt_209"
    case = openkbp.read_case(openkbp_root, CaseRef("pt_209", "validation"))

    assert case.image.shape == (1, N, N, N) and case.image.dtype == np.float32
    for flat, value in csv_rows(folder / "ct.csv", 50) + csv_rows(folder / "ct.csv")[-50:]:
        assert case.image[(0, *ours(flat))] == float(value) - 1024
    ct_rows = csv_rows(folder / "ct.csv")
    assert (case.image != -1024).sum() == len(ct_rows)  # every unlisted voxel is air, −1024 HU

    dose = case.dense["dose"]
    assert dose.shape == (1, N, N, N) and dose.dtype == np.float32
    for flat, value in csv_rows(folder / "dose.csv", 50):
        assert dose[(0, *ours(flat))] == np.float32(value)
    assert np.isclose(dose.sum(), sum(float(v) for _, v in csv_rows(folder / "dose.csv")), rtol=1e-5)

    mask_rows = csv_rows(folder / "possible_dose_mask.csv")
    possible = case.dense["possible_dose_mask"]
    assert possible.dtype == np.uint8 and possible.sum() == len(mask_rows)
    assert all(possible[(0, *ours(flat))] == 1 for flat, _ in mask_rows[:50])


@pytest.mark.realdata
def test_real_patient_structures_spacing_and_absent_channels(openkbp_root: Path) -> None:
    folder = openkbp_root / "provided-data" / "validation-pats" / "pt_209"
    case = openkbp.read_case(openkbp_root, CaseRef("pt_209", "validation"))
    structures = case.dense["structures"]
    assert structures.shape == (10, N, N, N) and structures.dtype == np.uint8
    for c, name in enumerate(openkbp.STRUCTURES):
        path = folder / f"{name}.csv"
        assert case.structure_present[c] == path.is_file()
        if path.is_file():
            rows = csv_rows(path)
            assert structures[c].sum() == len(rows)
            assert all(structures[(c, *ours(flat))] == 1 for flat, _ in rows[:20])
        else:
            assert structures[c].max() == 0
    assert case.structure_present[openkbp.STRUCTURES.index("Esophagus")] is False

    pixel, pixel2, slice_ = (float(v) for v in (folder / "voxel_dimensions.csv").read_text().split())
    assert case.spacing == (slice_, pixel, pixel2)
    assert case.origin == (0.0, 0.0, 0.0)
    assert case.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert set(case.sources) == set(folder.glob("*.csv"))


@pytest.mark.realdata
def test_real_patient_anatomy_is_lps(openkbp_root: Path) -> None:
    """World (z, y, x) from our geometry points superior, posterior, left, as the direction claims."""
    case = openkbp.read_case(openkbp_root, CaseRef("pt_209", "validation"))
    direction = np.asarray(case.direction).reshape(3, 3)

    def world(name: str) -> np.ndarray:
        index = np.argwhere(case.dense["structures"][openkbp.STRUCTURES.index(name)]).mean(axis=0)
        return np.asarray(case.origin) + direction @ (np.asarray(case.spacing) * index)

    z, y, x = 0, 1, 2
    assert world("Brainstem")[z] > world("SpinalCord")[z]  # brainstem above the cord
    assert world("Mandible")[y] < world("SpinalCord")[y]  # jaw in front of the cord (LPS: +y posterior)
    assert world("LeftParotid")[x] > world("RightParotid")[x]  # LPS: +x toward the patient's left


@pytest.mark.realdata
def test_real_list_cases_keeps_the_official_split(openkbp_root: Path) -> None:
    refs = openkbp.list_cases(openkbp_root)
    assert refs == [CaseRef("pt_202", "validation"), CaseRef("pt_209", "validation")]
    assert find_root(openkbp_root.parent, "openkbp") == openkbp_root


# --- axis mapping --------------------------------------------------------------------------------------


def test_challenge_grid_round_trip_matches_index_remapping() -> None:
    rng = np.random.default_rng(0)
    raw = rng.random((N, N, N), dtype=np.float32)
    ours_ = openkbp.from_challenge_grid(raw)
    assert np.array_equal(openkbp.to_challenge_grid(ours_), raw)
    flat = rng.integers(0, N**3, 100)
    assert np.array_equal(ours_.ravel()[openkbp.our_flat_index(flat)], raw.ravel()[flat])
    assert all(ours_[ours(f)] == raw.ravel()[f] for f in flat[:10])


def test_synthetic_patient_and_official_split_folders(tmp_path: Path) -> None:
    data = tmp_path / "provided-data"
    write_patient(data / "train-pats" / "pt_10")
    write_patient(data / "train-pats" / "pt_2")
    write_patient(data / "valid-pats" / "pt_201")
    write_patient(data / "test-pats" / "pt_241")
    refs = openkbp.list_cases(tmp_path, {"validation": 0.5, "test": 0.5, "seed": 3})
    assert refs == [
        CaseRef("pt_2", "train"),
        CaseRef("pt_10", "train"),
        CaseRef("pt_201", "validation"),
        CaseRef("pt_241", "test"),
    ]
    case = openkbp.read_case(tmp_path, refs[2])
    assert case.image[(0, *ours(130))] == 40.0 and case.image[(0, *ours(0))] == -24.0
    assert case.dense["dose"][(0, *ours(130))] == np.float32(70.5)
    assert case.structure_present == (False,) * 9 + (True,)
    assert case.dense["structures"][9].sum() == 1


# --- bad input ---------------------------------------------------------------------------------------


def assert_names(err: pytest.ExceptionInfo[CtanError], filename: str) -> None:
    assert err.value.path is not None and err.value.path.endswith(filename), str(err.value)
    assert filename in str(err.value)


def test_unknown_structure_csv_is_refused(synthetic_root: Path) -> None:
    write_patient(synthetic_root / "provided-data" / "train-pats" / "pt_1", Parotid_L=",data\n1,\n")
    with pytest.raises(CtanError, match="unknown structure") as err:
        read_synthetic(synthetic_root)
    assert_names(err, "Parotid_L.csv")


def test_garbled_csv_is_refused(synthetic_root: Path) -> None:
    (synthetic_root / "provided-data" / "train-pats" / "pt_1" / "ct.csv").write_bytes(
        b"\x89PNG\x00\xff\xfe garbage"
    )
    with pytest.raises(CtanError) as err:
        read_synthetic(synthetic_root)
    assert_names(err, "ct.csv")


def test_csv_with_extra_fields_is_refused(synthetic_root: Path) -> None:
    write_patient(synthetic_root / "provided-data" / "train-pats" / "pt_1", dose=",data\n1,2.0\n3,4.0,5\n")
    with pytest.raises(CtanError) as err:
        read_synthetic(synthetic_root)
    assert_names(err, "dose.csv")


def test_truncated_csv_is_refused(synthetic_root: Path) -> None:
    write_patient(synthetic_root / "provided-data" / "train-pats" / "pt_1", ct=",data\n0,1000.0\n130,")
    with pytest.raises(CtanError, match="cut short") as err:
        read_synthetic(synthetic_root)
    assert_names(err, "ct.csv")


@pytest.mark.parametrize("rows", ["130,\n131,\n130,\n", "130,\n130,\n", "131,\n130,\n131,\n"])
def test_voxel_listed_twice_is_refused(synthetic_root: Path, rows: str) -> None:
    """Sorted or not (the release's files are ascending; others need not be)."""
    write_patient(synthetic_root / "provided-data" / "train-pats" / "pt_1", PTV70=",data\n" + rows)
    with pytest.raises(CtanError, match="listed twice") as err:
        read_synthetic(synthetic_root)
    assert_names(err, "PTV70.csv")


@pytest.mark.parametrize(
    ("dose", "message"),
    [
        (",data\n130,70.5\n131", "cut short"),  # the file ends inside a row
        (",data\n130,70.5\n131,7", "cut short"),  # ... even where what is left parses ("131,7" of "131,70.2")
        (",data\n130,70.5\n131\n132,1.0\n", "not a readable OpenKBP CSV"),  # a row short of a field
    ],
)
def test_row_cut_short_is_refused(synthetic_root: Path, dose: str, message: str) -> None:
    write_patient(synthetic_root / "provided-data" / "train-pats" / "pt_1", dose=dose)
    with pytest.raises(CtanError, match=message) as err:
        read_synthetic(synthetic_root)
    assert_names(err, "dose.csv")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("ct", ",data\n0,-24.0\n130,40.0\n", "shifted by \\+1024"),  # a CT already in HU
        ("ct", ",data\n0,1e300\n", "outside 0-65535"),
        ("dose", ",data\n130,7050.0\n", "cGy"),
        ("dose", ",data\n", "lists no voxels"),  # a header-only dose would train on zero dose
        ("possible_dose_mask", ",data\n", "lists no voxels"),
        ("voxel_dimensions", "0.003906\n0.003906\n0.0025\n", "metres"),
        ("voxel_dimensions", "1e300\n1e300\n2.5\n", "metres"),
    ],
)
def test_implausible_values_are_refused(synthetic_root: Path, name: str, text: str, message: str) -> None:
    write_patient(synthetic_root / "provided-data" / "train-pats" / "pt_1", **{name: text})
    with pytest.raises(CtanError, match=message) as err:
        read_synthetic(synthetic_root)
    assert_names(err, f"{name}.csv")


def test_compressed_csv_is_named_as_such(synthetic_root: Path) -> None:
    folder = synthetic_root / "provided-data" / "train-pats" / "pt_1"
    (folder / "ct.csv").write_bytes(gzip.compress((folder / "ct.csv").read_bytes()))
    with pytest.raises(CtanError, match="gzip-compressed") as err:
        read_synthetic(synthetic_root)
    assert_names(err, "ct.csv")


def test_binary_bytes_stay_out_of_the_message(synthetic_root: Path) -> None:
    (synthetic_root / "provided-data" / "train-pats" / "pt_1" / "ct.csv").write_bytes(
        b"\x00\x07\x1b[2J" + bytes(range(256)) * 4 + b"\n"
    )
    with pytest.raises(CtanError) as err:
        read_synthetic(synthetic_root)
    assert str(err.value).isprintable()
    assert len(str(err.value)) < 400


def test_voxel_dimensions_with_a_byte_order_mark_read(synthetic_root: Path) -> None:
    folder = synthetic_root / "provided-data" / "train-pats" / "pt_1"
    (folder / "voxel_dimensions.csv").write_bytes(b"\xef\xbb\xbf3.906\n3.906\n2.5\n")
    assert openkbp.read_case(synthetic_root, CaseRef("pt_1", "train")).spacing == (2.5, 3.906, 3.906)


@pytest.mark.parametrize(("wrong", "right"), [("PTV70.CSV", "PTV70.csv"), ("ptv70.csv", "PTV70.csv")])
def test_file_name_in_another_case_is_refused_with_the_fix(
    synthetic_root: Path, wrong: str, right: str
) -> None:
    """Not a structure silently marked absent: the release's names are case-sensitive."""
    folder = synthetic_root / "provided-data" / "train-pats" / "pt_1"
    (folder / "PTV70.csv").rename(folder / wrong)
    for read in (read_synthetic, openkbp.list_cases):
        with pytest.raises(CtanError, match=f"rename it to {right}") as err:
            read(synthetic_root)
        assert_names(err, wrong)


def test_required_file_in_another_case_is_refused_with_the_fix(synthetic_root: Path) -> None:
    folder = synthetic_root / "provided-data" / "train-pats" / "pt_1"
    (folder / "ct.csv").rename(folder / "CT.csv")
    with pytest.raises(CtanError, match="rename it to ct.csv"):
        openkbp.list_cases(synthetic_root)


@pytest.mark.parametrize("name", ["pt_1 copy", "patient2"])
def test_folder_that_is_not_a_patient_name_is_refused(synthetic_root: Path, name: str) -> None:
    """A Finder copy of a patient would otherwise train on that patient twice."""
    write_patient(synthetic_root / "provided-data" / "train-pats" / name)
    with pytest.raises(CtanError, match="pt_<number>") as err:
        openkbp.list_cases(synthetic_root)
    assert_names(err, name)


def test_unsorted_rows_and_header_only_files_read(synthetic_root: Path) -> None:
    """Row order does not matter, and a structure CSV with no rows is an empty mask."""
    write_patient(
        synthetic_root / "provided-data" / "train-pats" / "pt_1",
        dose=",data\n131,2.0\n130,70.5\n",
        PTV70=",data\n",
    )
    case = openkbp.read_case(synthetic_root, CaseRef("pt_1", "train"))
    flat = case.dense["dose"].reshape(-1)
    assert sorted(flat[flat > 0].tolist()) == [2.0, 70.5]
    assert not case.dense["structures"].any()


def test_wrong_header_is_refused(synthetic_root: Path) -> None:
    write_patient(synthetic_root / "provided-data" / "train-pats" / "pt_1", dose="index,value\n1,2.0\n")
    with pytest.raises(CtanError, match="header") as err:
        read_synthetic(synthetic_root)
    assert_names(err, "dose.csv")


def test_non_integer_index_is_refused(synthetic_root: Path) -> None:
    write_patient(synthetic_root / "provided-data" / "train-pats" / "pt_1", PTV70=",data\n12.5,\nabc,\n")
    with pytest.raises(CtanError, match="integer") as err:
        read_synthetic(synthetic_root)
    assert_names(err, "PTV70.csv")


@pytest.mark.parametrize("index", [N**3, -1])
def test_index_outside_grid_is_refused(synthetic_root: Path, index: int) -> None:
    write_patient(
        synthetic_root / "provided-data" / "train-pats" / "pt_1", possible_dose_mask=f",data\n{index},\n"
    )
    with pytest.raises(CtanError, match="outside the 128x128x128 grid") as err:
        read_synthetic(synthetic_root)
    assert_names(err, "possible_dose_mask.csv")


@pytest.mark.parametrize("value", ["nan", "-0.5"])
def test_nan_or_negative_dose_is_refused(synthetic_root: Path, value: str) -> None:
    write_patient(synthetic_root / "provided-data" / "train-pats" / "pt_1", dose=f",data\n1,2.0\n2,{value}\n")
    with pytest.raises(CtanError) as err:
        read_synthetic(synthetic_root)
    assert_names(err, "dose.csv")


def test_mask_csv_with_values_is_refused(synthetic_root: Path) -> None:
    write_patient(synthetic_root / "provided-data" / "train-pats" / "pt_1", PTV70=",data\n1,3.0\n")
    with pytest.raises(CtanError, match="empty") as err:
        read_synthetic(synthetic_root)
    assert_names(err, "PTV70.csv")


@pytest.mark.parametrize("name", openkbp.REQUIRED)
def test_missing_required_file_is_refused(synthetic_root: Path, name: str) -> None:
    (synthetic_root / "provided-data" / "train-pats" / "pt_1" / f"{name}.csv").unlink()
    with pytest.raises(CtanError, match="missing") as err:
        read_synthetic(synthetic_root)
    assert_names(err, f"{name}.csv")
    with pytest.raises(CtanError, match="missing") as err:
        openkbp.list_cases(synthetic_root)
    assert_names(err, f"{name}.csv")


@pytest.mark.parametrize("dims", ["0\n3.9\n2.5\n", "3.9\n3.9\n-2.5\n", "3.9\n3.9\n", "3.9\nabc\n2.5\n"])
def test_bad_voxel_dimensions_are_refused(synthetic_root: Path, dims: str) -> None:
    write_patient(synthetic_root / "provided-data" / "train-pats" / "pt_1", voxel_dimensions=dims)
    with pytest.raises(CtanError) as err:
        read_synthetic(synthetic_root)
    assert_names(err, "voxel_dimensions.csv")


def test_empty_dataset_is_refused(tmp_path: Path) -> None:
    (tmp_path / "provided-data" / "train-pats").mkdir(parents=True)
    with pytest.raises(CtanError, match="no patient folders"):
        openkbp.list_cases(tmp_path)
    (tmp_path / "provided-data" / "train-pats").rmdir()
    with pytest.raises(CtanError, match="train-pats"):
        openkbp.list_cases(tmp_path)


# --- registry ----------------------------------------------------------------------------------------


def test_every_reader_offers_the_contract() -> None:
    tasks = {
        "openkbp": {"dose", "structures"},
        "nifti_cases": {"dose", "structures"},
        "ham10000": {"lesion", "diagnosis"},
        "stoic": {"covid", "severity"},
    }
    for name in FORMATS:
        reader = get_reader(name)
        assert reader.FORMAT == name
        assert reader.SPATIAL_DIMS in (2, 3)
        assert set(reader.TASKS) == tasks[name]
        assert all(task.name == key for key, task in reader.TASKS.items())
        for function in ("list_cases", "read_case", "structure_names", "class_names"):
            assert callable(getattr(reader, function))
    with pytest.raises(CtanError, match="unknown dataset format"):
        get_reader("dicom")


def test_shared_tasks_differ_only_in_their_names() -> None:
    """Contouring is one task in both radiotherapy formats; labels are stored under their task's name."""
    structures = get_reader("openkbp").TASKS["structures"]
    assert structures.channels == len(structures.class_names) == 10
    assert structures.metrics == ("dice", "hd95") and structures.primary_metrics == ("dice",)
    byo = get_reader("nifti_cases").TASKS["structures"]
    assert byo == dataclasses.replace(structures, channels=0, class_names=())
    for name in ("ham10000", "stoic"):
        for task in get_reader(name).TASKS.values():
            if task.kind == "classification":
                assert task.target == task.name and task.classes == len(task.class_names)
                assert task.primary_metrics == task.metrics


def test_find_root_finds_one_marker_below_the_download(tmp_path: Path) -> None:
    write_patient(tmp_path / "wrap" / "open-kbp-master" / "provided-data" / "train-pats" / "pt_1")
    assert find_root(tmp_path, "openkbp") == tmp_path / "wrap" / "open-kbp-master"
    assert (
        find_root(tmp_path / "wrap" / "open-kbp-master", "openkbp") == tmp_path / "wrap" / "open-kbp-master"
    )
    (tmp_path / "other" / "provided-data").mkdir(parents=True)
    with pytest.raises(CtanError, match="2 openkbp datasets found"):
        find_root(tmp_path, "openkbp")
    with pytest.raises(CtanError, match="no ham10000 dataset found"):
        find_root(tmp_path, "ham10000")


def test_find_root_names_roots_inside_the_download_and_skips_macos_copies(tmp_path: Path) -> None:
    """A zip made by macOS's Finder mirrors the tree under __MACOSX/ (AppleDouble files): not a dataset."""
    write_patient(tmp_path / "open-kbp-sample" / "provided-data" / "train-pats" / "pt_1")
    (tmp_path / "__MACOSX" / "open-kbp-sample" / "provided-data" / "train-pats").mkdir(parents=True)
    assert find_root(tmp_path, "openkbp") == tmp_path / "open-kbp-sample"
    (tmp_path / "copy" / "provided-data").mkdir(parents=True)
    with pytest.raises(CtanError, match=r"found \(copy, open-kbp-sample\)"):
        find_root(tmp_path, "openkbp")


def test_dataset_deeper_than_the_search_says_so(tmp_path: Path) -> None:
    write_patient(tmp_path / "a" / "b" / "c" / "d" / "e" / "provided-data" / "train-pats" / "pt_1")
    with pytest.raises(CtanError, match="4 levels .* `subdir`"):
        find_root(tmp_path, "openkbp")


@pytest.mark.parametrize("name", ["Test-pats", "val-pats"])
def test_an_unknown_split_folder_is_refused(synthetic_root: Path, name: str) -> None:
    """Its patients would otherwise be left out without a word."""
    write_patient(synthetic_root / "provided-data" / name / "pt_2")
    with pytest.raises(CtanError, match="not an OpenKBP split folder") as err:
        openkbp.list_cases(synthetic_root)
    assert_names(err, name)


def test_a_semicolon_separated_csv_says_so(synthetic_root: Path) -> None:
    write_patient(synthetic_root / "provided-data" / "train-pats" / "pt_1", dose=";data\n130;70.5\n")
    with pytest.raises(CtanError, match="separated by ';'") as err:
        read_synthetic(synthetic_root)
    assert_names(err, "dose.csv")


def test_validation_pats_beside_valid_pats_is_refused(synthetic_root: Path) -> None:
    """Both names are the validation split; only validation-pats was read, valid-pats' patients
    left out without a word."""
    write_patient(synthetic_root / "provided-data" / "validation-pats" / "pt_201")
    write_patient(synthetic_root / "provided-data" / "valid-pats" / "pt_202")
    with pytest.raises(CtanError, match="a second validation folder beside validation-pats") as err:
        openkbp.list_cases(synthetic_root)
    assert_names(err, "valid-pats")


def test_a_utf16_csv_is_named_as_such(synthetic_root: Path) -> None:
    """Was "ends inside a row (cut short?)": a UTF-16 file ends in a zero byte."""
    path = synthetic_root / "provided-data" / "train-pats" / "pt_1" / "dose.csv"
    path.write_bytes(path.read_text().encode("utf-16"))
    with pytest.raises(CtanError, match="UTF-16") as err:
        read_synthetic(synthetic_root)
    assert_names(err, "dose.csv")
