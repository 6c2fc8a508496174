"""STOIC reader: real chest CTs keep HU and geometry in (z, y, x), labels checked, splits by patient."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from ctan.datasets import stoic
from ctan.datasets.base import CaseRef
from ctan.errors import CtanError


def make_root(root: Path, reference: str, mha: dict[str, Path | sitk.Image | bytes]) -> Path:
    """A STOIC folder: reference.csv text and {PatientID: source .mha, image or raw bytes}."""
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    (root / "data" / "mha").mkdir(parents=True, exist_ok=True)
    (root / "metadata" / "reference.csv").write_text(reference)
    for patient, source in mha.items():
        target = root / "data" / "mha" / f"{patient}.mha"
        if isinstance(source, Path):
            shutil.copy(source, target)
        elif isinstance(source, sitk.Image):
            sitk.WriteImage(source, str(target))
        else:
            target.write_bytes(source)
    return root


def tiny_image(spacing: tuple[float, float, float] = (0.8, 0.7, 2.5)) -> sitk.Image:
    image = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) - 1000)
    image.SetSpacing(spacing)
    return image


REFERENCE = "PatientID,probCOVID,probSevere,age,sex\n7,1,0,055Y,F\n12,0,0,065Y,M\n30,1,1,075Y,M\n"


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return make_root(tmp_path / "stoic", REFERENCE, {p: tiny_image() for p in ("7", "12", "30")})


def assert_names(err: pytest.ExceptionInfo[CtanError], filename: str) -> None:
    assert err.value.path is not None and err.value.path.endswith(filename), str(err.value)


# --- real data ---------------------------------------------------------------------------------------


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["Lung_Dx-A0001", "Lung_Dx-A0002_128"])
def test_real_ct_keeps_hu_spacing_origin_direction(shared_data: Path, tmp_path: Path, name: str) -> None:
    source = shared_data / "ct-samples" / f"{name}.mha"
    root = make_root(tmp_path, "PatientID,probCOVID,probSevere\n1,1,0\n", {"1": source})
    case = stoic.read_case(root, CaseRef("1", "train"))
    itk = sitk.ReadImage(str(source))
    array = sitk.GetArrayViewFromImage(itk)
    assert case.image.shape == (1, *array.shape) and case.image.dtype == np.float32
    assert case.image.shape[1:] == tuple(reversed(itk.GetSize()))
    assert np.array_equal(case.image[0], array)  # HU untouched
    assert case.image.min() == -1024 and case.image.max() == array.max()
    assert case.spacing == tuple(reversed(itk.GetSpacing()))
    assert case.origin == tuple(reversed(itk.GetOrigin()))
    assert case.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert case.labels == {"covid": 1, "severity": 0}


@pytest.mark.realdata
def test_real_reference_split_is_stratified_by_patient(shared_data: Path, tmp_path: Path) -> None:
    """The real 2,000-row label file (volumes are stand-in empty files: list_cases reads no pixels)."""
    reference = (shared_data / "stoic" / "reference.csv").read_text()
    table = pd.read_csv(shared_data / "stoic" / "reference.csv", dtype={"PatientID": str})
    root = make_root(tmp_path, reference, {p: b"" for p in table["PatientID"]})
    refs = stoic.list_cases(root)
    assert len(refs) == 2000 and len({r.case_id for r in refs}) == 2000
    assert stoic.list_cases(root) == refs
    labels = table.set_index("PatientID")
    for split, fraction in (("train", 0.65), ("validation", 0.15), ("test", 0.2)):
        ids = [r.case_id for r in refs if r.split == split]
        assert abs(len(ids) / 2000 - fraction) < 0.01
        assert abs(labels.loc[ids, "probCOVID"].mean() - labels["probCOVID"].mean()) < 0.02
        assert abs(labels.loc[ids, "probSevere"].mean() - labels["probSevere"].mean()) < 0.02


# --- geometry ----------------------------------------------------------------------------------------


def test_direction_and_spacing_are_permuted_to_zyx(tmp_path: Path) -> None:
    """world(index) of ITK equals origin + D @ (spacing * index) in our (z, y, x) terms."""
    image = tiny_image((0.8, 0.7, 2.5))
    image.SetOrigin((-10.0, 20.0, 300.0))
    # a rotation about z by 30 degrees with the z axis flipped: every entry matters
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    image.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, -1.0))
    root = make_root(tmp_path, "PatientID,probCOVID,probSevere\n1,0,0\n", {"1": image})
    case = stoic.read_case(root, CaseRef("1", "test"))
    direction = np.asarray(case.direction).reshape(3, 3)
    for index_xyz in [(0, 0, 0), (5, 0, 0), (0, 4, 0), (0, 0, 3), (5, 4, 3), (2, 1, 3)]:
        expected_xyz = image.TransformIndexToPhysicalPoint(index_xyz)
        index_zyx = np.asarray(index_xyz[::-1], dtype=float)
        world_zyx = np.asarray(case.origin) + direction @ (np.asarray(case.spacing) * index_zyx)
        assert np.allclose(world_zyx[::-1], expected_xyz)
        assert case.image[(0, *index_xyz[::-1])] == image[index_xyz]


# --- bad input ---------------------------------------------------------------------------------------


def test_labels_and_split_on_a_tiny_set(tiny: Path) -> None:
    refs = stoic.list_cases(tiny, {"validation": 0.0, "test": 0.0, "seed": 0})
    assert refs == [CaseRef("7", "train"), CaseRef("12", "train"), CaseRef("30", "train")]
    assert stoic.read_case(tiny, refs[2]).labels == {"covid": 1, "severity": 1}


def test_corrupt_mha_header_is_refused(tiny: Path) -> None:
    path = tiny / "data" / "mha" / "12.mha"
    path.write_bytes(path.read_bytes().replace(b"NDims = 3", b"NDims = x"))
    with pytest.raises(CtanError, match="unreadable image header") as err:
        stoic.read_case(tiny, CaseRef("12", "train"))
    assert_names(err, "12.mha")


def test_truncated_mha_data_is_refused(tiny: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """ITK's own explanation (printed from C++ on stderr) is the message, and nothing else reaches stderr:
    its exception said "No such file or directory" for a file that is there."""
    path = tiny / "data" / "mha" / "12.mha"
    path.write_bytes(path.read_bytes()[:-30])
    capfd.readouterr()
    with pytest.raises(CtanError, match="unreadable image data: .*not read completely.*cut short") as err:
        stoic.read_case(tiny, CaseRef("12", "train"))
    assert_names(err, "12.mha")
    assert "No such file" not in str(err.value)
    assert capfd.readouterr().err == ""


def test_missing_mha_for_a_reference_row_is_refused(tiny: Path) -> None:
    (tiny / "data" / "mha" / "30.mha").unlink()
    with pytest.raises(CtanError, match="missing") as err:
        stoic.list_cases(tiny)
    assert_names(err, "30.mha")
    with pytest.raises(CtanError, match="missing") as err:
        stoic.read_case(tiny, CaseRef("30", "train"))
    assert_names(err, "30.mha")


@pytest.mark.parametrize("row", ["7,0.7,0", "7,1,2", "7,yes,0", "7,1,"])
def test_non_binary_labels_are_refused(tmp_path: Path, row: str) -> None:
    root = make_root(tmp_path, f"PatientID,probCOVID,probSevere\n{row}\n", {"7": tiny_image()})
    with pytest.raises(CtanError, match="must be 0 or 1") as err:
        stoic.list_cases(root)
    assert_names(err, "reference.csv")


@pytest.mark.parametrize("spacing", [b"0 0.7 2.5", b"0.8 -0.7 2.5"])
def test_zero_or_negative_spacing_is_refused(tiny: Path, spacing: bytes) -> None:
    set_header_field(tiny / "data" / "mha" / "7.mha", b"ElementSpacing", spacing)
    with pytest.raises(CtanError, match="spacing must be positive") as err:
        stoic.read_case(tiny, CaseRef("7", "train"))
    assert_names(err, "7.mha")


def set_header_field(path: Path, field: bytes, value: bytes) -> None:
    """Rewrite one line of an .mha header (the data after it untouched)."""
    data = path.read_bytes()
    header_end = data.index(b"ElementDataFile")
    header = data[:header_end]
    line = next(x for x in header.split(b"\n") if x.startswith(field))
    path.write_bytes(header.replace(line, field + b" = " + value) + data[header_end:])


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("PatientID,probCOVID\n7,1\n", "probSevere"),  # a required column missing
        ("PatientID,probCOVID,probSevere\n7,1,0\n7,0,0\n", "listed twice"),
        ("PatientID,probCOVID,probSevere\n7,0,1\n", "patient 7 is severe .* without COVID-19"),
    ],
)
def test_bad_reference_is_refused(tmp_path: Path, reference: str, message: str) -> None:
    root = make_root(tmp_path, reference, {"7": tiny_image()})
    with pytest.raises(CtanError, match=message) as err:
        stoic.list_cases(root)
    assert_names(err, "reference.csv")


def test_split_file_overrides_and_is_checked(tiny: Path) -> None:
    (tiny / "split.csv").write_text("PatientID,split\n7,test\n12,train\n30,validation\n")
    assert [r.split for r in stoic.list_cases(tiny)] == ["test", "train", "validation"]
    (tiny / "split.csv").write_text("PatientID,split\n7,test\n12,train\n")
    with pytest.raises(CtanError, match="no split") as err:
        stoic.list_cases(tiny)
    assert_names(err, "split.csv")


def sheared() -> sitk.Image:
    """(spacing, direction) cannot describe such a grid; the NIfTI reader refuses a sheared affine too."""
    image = tiny_image()
    image.SetDirection((1, 0.3, 0, 0, 1, 0, 0, 0, 1))
    return image


def offset_by_1024() -> sitk.Image:
    """Nothing below 0 HU: read as HU it would be 1024 HU too bright."""
    return sitk.GetImageFromArray(sitk.GetArrayFromImage(tiny_image()) + 1024)


@pytest.mark.parametrize(
    ("image", "message"), [(sheared, "sheared"), (offset_by_1024, "no voxel below 0 HU")]
)
def test_a_ct_on_a_sheared_grid_or_not_in_hu_is_refused(tiny: Path, image, message: str) -> None:
    sitk.WriteImage(image(), str(tiny / "data" / "mha" / "7.mha"))
    with pytest.raises(CtanError, match=message) as err:
        stoic.read_case(tiny, CaseRef("7", "train"))
    assert_names(err, "7.mha")


def test_a_bad_label_is_shown_as_written(tmp_path: Path) -> None:
    root = make_root(tmp_path, "PatientID,probCOVID,probSevere\n7,1,2\n", {"7": tiny_image()})
    with pytest.raises(CtanError, match=r"found 2 for patient 7") as err:
        stoic.list_cases(root)
    assert "np." not in str(err.value)


def test_a_singular_direction_is_refused(tiny: Path) -> None:
    set_header_field(tiny / "data" / "mha" / "7.mha", b"TransformMatrix", b"1 0 0 1 0 0 0 0 1")
    with pytest.raises(CtanError, match="not orthogonal") as err:
        stoic.read_case(tiny, CaseRef("7", "train"))
    assert_names(err, "7.mha")


def test_a_reference_typed_with_spaces_after_the_commas_reads(tmp_path: Path) -> None:
    """ "PatientID, probCOVID, probSevere" was refused as missing probCOVID and probSevere."""
    spaced = REFERENCE.replace(",", ", ")
    root = make_root(tmp_path / "stoic", spaced, {p: tiny_image() for p in ("7", "12", "30")})
    table = stoic.read_reference(root)
    assert table["probCOVID"].to_dict() == {"7": 1, "12": 0, "30": 1}
    assert table["probSevere"].to_dict() == {"7": 0, "12": 0, "30": 1}


def edit_header(path: Path, old: bytes, new: bytes) -> None:
    """Replace the header line that starts with ``old`` by ``new`` (nothing: drop it)."""
    data = path.read_bytes()
    end = data.index(b"ElementDataFile")
    lines = data[:end].split(b"\n")
    at = next(i for i, line in enumerate(lines) if line.startswith(old))
    lines[at : at + 1] = [new] if new else []
    path.write_bytes(b"\n".join(lines) + data[end:])


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (b"TransformMatrix = 1 0 0 0 1 0 0 0 1", b"TransformMatrix = 2 0 0 0 2 0 0 0 2", "of length 2, 2, 2"),
        (b"ElementSpacing", b"", "no ElementSpacing"),
        (b"DimSize = 6 5 4", b"DimSize = 6 5 3", "holds 240 bytes.*describes 180: a wrong DimSize"),
        (b"Offset", b"Offset = 1 nan 3", "offset = '1 nan 3' is not 3 finite numbers"),
        (b"Offset", b"Offset = 1 2", "offset = '1 2' is not 3 finite numbers"),
    ],
    ids=[
        "scaled-direction",
        "no-spacing",
        "dimsize-too-small",
        "nan-origin",
        "short-origin",
    ],
)
def test_a_header_itk_reads_without_a_word_is_refused(
    tiny: Path, old: bytes, new: bytes, message: str
) -> None:
    """Each read silently: world coordinates twice too far, 1 mm voxels, the last slice dropped."""
    edit_header(tiny / "data" / "mha" / "7.mha", old, new)
    with pytest.raises(CtanError, match=message) as err:
        stoic.read_case(tiny, CaseRef("7", "train"))
    assert_names(err, "7.mha")


def test_data_longer_than_the_header_says_is_refused(tiny: Path) -> None:
    path = tiny / "data" / "mha" / "7.mha"
    path.write_bytes(path.read_bytes() + bytes(6 * 5 * 2))  # one more slice than DimSize holds
    with pytest.raises(CtanError, match="holds 300 bytes of voxel data.*describes 240") as err:
        stoic.read_case(tiny, CaseRef("7", "train"))
    assert_names(err, "7.mha")


@pytest.mark.parametrize("name", ["7.MHA", "7.mhd"])
def test_a_volume_named_otherwise_is_pointed_at(tiny: Path, name: str) -> None:
    path = tiny / "data" / "mha" / "7.mha"
    path.rename(path.with_name(name))
    with pytest.raises(CtanError, match=f"missing .*found {name}") as err:
        stoic.list_cases(tiny)
    assert_names(err, "7.mha")
