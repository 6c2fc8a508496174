"""Bring-your-own NIfTI cases: world coordinates survive canonical reorientation, bad cases refused."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctan.datasets import find_root, nifti_cases
from ctan.datasets.base import CaseRef
from ctan.errors import CtanError


def save(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)


def write_case(
    root: Path, case: str, ct: np.ndarray, affine: np.ndarray, masks: dict[str, np.ndarray] | None = None
) -> Path:
    """A case with a synthetic dose (a ramp along the first file axis, 0 outside the body) and masks."""
    folder = root / "cases" / case
    save(folder / "ct.nii.gz", ct, affine)
    ramp = np.arange(ct.shape[0], dtype=np.float32)[:, None, None]
    save(folder / "dose.nii.gz", ((ct > -500) * ramp).astype(np.float32), affine)
    for name, mask in (masks or {}).items():
        save(folder / "masks" / f"{name}.nii.gz", mask.astype(np.uint8), affine)
    return folder


def world_to_ours(case, world_ras: np.ndarray) -> np.ndarray:
    """Our (z, y, x) index of a RAS world point, through the case's own geometry."""
    direction = np.asarray(case.direction).reshape(3, 3)
    return np.linalg.solve(direction, world_ras[::-1] - np.asarray(case.origin)) / np.asarray(case.spacing)


@pytest.fixture(scope="session")
def example(shared_data: Path) -> tuple[np.ndarray, np.ndarray]:
    """The real CT as stored, and the same CT rewritten in a non-canonical (S, P, L) voxel order."""
    image = nib.load(shared_data / "nifti" / "example_ct.nii.gz")
    data = np.asarray(image.dataobj).astype(np.int16)
    n = data.shape
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:3, 3] = [n[0] - 1, n[1] - 1, 0]
    swap = np.eye(4)[:, [2, 1, 0, 3]]
    affine = (
        image.affine @ flip @ swap
    )  # voxel (i, j, k) of the new file = voxel (n0-1-k, n1-1-j, i) of the old
    reoriented = np.ascontiguousarray(data[::-1, ::-1, :].transpose(2, 1, 0))
    assert nib.aff2axcodes(affine) == ("S", "P", "L")
    return reoriented, affine


@pytest.fixture
def real_root(tmp_path: Path, example: tuple[np.ndarray, np.ndarray]) -> Path:
    ct, affine = example
    write_case(tmp_path, "p01", ct, affine, {"Bone": ct > 300, "Body": ct > -500})
    write_case(tmp_path, "p02", ct, affine, {"Bladder": ct > 2000})
    return tmp_path


def assert_names(err: pytest.ExceptionInfo[CtanError], filename: str) -> None:
    assert err.value.path is not None and err.value.path.endswith(filename), str(err.value)


# --- real data ---------------------------------------------------------------------------------------


@pytest.mark.realdata
def test_landmarks_keep_their_world_coordinates(
    real_root: Path, example: tuple[np.ndarray, np.ndarray]
) -> None:
    ct, affine = example
    case = nifti_cases.read_case(real_root, CaseRef("p01", "train"))
    assert case.image.shape == (1, 112, 101, 122)  # the original file is RAS (x, y, z) = (122, 101, 112)
    assert case.image.dtype == np.float32
    dose = case.dense["dose"][0]
    rng = np.random.default_rng(0)
    corners = [(0, 0, 0), (ct.shape[0] - 1, ct.shape[1] - 1, ct.shape[2] - 1)]
    brightest = np.unravel_index(int(ct.argmax()), ct.shape)
    for ijk in corners + [brightest] + [tuple(rng.integers(0, ct.shape)) for _ in range(20)]:
        world = (affine @ [*ijk, 1.0])[:3]
        index = world_to_ours(case, world)
        assert np.allclose(index, np.round(index), atol=1e-4), (ijk, index)
        zyx = tuple(int(v) for v in np.round(index))
        assert case.image[(0, *zyx)] == ct[ijk]
        assert dose[zyx] == np.float32((ct[ijk] > -500) * ijk[0])
    assert np.isclose(np.linalg.det(np.asarray(case.direction).reshape(3, 3)), 1.0)
    assert case.spacing == (3.0, 3.0, 3.0)


@pytest.mark.realdata
def test_structures_are_the_sorted_union_over_cases(
    real_root: Path, example: tuple[np.ndarray, np.ndarray]
) -> None:
    ct, _ = example
    assert nifti_cases.structure_names(real_root) == ["Bladder", "Body", "Bone"]
    case = nifti_cases.read_case(real_root, CaseRef("p01", "train"))
    structures = case.dense["structures"]
    assert structures.shape == (3, 112, 101, 122) and structures.dtype == np.uint8
    assert case.structure_present == (False, True, True)
    assert structures[0].max() == 0
    assert structures[2].sum() == (ct > 300).sum()
    # no possible_dose_mask file: the body (CT > -500 HU) stands in
    assert np.array_equal(case.dense["possible_dose_mask"][0], (case.image[0] > -500).astype(np.uint8))
    assert find_root(real_root, "nifti_cases") == real_root


# --- synthetic ---------------------------------------------------------------------------------------

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    ct = np.full((6, 5, 4), -1000, dtype=np.int16)
    ct[1:5, 1:4, 1:3] = 40
    for case in ("a", "b", "c", "d", "e"):
        write_case(tmp_path, case, ct, AFFINE, {"PTV": ct > 0})
    return tmp_path


def test_possible_dose_mask_file_is_used_when_present(tiny: Path) -> None:
    mask = np.zeros((6, 5, 4), dtype=np.uint8)
    mask[0, 0, 0] = 1
    save(tiny / "cases" / "a" / "possible_dose_mask.nii.gz", mask, AFFINE)
    case = nifti_cases.read_case(tiny, CaseRef("a", "train"))
    assert case.dense["possible_dose_mask"].sum() == 1 and case.dense["possible_dose_mask"][0, 0, 0, 0] == 1


def test_an_empty_possible_dose_mask_is_refused_at_reading(tiny: Path) -> None:
    """Its dose score would be 0/0: refused when the case is read, not found by `ctan evaluate` later."""
    save(tiny / "cases" / "a" / "possible_dose_mask.nii.gz", np.zeros((6, 5, 4), dtype=np.uint8), AFFINE)
    with pytest.raises(CtanError, match="possible-dose mask is empty") as err:
        nifti_cases.read_case(tiny, CaseRef("a", "train"))
    assert_names(err, "possible_dose_mask.nii.gz")


def test_split_from_params_is_deterministic_and_file_overrides(tiny: Path) -> None:
    refs = nifti_cases.list_cases(tiny)
    assert [r.case_id for r in refs] == ["a", "b", "c", "d", "e"]
    assert refs == nifti_cases.list_cases(tiny)
    assert {r.split for r in refs} == {"train", "validation", "test"}
    (tiny / "split.csv").write_text("case,split\na,train\nb,train\nc,validation\nd,test\ne,test\n")
    assert [r.split for r in nifti_cases.list_cases(tiny)] == ["train", "train", "validation", "test", "test"]


def test_unknown_split_value_is_refused(tiny: Path) -> None:
    (tiny / "split.csv").write_text("case,split\na,train\nb,train\nc,val\nd,test\ne,test\n")
    with pytest.raises(CtanError, match="'val'") as err:
        nifti_cases.list_cases(tiny)
    assert_names(err, "split.csv")


def test_mask_shape_mismatch_is_refused(tiny: Path) -> None:
    save(tiny / "cases" / "b" / "masks" / "PTV.nii.gz", np.zeros((6, 5, 5), np.uint8), AFFINE)
    with pytest.raises(CtanError, match="shape") as err:
        nifti_cases.read_case(tiny, CaseRef("b", "train"))
    assert_names(err, "PTV.nii.gz")


@pytest.mark.parametrize("name", ["masks/PTV", "possible_dose_mask"])
def test_mask_off_the_ct_grid_is_refused(tiny: Path, name: str) -> None:
    """Only dose is resampled: a mask off the CT grid is still refused, and the message says so."""
    path = tiny / "cases" / "b" / f"{name}.nii.gz"
    shifted = AFFINE.copy()
    shifted[0, 3] = 1.0
    save(path, np.ones((6, 5, 4), np.uint8), shifted)
    with pytest.raises(CtanError, match="affine differs.*only dose.nii.gz is resampled") as err:
        nifti_cases.read_case(tiny, CaseRef("b", "train"))
    assert_names(err, path.name)


@pytest.mark.parametrize("value", [np.nan, -1.0])
def test_nan_or_negative_dose_is_refused(tiny: Path, value: float) -> None:
    dose = np.zeros((6, 5, 4), np.float32)
    dose[2, 2, 2] = value
    save(tiny / "cases" / "c" / "dose.nii.gz", dose, AFFINE)
    with pytest.raises(CtanError) as err:
        nifti_cases.read_case(tiny, CaseRef("c", "train"))
    assert_names(err, "dose.nii.gz")


@pytest.mark.parametrize("name", ["ct", "dose"])
def test_missing_file_is_refused(tiny: Path, name: str) -> None:
    (tiny / "cases" / "d" / f"{name}.nii.gz").unlink()
    for call in (
        lambda: nifti_cases.list_cases(tiny),
        lambda: nifti_cases.read_case(tiny, CaseRef("d", "test")),
    ):
        with pytest.raises(CtanError, match="missing") as err:
            call()
        assert_names(err, f"{name}.nii.gz")


@pytest.mark.parametrize("damage", ["garbage", "header", "data"])
def test_corrupt_nifti_is_refused(tiny: Path, damage: str) -> None:
    path = tiny / "cases" / "e" / "ct.nii.gz"
    raw = gzip.decompress(path.read_bytes())
    broken = {
        "garbage": b"no nifti here",
        "header": gzip.compress(raw[:100]),
        "data": gzip.compress(raw[:-40]),
    }
    path.write_bytes(broken[damage])
    with pytest.raises(CtanError) as err:
        nifti_cases.read_case(tiny, CaseRef("e", "test"))
    assert_names(err, "ct.nii.gz")


def test_no_cases_is_refused(tmp_path: Path) -> None:
    (tmp_path / "cases").mkdir()
    with pytest.raises(CtanError, match="no case folders") as err:
        nifti_cases.list_cases(tmp_path)
    assert_names(err, "cases")


@pytest.mark.parametrize("value", [0.3, 255])
@pytest.mark.parametrize("name", ["masks/PTV", "possible_dose_mask"])
def test_non_binary_mask_is_refused(tiny: Path, name: str, value: float) -> None:
    """A probability map (0.3) or a 0/255 mask is refused, not thresholded into an empty structure."""
    mask = np.zeros((6, 5, 4), np.float32)
    mask[1:5, 1:4, 1:3] = value
    path = tiny / "cases" / "b" / f"{name}.nii.gz"
    save(path, mask, AFFINE)
    with pytest.raises(CtanError, match=f"not a binary mask.*{value:g}.*> 0.5") as err:
        nifti_cases.read_case(tiny, CaseRef("b", "train"))
    assert_names(err, path.name)


def test_empty_mask_is_marked_absent(tiny: Path) -> None:
    save(tiny / "cases" / "b" / "masks" / "PTV.nii.gz", np.zeros((6, 5, 4), np.uint8), AFFINE)
    assert nifti_cases.read_case(tiny, CaseRef("b", "train")).structure_present == (False,)
    assert nifti_cases.read_case(tiny, CaseRef("a", "train")).structure_present == (True,)


def test_sheared_affine_is_refused(tiny: Path) -> None:
    """Every file of the case sheared alike: they agree with each other, but the grid is not orthogonal."""
    sheared = AFFINE.copy()
    sheared[0, 1] = 0.5  # the second voxel axis leans along x
    folder = tiny / "cases" / "c"
    for path in [folder / "ct.nii.gz", folder / "dose.nii.gz", folder / "masks" / "PTV.nii.gz"]:
        save(path, np.asarray(nib.load(path).dataobj), sheared)
    with pytest.raises(CtanError, match="sheared.*resample") as err:
        nifti_cases.read_case(tiny, CaseRef("c", "train"))
    assert_names(err, "ct.nii.gz")


def test_oblique_but_orthogonal_affine_is_kept(tiny: Path) -> None:
    """A rotated (oblique) grid is fine: its direction is stored as a rotation."""
    angle = np.deg2rad(10)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    oblique = AFFINE.copy()
    oblique[:3, :3] = rotation @ AFFINE[:3, :3]
    folder = tiny / "cases" / "c"
    for path in [folder / "ct.nii.gz", folder / "dose.nii.gz", folder / "masks" / "PTV.nii.gz"]:
        save(path, np.asarray(nib.load(path).dataobj), oblique)
    direction = np.asarray(nifti_cases.read_case(tiny, CaseRef("c", "train")).direction).reshape(3, 3)
    np.testing.assert_allclose(direction @ direction.T, np.eye(3), atol=1e-6)


def test_shape_mismatch_with_the_ct_is_refused(tiny: Path) -> None:
    save(tiny / "cases" / "b" / "possible_dose_mask.nii.gz", np.zeros((6, 5, 3), np.uint8), AFFINE)
    with pytest.raises(CtanError, match=r"shape \(6, 5, 3\) differs from the CT's \(6, 5, 4\)") as err:
        nifti_cases.read_case(tiny, CaseRef("b", "train"))
    assert_names(err, "possible_dose_mask.nii.gz")


def test_rgb_voxels_are_refused(tiny: Path) -> None:
    rgb = np.zeros((6, 5, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, AFFINE), tiny / "cases" / "c" / "ct.nii.gz")
    with pytest.raises(CtanError, match="RGB") as err:
        nifti_cases.read_case(tiny, CaseRef("c", "train"))
    assert_names(err, "ct.nii.gz")


def test_dose_in_cgy_is_refused(tiny: Path) -> None:
    path = tiny / "cases" / "c" / "dose.nii.gz"
    save(path, np.asarray(nib.load(path).dataobj) * 100 + 400, AFFINE)
    with pytest.raises(CtanError, match="cGy") as err:
        nifti_cases.read_case(tiny, CaseRef("c", "train"))
    assert_names(err, "dose.nii.gz")


@pytest.mark.parametrize("other", ["ptv", "PTV "])
def test_one_structure_spelled_two_ways_is_refused(tiny: Path, other: str) -> None:
    """Not two channels, each 'absent' where the other spelling is used."""
    masks = tiny / "cases" / "c" / "masks"
    (masks / "PTV.nii.gz").rename(masks / f"{other}.nii.gz")
    with pytest.raises(CtanError, match="spelled two ways|spaces") as err:
        nifti_cases.structure_names(tiny)
    assert_names(err, f"{other}.nii.gz")


def test_a_mask_value_next_to_1_is_shown_in_full(tiny: Path) -> None:
    """0.99999994 (float32 after resampling) must not read as "values other than 0 and 1 (1)"."""
    path = tiny / "cases" / "c" / "masks" / "PTV.nii.gz"
    save(path, np.asarray(nib.load(path).dataobj).astype(np.float32) * np.float32(0.99999994), AFFINE)
    with pytest.raises(CtanError, match=r"\(0.99999994\)"):
        nifti_cases.read_case(tiny, CaseRef("c", "train"))


def test_a_file_without_orientation_is_refused(tiny: Path) -> None:
    """qform and sform codes 0: nibabel would invent an LAS affine, mirroring the case left-right."""
    path = tiny / "cases" / "c" / "ct.nii.gz"
    image = nib.load(path)
    bare = nib.Nifti1Image(np.asarray(image.dataobj), None)
    bare.set_qform(None, code=0)
    bare.set_sform(None, code=0)
    nib.save(bare, path)
    assert int(nib.load(path).header["sform_code"]) == 0
    with pytest.raises(CtanError, match="qform and sform codes both 0") as err:
        nifti_cases.read_case(tiny, CaseRef("c", "train"))
    assert_names(err, "ct.nii.gz")


def test_qform_and_sform_that_disagree_are_refused(tiny: Path) -> None:
    """nibabel reads the sform, ITK-based tools often the qform: the case would sit elsewhere in each."""
    path = tiny / "cases" / "c" / "ct.nii.gz"
    image = nib.load(path)
    moved = AFFINE.copy()
    moved[0, 3] += 50.0
    both = nib.Nifti1Image(np.asarray(image.dataobj), AFFINE)
    both.set_qform(moved, code=1)
    both.set_sform(AFFINE, code=2)
    nib.save(both, path)
    with pytest.raises(CtanError, match="qform and sform place the voxels up to 50 mm apart") as err:
        nifti_cases.read_case(tiny, CaseRef("c", "train"))
    assert_names(err, "ct.nii.gz")


@pytest.mark.parametrize(
    ("ct", "message"),
    [
        (lambda hu: np.clip((hu + 1000) / 8, 0, 255).astype(np.uint8), "no voxel below 0 HU"),  # 8-bit
        (lambda hu: (hu + 1024).astype(np.int16), "no voxel below 0 HU"),  # an offset left in
        (lambda hu: (hu * 30).astype(np.int16), "below any scanner's"),  # a scale factor lost
    ],
)
def test_a_ct_not_in_hounsfield_units_is_refused(tiny: Path, ct, message: str) -> None:
    path = tiny / "cases" / "c" / "ct.nii.gz"
    save(path, ct(np.asarray(nib.load(path).dataobj).astype(np.float32)), AFFINE)
    with pytest.raises(CtanError, match=message) as err:
        nifti_cases.read_case(tiny, CaseRef("c", "train"))
    assert_names(err, "ct.nii.gz")


@pytest.mark.parametrize("order", ["first axis flipped", "axes swapped and flipped"])
def test_a_mask_in_another_voxel_order_on_the_same_grid_reads(real_root: Path, order: str) -> None:
    """The same world grid stored in another voxel order (as some converters write masks) is the CT's
    grid once read canonically: accepted, every voxel where the CT's own order puts it."""
    folder = real_root / "cases" / "p01"
    reference = nifti_cases.read_case(real_root, CaseRef("p01", "train"))
    image = nib.load(folder / "masks" / "Bone.nii.gz")
    data, n = np.asarray(image.dataobj), image.shape
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, n[0] - 1  # voxel i of the new file = voxel n0-1-i of the old
    if order == "first axis flipped":
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data[::-1]), image.affine @ flip), image.get_filename())
    else:
        swap = np.eye(4)[:, [1, 0, 2, 3]]  # then the first two axes exchanged
        moved = np.ascontiguousarray(data[::-1].transpose(1, 0, 2))
        nib.save(nib.Nifti1Image(moved, image.affine @ flip @ swap), image.get_filename())
    case = nifti_cases.read_case(real_root, CaseRef("p01", "train"))
    np.testing.assert_array_equal(case.dense["structures"], reference.dense["structures"])


# --- dose on its own grid ----------------------------------------------------------------------------


def reorder(data: np.ndarray, affine: np.ndarray, flips: tuple[int, ...], perm: tuple[int, ...]):
    """The same grid stored in another voxel order: file axes in ``flips`` reversed, then permuted."""
    for axis in flips:
        flip = np.eye(4)
        flip[axis, axis], flip[axis, 3] = -1, data.shape[axis] - 1
        data, affine = np.flip(data, axis), affine @ flip
    return np.ascontiguousarray(data.transpose(perm)), affine @ np.eye(4)[:, [*perm, 3]]


def linear_dose(world: np.ndarray) -> np.ndarray:
    """Dose (Gy) that is a linear function of RAS world coordinates (..., 3): trilinear keeps it exact."""
    return 20.0 + world @ np.array([0.05, -0.03, 0.04])


def grid_world(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """RAS world coordinates of every voxel centre, (*shape, 3)."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return index @ affine[:3, :3].T + affine[:3, 3]


def our_world(case) -> np.ndarray:
    """RAS world coordinates of the case's (z, y, x) voxel centres, through its own geometry."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in case.spatial_shape], indexing="ij"), axis=-1)
    direction = np.asarray(case.direction).reshape(3, 3)
    zyx = (index * np.asarray(case.spacing)) @ direction.T + np.asarray(case.origin)
    return zyx[..., ::-1]


CT_AFFINE = np.array([[2.0, 0, 0, -20.0], [0, 2.0, 0, 15.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])
CT_SHAPE = (20, 18, 16)
# coarser than the CT, shifted off its voxel centres, inside it (over part of it)
DOSE_AFFINE = np.array([[3.0, 0, 0, -13.3], [0, 3.5, 0, 19.1], [0, 0, 4.0, -24.7], [0, 0, 0, 1]])
DOSE_SHAPE = (8, 7, 6)
RAS = ((), (0, 1, 2))


def write_rt_case(
    root: Path, dose: np.ndarray, dose_affine: np.ndarray, ct_order: tuple[tuple[int, ...], ...] = RAS
) -> None:
    """A CT on ``CT_AFFINE`` (stored in ``ct_order``: see `reorder`) and a dose on its own grid."""
    ct = np.full(CT_SHAPE, -1000, np.int16)
    ct[3:17, 3:15, 2:14] = 30
    folder = root / "cases" / "rt"
    save(folder / "ct.nii.gz", *reorder(ct, CT_AFFINE, *ct_order))
    save(folder / "dose.nii.gz", dose.astype(np.float32), dose_affine)


def rotated_about_centre(affine: np.ndarray, shape: tuple[int, ...], degrees: float) -> np.ndarray:
    """The grid turned in the axial plane about its centre: oblique, still orthogonal."""
    angle = np.deg2rad(degrees)
    turn = np.eye(4)
    turn[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    move = np.eye(4)
    move[:3, 3] = (affine @ [*(np.array(shape) / 2), 1])[:3]
    return move @ turn @ np.linalg.inv(move) @ affine


@pytest.mark.parametrize(
    ("ct_order", "dose_order", "degrees", "codes"),
    [
        pytest.param(RAS, RAS, 0, "RAS", id="both RAS"),
        pytest.param(RAS, ((0, 1), (0, 1, 2)), 0, "LPS", id="dose LPS"),
        pytest.param(RAS, ((0, 1), (2, 1, 0)), 0, "SPL", id="dose SPL"),
        pytest.param(((0, 1), (2, 1, 0)), RAS, 0, "RAS", id="CT SPL"),
        pytest.param(RAS, ((0,), (1, 0, 2)), 10, "ALS", id="dose oblique, ALS"),
    ],
)
def test_dose_on_its_own_grid_is_resampled_in_world_coordinates(
    tmp_path: Path, ct_order, dose_order, degrees: float, codes: str
) -> None:
    """A dose linear in world coordinates, on a coarser, shifted grid in any voxel order: at every CT voxel
    centre inside the dose grid the resampled dose is the function there (the edge value in the outer half
    of the edge voxels), and 0 Gy beyond."""
    grid = rotated_about_centre(DOSE_AFFINE, DOSE_SHAPE, degrees)
    values, affine = reorder(linear_dose(grid_world(DOSE_SHAPE, grid)), grid, *dose_order)
    assert "".join(nib.aff2axcodes(affine)) == codes
    write_rt_case(tmp_path, values, affine, ct_order)
    case = nifti_cases.read_case(tmp_path, CaseRef("rt", "train"))
    dose = case.dense["dose"][0]
    assert dose.dtype == np.float32 and dose.shape == case.spatial_shape == CT_SHAPE[::-1]
    index = (our_world(case) - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T  # in the dose file
    upper = np.array(values.shape) - 0.5
    clear = np.all((np.abs(index + 0.5) > 1e-3) & (np.abs(index - upper) > 1e-3), axis=-1)  # off edges
    inside = np.all((index >= -0.5) & (index < upper), axis=-1)
    assert (inside & clear).sum() > 50 and (~inside & clear).sum() > 50  # covers part of the CT
    clamped = np.clip(index, 0, np.array(values.shape) - 1) @ affine[:3, :3].T + affine[:3, 3]
    expected = np.where(inside, linear_dose(clamped), 0.0)
    np.testing.assert_allclose(dose[clear], expected[clear], rtol=1e-4, atol=0)
    assert dose.min() >= 0


def test_dose_exactly_on_the_ct_grid_is_read_as_it_is(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path: no interpolation (not even within the affine tolerance), bytes as stored."""
    path = tiny / "cases" / "a" / "dose.nii.gz"
    nudged = AFFINE.copy()
    nudged[0, 3] = 1e-4  # within AFFINE_TOLERANCE
    rng = np.random.default_rng(1)
    save(path, rng.uniform(0, 70, (6, 5, 4)).astype(np.float32), nudged)
    monkeypatch.setattr(nifti_cases, "_resample_dose", lambda *a: pytest.fail("resampled an on-grid dose"))
    dose = nifti_cases.read_case(tiny, CaseRef("a", "train")).dense["dose"][0]
    stored = nib.as_closest_canonical(nib.load(path)).get_fdata(dtype=np.float32).transpose(2, 1, 0)
    assert dose.dtype == np.float32 and dose.tobytes() == np.ascontiguousarray(stored).tobytes()


def test_dose_grid_beyond_the_ct_holding_no_dose_there_reads(tmp_path: Path) -> None:
    """A dose grid wider than the CT is fine when (almost) all its dose lies inside the CT."""
    affine = np.array([[3.0, 0, 0, -41.0], [0, 3.0, 0, -5.0], [0, 0, 3.0, -50.0], [0, 0, 0, 1]])
    shape = (30, 25, 25)
    world = grid_world(shape, affine)
    ct_index = (world - CT_AFFINE[:3, 3]) @ np.linalg.inv(CT_AFFINE[:3, :3]).T
    in_ct = np.all((ct_index >= 0) & (ct_index <= np.array(CT_SHAPE) - 1), axis=-1)
    assert (~in_ct).mean() > 0.5
    write_rt_case(tmp_path, np.where(in_ct, 2.0, 0.0), affine)
    dose = nifti_cases.read_case(tmp_path, CaseRef("rt", "train")).dense["dose"][0]
    assert dose[2:-2, 2:-2, 2:-2] == pytest.approx(2.0)  # CT voxels more than a dose voxel from its edge


def test_dose_grid_not_overlapping_the_ct_is_refused(tmp_path: Path) -> None:
    moved = np.array([[3.0, 0, 0, 400.0], [0, 3.5, 0, 19.1], [0, 0, 4.0, -24.7], [0, 0, 0, 1]])
    write_rt_case(tmp_path, linear_dose(grid_world(DOSE_SHAPE, moved)), moved)
    with pytest.raises(
        CtanError, match=r"do not overlap \(dose grid R 398.5\.\.422.5.*CT grid R -21.0\.\.19.0"
    ) as err:
        nifti_cases.read_case(tmp_path, CaseRef("rt", "train"))
    assert_names(err, "dose.nii.gz")


def test_dose_grid_largely_outside_the_ct_is_refused(tmp_path: Path) -> None:
    """Most of the plan's dose would be cut off: the CT does not hold this dose (wrong pairing?)."""
    wide = np.array([[5.0, 0, 0, -120.0], [0, 5.0, 0, -80.0], [0, 0, 5.0, -100.0], [0, 0, 0, 1]])
    write_rt_case(tmp_path, np.ones((50, 40, 40)), wide)
    with pytest.raises(
        CtanError, match=r"\d+\.\d% of its total dose lies outside the CT grid.*wrong pairing"
    ) as err:
        nifti_cases.read_case(tmp_path, CaseRef("rt", "train"))
    assert_names(err, "dose.nii.gz")


@pytest.mark.parametrize(("share", "refused"), [(0.005, False), (0.02, True)])
def test_dose_outside_the_ct_up_to_one_percent_is_allowed(
    tmp_path: Path, share: float, refused: bool
) -> None:
    """The CT's grid with two more slabs past its last x voxel, holding ``share`` of the total dose."""
    dose = np.ones((CT_SHAPE[0] + 2, *CT_SHAPE[1:]))
    inside = dose[: CT_SHAPE[0]].sum()
    dose[CT_SHAPE[0] :] = share * inside / (1 - share) / dose[CT_SHAPE[0] :].size
    write_rt_case(tmp_path, dose, CT_AFFINE)
    if refused:
        with pytest.raises(CtanError, match=r"2\.0% of its total dose lies outside"):
            nifti_cases.read_case(tmp_path, CaseRef("rt", "train"))
    else:
        case = nifti_cases.read_case(tmp_path, CaseRef("rt", "train"))
        np.testing.assert_array_equal(case.dense["dose"][0], 1.0)  # the CT's own voxel centres


@pytest.mark.parametrize("value", [np.nan, np.inf, -1.0])
def test_bad_dose_on_its_own_grid_is_refused(tmp_path: Path, value: float) -> None:
    """Said of the file's own voxels, even one outside the CT, before any interpolation."""
    dose = linear_dose(grid_world(DOSE_SHAPE, DOSE_AFFINE))
    dose[0, 0, 0] = value
    write_rt_case(tmp_path, dose, DOSE_AFFINE)
    with pytest.raises(CtanError, match="NaN or infinite|negative") as err:
        nifti_cases.read_case(tmp_path, CaseRef("rt", "train"))
    assert_names(err, "dose.nii.gz")


@pytest.mark.realdata
def test_real_ct_with_a_coarser_offset_dose_grid(
    tmp_path: Path, example: tuple[np.ndarray, np.ndarray]
) -> None:
    """The real CT (stored S, P, L) with a 5 mm dose grid in L, P, S order over its middle, off its voxel
    centres: the dose lands where world coordinates say, the rest of the case as on its own."""
    ct, ct_affine = example
    write_case(tmp_path, "p01", ct, ct_affine, {"Bone": ct > 300})
    reference = nifti_cases.read_case(tmp_path, CaseRef("p01", "train"))
    centre = (ct_affine @ [*(np.array(ct.shape) / 2), 1])[:3]
    shape = (40, 30, 36)
    lps = np.diag([-5.0, -5.0, 5.0, 1.0])
    lps[:3, 3] = centre - lps[:3, :3] @ (np.array(shape) / 2) + [1.3, -0.7, 2.1]
    values = linear_dose(grid_world(shape, lps))
    save(tmp_path / "cases" / "p01" / "dose.nii.gz", values.astype(np.float32), lps)
    case = nifti_cases.read_case(tmp_path, CaseRef("p01", "train"))
    np.testing.assert_array_equal(case.image, reference.image)
    np.testing.assert_array_equal(case.dense["structures"], reference.dense["structures"])
    dose = case.dense["dose"][0]
    index = (our_world(case) - lps[:3, 3]) @ np.linalg.inv(lps[:3, :3]).T
    hull = np.all((index >= 0) & (index <= np.array(shape) - 1), axis=-1)
    outside = np.any((index < -0.5 - 1e-3) | (index > np.array(shape) - 0.5 + 1e-3), axis=-1)
    assert hull.sum() > 10_000 and outside.sum() > 10_000
    np.testing.assert_allclose(dose[hull], linear_dose(our_world(case)[hull]), rtol=1e-4, atol=0)
    assert not dose[outside].any()
