"""Bring-your-own NIfTI cases against real-world variants: qform-only files with made-up voxel sizes,
extra singleton axes, a file kept both gzipped and not, case folders differing in letter case, complex
voxels. Every file is written with nibabel (a header field patched in the bytes where nibabel would not
write it)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctan.datasets import nifti_cases
from ctan.datasets.base import CaseRef
from ctan.errors import CtanError

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])
PIXDIM_OFFSET = 76  # NIfTI-1 header: float32 pixdim[8] at byte 76


def ct_volume() -> np.ndarray:
    ct = np.full((6, 5, 4), -1000, dtype=np.int16)
    ct[1:5, 1:4, 1:3] = 40
    return ct


def save(path: Path, image: nib.Nifti1Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    return path


def write_case(root: Path, case: str) -> Path:
    folder = root / "cases" / case
    ct = ct_volume()
    save(folder / "ct.nii.gz", nib.Nifti1Image(ct, AFFINE))
    save(folder / "dose.nii.gz", nib.Nifti1Image((ct > 0).astype(np.float32) * 60, AFFINE))
    save(folder / "masks" / "PTV.nii.gz", nib.Nifti1Image((ct > 0).astype(np.uint8), AFFINE))
    return folder


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for case in ("a", "b", "c"):
        write_case(tmp_path, case)
    return tmp_path


def read(root: Path, case: str = "a"):
    return nifti_cases.read_case(root, CaseRef(case, "train"))


def assert_names(err: pytest.ExceptionInfo[CtanError], filename: str) -> None:
    assert err.value.path is not None and err.value.path.endswith(filename), str(err.value)


def qform_only(path: Path, slice_size: float) -> None:
    """Rewrite a file with its affine in the qform alone (sform code 0), as many converters write it,
    and the slice voxel size (pixdim[3]) set to ``slice_size`` in the file's bytes."""
    image = nib.load(path)
    bare = nib.Nifti1Image(np.asarray(image.dataobj), None)
    bare.set_qform(image.affine, code=1)
    bare.set_sform(None, code=0)
    data = bytearray(bare.to_bytes())
    struct.pack_into("<f", data, PIXDIM_OFFSET + 3 * 4, slice_size)
    path.write_bytes(gzip.compress(bytes(data)))


def test_a_qform_only_case_reads_with_its_voxel_sizes(root: Path) -> None:
    folder = root / "cases" / "a"
    for name in ("ct.nii.gz", "dose.nii.gz", "masks/PTV.nii.gz"):
        qform_only(folder / name, 3.0)
    case = read(root)
    assert case.spacing == (3.0, 2.0, 2.0)
    assert case.structure_present == (True,)


@pytest.mark.parametrize("slice_size", [0.0, -3.0])
def test_a_qform_only_file_with_a_voxel_size_not_positive_is_refused(root: Path, slice_size: float) -> None:
    """nibabel read a zero slice size as 1 mm (and -3 as 3 mm, niftilib as 1 mm) without a word."""
    folder = root / "cases" / "a"
    for name in ("ct.nii.gz", "dose.nii.gz", "masks/PTV.nii.gz"):
        qform_only(folder / name, slice_size)
    with pytest.raises(CtanError, match=f"pixdim.*{slice_size:g} mm are not all positive") as err:
        read(root)
    assert_names(err, "ct.nii.gz")


@pytest.mark.parametrize("extra", [(1,), (1, 1)])
def test_trailing_singleton_axes_are_dropped(root: Path, extra: tuple[int, ...]) -> None:
    """(x, y, z, 1) as many tools write one volume of a series, (x, y, z, 1, 1) as ITK-based ones may."""
    folder = root / "cases" / "a"
    save(folder / "ct.nii.gz", nib.Nifti1Image(ct_volume().reshape(6, 5, 4, *extra), AFFINE))
    mask = (ct_volume() > 0).astype(np.uint8).reshape(6, 5, 4, *extra)
    save(folder / "masks" / "PTV.nii.gz", nib.Nifti1Image(mask, AFFINE))
    case = read(root)
    reference = read(root, "b")
    np.testing.assert_array_equal(case.image, reference.image)
    np.testing.assert_array_equal(case.dense["structures"], reference.dense["structures"])


def test_a_fourth_axis_of_several_volumes_is_refused(root: Path) -> None:
    volumes = np.stack([ct_volume(), ct_volume()], axis=-1)
    save(root / "cases" / "a" / "ct.nii.gz", nib.Nifti1Image(volumes, AFFINE))
    with pytest.raises(CtanError, match=r"expected a 3D volume, found shape \(6, 5, 4, 2\)") as err:
        read(root)
    assert_names(err, "ct.nii.gz")


@pytest.mark.parametrize("name", ["ct", "masks/PTV"])
def test_a_file_kept_both_gzipped_and_not_is_refused(root: Path, name: str) -> None:
    """`gunzip -k` leaves both: the .nii.gz was read and the .nii, perhaps the corrected one, ignored."""
    folder = root / "cases" / "a"
    image = nib.load(folder / f"{name}.nii.gz")
    save(folder / f"{name}.nii", nib.Nifti1Image(np.asarray(image.dataobj), AFFINE))
    with pytest.raises(CtanError, match=f"{Path(name).name}.nii.gz is there too: keep one") as err:
        read(root)
    assert_names(err, f"{name}.nii")


def test_an_uncompressed_file_alone_reads(root: Path) -> None:
    folder = root / "cases" / "a"
    data = np.asarray(nib.load(folder / "ct.nii.gz").dataobj)
    (folder / "ct.nii.gz").unlink()
    save(folder / "ct.nii", nib.Nifti1Image(data, AFFINE))
    np.testing.assert_array_equal(read(root).image, read(root, "b").image)


def test_case_folders_differing_only_in_letter_case_are_refused(root: Path) -> None:
    write_case(root, "A")
    with pytest.raises(CtanError, match="differs from case 'A' only in letter case") as err:
        nifti_cases.list_cases(root)
    assert_names(err, "a")


def test_complex_voxels_are_refused(root: Path) -> None:
    """nibabel dropped the imaginary part with a warning only."""
    dose = (ct_volume() > 0).astype(np.complex64) * (60 + 5j)
    save(root / "cases" / "a" / "dose.nii.gz", nib.Nifti1Image(dose, AFFINE))
    with pytest.raises(CtanError, match="complex") as err:
        read(root)
    assert_names(err, "dose.nii.gz")
