"""STOIC reader against real-world MetaImage variants: compressed volumes (as ITK writes them with
``useCompression=True``) whose header does not describe their data, and PatientIDs that lost their
leading zeros."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ctan.datasets import stoic
from ctan.datasets.base import CaseRef
from ctan.errors import CtanError

REFERENCE = "PatientID,probCOVID,probSevere\n7,1,0\n12,0,0\n"


def volume() -> sitk.Image:
    image = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) - 1000)
    image.SetSpacing((0.8, 0.7, 2.5))
    return image


@pytest.fixture
def compressed(tmp_path: Path) -> Path:
    """A STOIC root whose volumes are compressed MHA files, written by SimpleITK."""
    (tmp_path / "metadata").mkdir()
    (tmp_path / "data" / "mha").mkdir(parents=True)
    (tmp_path / "metadata" / "reference.csv").write_text(REFERENCE)
    for patient in ("7", "12"):
        sitk.WriteImage(volume(), str(tmp_path / "data" / "mha" / f"{patient}.mha"), useCompression=True)
    return tmp_path


def edit_header(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    header_end = data.index(b"ElementDataFile")
    assert re.search(old, data[:header_end]), old
    path.write_bytes(re.sub(old, new, data[:header_end]) + data[header_end:])


def read(root: Path, patient: str = "7") -> np.ndarray:
    return stoic.read_case(root, CaseRef(patient, "train")).image


def assert_names(err: pytest.ExceptionInfo[CtanError], filename: str) -> None:
    assert err.value.path is not None and err.value.path.endswith(filename), str(err.value)


def test_a_compressed_volume_reads_as_written(compressed: Path) -> None:
    assert b"CompressedData = True" in (compressed / "data" / "mha" / "7.mha").read_bytes()
    np.testing.assert_array_equal(read(compressed)[0], sitk.GetArrayFromImage(volume()))


@pytest.mark.realdata
def test_a_real_compressed_ct_reads_as_its_uncompressed_copy(shared_data: Path, tmp_path: Path) -> None:
    """The real samples are compressed MHA (as ITK writes them with useCompression=True)."""
    source = shared_data / "ct-samples" / "Lung_Dx-A0002_128.mha"
    assert b"CompressedData = True" in source.read_bytes()[:1000]
    plain = tmp_path / "ct.mha"
    sitk.WriteImage(sitk.ReadImage(str(source)), str(plain), useCompression=False)
    np.testing.assert_array_equal(stoic.read_ct(source)[0], stoic.read_ct(plain)[0])


@pytest.mark.parametrize(("slices", "inflated", "described"), [(3, 240, 180), (5, 240, 300)])
def test_a_compressed_volume_with_a_wrong_dim_size_is_refused(
    compressed: Path, slices: int, inflated: int, described: int
) -> None:
    """ITK read the first 3 slices of 4 without a word, or made a 5th one of whatever memory held."""
    path = compressed / "data" / "mha" / "7.mha"
    edit_header(path, rb"DimSize = 6 5 4", f"DimSize = 6 5 {slices}".encode())
    message = f"inflates to {inflated} bytes.*describes {described}.*DimSize"
    with pytest.raises(CtanError, match=message) as err:
        read(compressed)
    assert_names(err, "7.mha")


@pytest.mark.parametrize(
    ("new", "message"),
    [(b"", "no CompressedDataSize"), (b"CompressedDataSize = 100\n", "CompressedDataSize = '100'")],
)
def test_a_compressed_data_size_itk_misreads_is_refused(compressed: Path, new: bytes, message: str) -> None:
    """Without the field, or with too small a one, ITK printed "Uncompress failed" and returned garbage."""
    path = compressed / "data" / "mha" / "7.mha"
    edit_header(path, rb"CompressedDataSize = \d+\n", new)
    with pytest.raises(CtanError, match=message) as err:
        read(compressed)
    assert_names(err, "7.mha")


def test_voxel_data_that_is_not_compressed_as_the_header_says_is_refused(compressed: Path) -> None:
    path = compressed / "data" / "mha" / "7.mha"
    data = path.read_bytes()
    start = data.index(b"ElementDataFile = LOCAL\n") + len(b"ElementDataFile = LOCAL\n")
    path.write_bytes(data[:start] + bytes(len(data) - start))
    with pytest.raises(CtanError, match="not zlib-compressed") as err:
        read(compressed)
    assert_names(err, "7.mha")


def test_a_volume_named_with_leading_zeros_is_pointed_at(compressed: Path) -> None:
    path = compressed / "data" / "mha" / "7.mha"
    path.rename(path.with_name("0007.mha"))
    with pytest.raises(CtanError, match="missing .*found 0007.mha") as err:
        stoic.list_cases(compressed)
    assert_names(err, "7.mha")
