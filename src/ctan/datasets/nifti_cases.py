"""Bring-your-own radiotherapy cases in NIfTI: how a private set (e.g. the paper's Prostate data) is run.

Layout::

    cases/<case>/ct.nii.gz                  CT in HU
    cases/<case>/dose.nii.gz                planned dose in Gy, on the CT grid or on its own (resampled)
    cases/<case>/possible_dose_mask.nii.gz  optional; default: the body, CT > −500 HU
    cases/<case>/masks/<structure>.nii.gz   one binary mask per contoured structure (values 0 and 1 only)
    split.csv                               optional: case,split (else split by the split parameters)

The CT's grid is the case's grid. Masks (and the possible-dose mask) must share it: same shape and the
same affine (within `AFFINE_TOLERANCE` mm). Every grid must be orthogonal: a sheared affine is refused
rather than stored with a direction that is not a rotation (resample such a case onto an orthogonal grid
first).

Dose on its own grid. An RTDOSE converted to NIfTI usually has coarser voxels, another origin and a
field of view over only part of the CT: such a dose (shape or affine not the CT's) is resampled onto the
CT grid by SimpleITK's trilinear interpolation in world coordinates (voxel order and direction of either
file do not matter). A dose voxel is a box: a CT voxel centre within half a dose voxel of the outermost
dose voxel centres takes the edge value; beyond that the dose is 0 Gy. Trilinear weights are
non-negative, so non-negative dose stays non-negative (nothing is clipped); NaN, infinite, negative and
cGy doses are refused on the file's own grid and again after resampling. Refused too: a dose grid that
does not overlap the CT grid (the wrong file, or another frame of reference), and one with more than
`MAX_DOSE_OUTSIDE` of its total dose outside the CT grid (the CT does not hold the plan: wrong pairing?).
A dose on the CT grid is read as it is, without interpolation.

Masks (and the possible-dose mask) must hold only 0 and 1: a probability map or a 0/255 mask is refused
rather than thresholded silently. The structure channels are the sorted union of mask names over all
cases; a case without a mask for one of them, or whose mask is empty, has ``structure_present`` False
there (an empty contour cannot be scored).

Geometry. Arrays are reoriented to the closest canonical orientation (``nib.as_closest_canonical``, RAS+)
and then transposed to (z, y, x). Spacing, origin and direction come from the canonical affine ``A`` in
the same order: ``spacing = |A[:3, :3]| column norms reversed``, ``origin = A[:3, 3][::-1]`` and
``direction = (A[:3, :3] / spacing)[::-1, ::-1]``, so ``world = origin + direction @ (spacing * index)``
gives the NIfTI world (RAS+) coordinates of the original affine, listed in (S, A, R) order.
"""

from __future__ import annotations

import itertools
import os
import zlib
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from ctan.datasets.base import Case, CaseRef, check_dose, check_hu, check_orthogonal
from ctan.datasets.splits import assign_splits, read_split_file
from ctan.errors import CtanError
from ctan.tasks import DOSE, Task, structures_task

FORMAT = "nifti_cases"
SPATIAL_DIMS = 3
WORLD = "RAS"  # nibabel's world, listed (S, A, R) in (z, y, x) order (module docstring)
MARKER = "cases"

CLASS_NAMES: tuple[str, ...] = ()
STRUCTURES: tuple[str, ...] = ()  # defined by the data: see structure_names(root)
REQUIRED: tuple[str, ...] = ("ct", "dose")
SPLIT_FILE = "split.csv"
BODY_THRESHOLD_HU = -500.0
XFORM_AGREEMENT_MM = 0.01  # qform (quaternion, float32) and sform of one file agree to ~1e-4 mm
AFFINE_TOLERANCE = 1e-3  # mm; NIfTI stores affines as float32
MAX_DOSE_OUTSIDE = 0.01  # fraction of a dose grid's total dose that may lie outside the CT grid
NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")

TASKS: dict[str, Task] = {
    "dose": DOSE,
    # channels and class_names are set from structure_names(root) once the data is known.
    "structures": structures_task(),
}


def class_names(root: Path | None = None) -> list[str]:
    """Radiotherapy cases have no image-level classes."""
    return []


def _nifti_name(filename: str) -> str | None:
    """``Bladder.nii.gz`` -> ``Bladder``; None for files that are not NIfTI (or hidden)."""
    if filename.startswith("."):
        return None
    for suffix in NIFTI_SUFFIXES:
        if filename.endswith(suffix) and len(filename) > len(suffix):
            return filename[: -len(suffix)]
    return None


def _nifti_file(folder: Path, name: str) -> Path:
    """``folder/name.nii.gz``, or ``.nii`` where only that exists; both is refused (which one is it?)."""
    found = [path for path in (folder / f"{name}{suffix}" for suffix in NIFTI_SUFFIXES) if path.is_file()]
    if len(found) > 1:  # e.g. left by `gunzip -k`, or an older export beside a newer one
        raise CtanError(found[1], f"{found[0].name} is there too: keep one of the two")
    return found[0] if found else folder / f"{name}{NIFTI_SUFFIXES[0]}"


def _case_folders(root: Path) -> list[Path]:
    cases = Path(root) / MARKER
    if not cases.is_dir():
        raise CtanError(cases, "missing; a NIfTI case dataset holds cases/<case>/ct.nii.gz")
    folders = sorted(p for p in cases.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise CtanError(cases, "no case folders")
    seen: dict[str, Path] = {}
    for folder in folders:
        other = seen.setdefault(folder.name.casefold(), folder)
        if other != folder:  # one folder on macOS and Windows; the same patient exported twice?
            raise CtanError(
                folder, f"differs from case {other.name!r} only in letter case: the same case twice? keep one"
            )
    return folders


@lru_cache(maxsize=8)
def _structure_names_cached(root: str, signature: tuple[tuple[str, int], ...]) -> tuple[str, ...]:
    found: dict[str, Path] = {}  # name -> the first file of that name
    for case, _ in signature:
        masks = Path(root) / MARKER / case / "masks"
        if masks.is_dir():
            for entry in sorted(os.scandir(masks), key=lambda e: e.name):
                name = _nifti_name(entry.name)
                if name and entry.is_file():
                    found.setdefault(name, Path(entry.path))
    # One structure spelled two ways would become two channels, each "absent" where the other is used,
    # and neither scored there: refused, as a name with stray spaces is.
    spelled: dict[str, str] = {}
    for name in sorted(found):
        if name != name.strip():
            raise CtanError(found[name], f"structure name {name!r} has leading or trailing spaces: rename it")
        other = spelled.setdefault(name.casefold(), name)
        if other != name:
            raise CtanError(
                found[name],
                f"structure {name!r} differs from {other!r} ({found[other]}) only in case: "
                "the same structure spelled two ways? use one name in every case",
            )
    return tuple(sorted(found))


def structure_names(root: Path) -> list[str]:
    """Sorted union of the mask names over all cases: the channel order of ``structures``."""
    signature = []
    for folder in _case_folders(root):
        masks = folder / "masks"
        signature.append((folder.name, masks.stat().st_mtime_ns if masks.is_dir() else 0))
    return list(_structure_names_cached(str(Path(root)), tuple(signature)))


def list_cases(root: Path, split_params: dict | None = None) -> list[CaseRef]:
    """Every case folder with its split: from ``split.csv`` if present, else from the split parameters."""
    root = Path(root)
    folders = _case_folders(root)
    for folder in folders:
        for name in REQUIRED:
            if not _nifti_file(folder, name).is_file():
                raise CtanError(_nifti_file(folder, name), "missing (every case needs a CT and a dose)")
    ids = [f.name for f in folders]
    split_file = root / SPLIT_FILE
    if split_file.is_file():
        by_case = read_split_file(split_file, "case", ids)
    else:
        by_case = assign_splits(dict.fromkeys(ids), split_params)
    return [CaseRef(i, by_case[i]) for i in ids]


def _load(path: Path) -> nib.spatialimages.SpatialImage:
    """Open a NIfTI file, header checked and 3D (a trailing singleton 4th axis is dropped)."""
    if not path.is_file():
        raise CtanError(path, "missing")
    try:
        image = nib.load(path)
    except (
        nib.filebasedimages.ImageFileError,
        nib.spatialimages.HeaderDataError,
        OSError,
        EOFError,
        ValueError,
        zlib.error,
    ) as err:
        raise CtanError(path, f"not a readable NIfTI file: {err}") from None
    while len(image.shape) > 3 and image.shape[-1] == 1:  # (x, y, z, 1) or (x, y, z, 1, 1): one volume
        image = image.slicer[..., 0]
    if len(image.shape) != 3:
        raise CtanError(path, f"expected a 3D volume, found shape {image.shape}")
    if not np.all(np.isfinite(image.affine)) or abs(np.linalg.det(image.affine[:3, :3])) < 1e-12:
        raise CtanError(path, "the affine is degenerate (zero spacing or not finite)")
    check_orthogonal(image.affine[:3, :3], path)
    header = image.header
    if "qform_code" in header and int(header["qform_code"]) > 0 and int(header["sform_code"]) > 0:
        apart = float(np.abs(header.get_qform() - header.get_sform()).max())
        if apart > XFORM_AGREEMENT_MM:
            # nibabel reads the sform, ITK-based tools often the qform: the case would sit elsewhere in each.
            raise CtanError(
                path,
                f"its qform and sform place the voxels up to {apart:.3g} mm apart; rewrite it with the "
                "one that is right (or both equal)",
            )
    if "qform_code" in header and int(header["qform_code"]) == 0 and int(header["sform_code"]) == 0:
        # nibabel then makes up an affine (LAS, origin at the centre): dose and CT mirrored left-right
        # against a file that says where its voxels are. Analyze-era or stripped headers.
        raise CtanError(
            path,
            "says nothing of where its voxels are (qform and sform codes both 0); write it with an "
            "orientation (e.g. SimpleITK or nibabel with an affine, sform code 1 or 2)",
        )
    if "qform_code" in header and int(header["sform_code"]) == 0:
        _check_qform_voxel_sizes(path, image)
    if image.get_data_dtype().names:  # RGB(A) NIfTI: structured voxels
        kinds = ", ".join(image.get_data_dtype().names)
        raise CtanError(path, f"voxels hold {kinds} (RGB?); a CT, dose or mask has one value a voxel")
    if image.get_data_dtype().kind == "c":  # nibabel would drop the imaginary part with a warning
        raise CtanError(path, f"voxels are complex ({image.get_data_dtype()}); a CT, dose or mask is real")
    return image


def _check_qform_voxel_sizes(path: Path, image: nib.spatialimages.SpatialImage) -> None:
    """A qform (the affine in use without an sform) scales by pixdim: nibabel reads a zero voxel size as
    1 mm and a negative one as its absolute value (fixing its header copy, so the file's own is read),
    niftilib (ITK) reads both as 1 mm. Either way the spacing would be made up."""
    try:
        with nib.openers.ImageOpener(path) as fh:
            raw = type(image.header).from_fileobj(fh, check=False)
    except (OSError, EOFError, ValueError, zlib.error) as err:
        raise CtanError(path, f"not a readable NIfTI file: {err}") from None
    sizes = np.asarray(raw["pixdim"][1:4], dtype=float)
    if not (np.all(np.isfinite(sizes)) and np.all(sizes > 0)):
        raise CtanError(
            path,
            f"voxel sizes (pixdim) {', '.join(f'{v:g}' for v in sizes)} mm are not all positive, and its "
            "qform (no sform) places the voxels by them: a reader would make up the spacing; write "
            "the true voxel sizes",
        )


def _binary(image: nib.spatialimages.SpatialImage, path: Path) -> np.ndarray:
    """A mask's canonical (z, y, x) voxels as uint8, refused unless every value is 0 or 1."""
    data = _zyx(image, path)
    bad = (data != 0) & (data != 1)
    if bad.any():
        values = np.unique(data[bad])
        shown = ", ".join(f"{v:.9g}" for v in values[:3]) + (", ..." if len(values) > 3 else "")
        raise CtanError(
            path,
            f"not a binary mask: {int(bad.sum())} voxel(s) hold values other than 0 and 1 ({shown}); "
            "threshold it yourself (e.g. > 0.5 for a probability map, > 0 for 0/255)",
        )
    return data.astype(np.uint8)


def _voxels(image: nib.spatialimages.SpatialImage, path: Path, canonical: bool = True) -> np.ndarray:
    """float32 voxel data, reoriented to canonical (RAS+) or in the file's own order."""
    try:
        return (nib.as_closest_canonical(image) if canonical else image).get_fdata(dtype=np.float32)
    except (OSError, EOFError, ValueError, zlib.error) as err:
        raise CtanError(path, f"unreadable voxel data: {err}") from None


def _zyx(image: nib.spatialimages.SpatialImage, path: Path, dtype: type = np.float32) -> np.ndarray:
    """Canonical (RAS+) voxel data of an image, as a (z, y, x) array."""
    data = _voxels(image, path)
    return np.ascontiguousarray(data.transpose(2, 1, 0)).astype(dtype, copy=False)


def geometry(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(spacing, origin, direction) in (z, y, x) order of a canonical NIfTI affine (see module docstring)."""
    linear = np.asarray(affine, dtype=float)[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    direction = (linear / spacing)[::-1, ::-1]
    origin = np.asarray(affine, dtype=float)[:3, 3][::-1]
    return tuple(spacing[::-1].tolist()), tuple(origin.tolist()), tuple(direction.ravel().tolist())


def _grid_mismatch(ct: nib.spatialimages.SpatialImage, other: nib.spatialimages.SpatialImage) -> str | None:
    """How ``other``'s grid differs from the CT's, or None. Compared as every file is read, reoriented to
    canonical: a mask stored in another voxel order (LPS against the CT's RAS, say) over the same grid
    lands on the CT's voxels exactly."""
    (shape, affine), (ct_shape, ct_affine) = _canonical_grid(other), _canonical_grid(ct)
    if shape != ct_shape:
        return f"shape {other.shape} differs from the CT's {ct.shape}"
    if not np.allclose(affine, ct_affine, atol=AFFINE_TOLERANCE, rtol=0):
        return "affine differs from the CT's: not on the CT grid"
    return None


def _check_same_grid(
    ct: nib.spatialimages.SpatialImage, other: nib.spatialimages.SpatialImage, path: Path
) -> None:
    """A mask must lie on the CT's voxels: resampling a mask is a choice (nearest? a threshold?) left to
    its owner."""
    problem = _grid_mismatch(ct, other)
    if problem:
        raise CtanError(
            path,
            f"{problem}; only dose.nii.gz is resampled onto the CT grid: resample this mask onto it first "
            "(nearest neighbour)",
        )


def _extent(image: nib.spatialimages.SpatialImage) -> str:
    """World (RAS+) bounding box of a grid's voxel boxes, for messages."""
    corners = np.array(list(itertools.product(*[(-0.5, n - 0.5) for n in image.shape])))
    world = corners @ image.affine[:3, :3].T + image.affine[:3, 3]
    low, high = world.min(axis=0), world.max(axis=0)
    return ", ".join(f"{a} {lo:.1f}..{hi:.1f}" for a, lo, hi in zip("RAS", low, high, strict=True)) + " mm"


def _inside(grid: nib.spatialimages.SpatialImage, points: nib.spatialimages.SpatialImage) -> np.ndarray:
    """Which voxel centres of ``points`` lie in ``grid``'s voxel boxes (continuous index in [-0.5, n - 0.5)
    on every axis, as ITK's interpolators count inside), in ``points``' file order."""
    to_grid = np.linalg.inv(grid.affine) @ points.affine
    axes = [
        np.arange(n, dtype=float).reshape([-1 if a == b else 1 for b in range(3)])
        for a, n in enumerate(points.shape)
    ]
    inside = np.ones(points.shape, dtype=bool)
    for row, n in zip(to_grid[:3], grid.shape, strict=True):
        index = row[3] + row[0] * axes[0] + row[1] * axes[1] + row[2] * axes[2]
        inside &= (index >= -0.5) & (index < n - 0.5)
    return inside


def _itk_geometry(affine: np.ndarray) -> tuple[list[float], list[float], list[float]]:
    """(spacing, origin, direction) of a NIfTI affine for ITK. ITK calls its world LPS, but resampling
    needs only both grids in one frame: the RAS+ affines go in as they are (both in LPS: the same voxels)."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    return spacing.tolist(), affine[:3, 3].tolist(), (affine[:3, :3] / spacing).ravel().tolist()


def _resample_dose(
    ct: nib.spatialimages.SpatialImage, dose: nib.spatialimages.SpatialImage, voxels: np.ndarray
) -> np.ndarray:
    """``voxels`` (dose, file order) trilinearly onto the CT's canonical grid as (z, y, x), 0 outside."""
    moving = sitk.GetImageFromArray(np.ascontiguousarray(voxels.transpose(2, 1, 0)))  # ITK index = file's
    spacing, origin, direction = _itk_geometry(dose.affine)
    moving.SetSpacing(spacing)
    moving.SetOrigin(origin)
    moving.SetDirection(direction)
    shape, affine = _canonical_grid(ct)
    spacing, origin, direction = _itk_geometry(affine)
    resample = sitk.ResampleImageFilter()
    resample.SetSize([int(n) for n in shape])
    resample.SetOutputSpacing(spacing)
    resample.SetOutputOrigin(origin)
    resample.SetOutputDirection(direction)
    resample.SetInterpolator(sitk.sitkLinear)
    resample.SetDefaultPixelValue(0.0)
    resample.SetOutputPixelType(sitk.sitkFloat32)
    return sitk.GetArrayFromImage(resample.Execute(moving))  # ITK index (x, y, z) -> array (z, y, x)


def _dose_on_ct_grid(
    ct: nib.spatialimages.SpatialImage, dose: nib.spatialimages.SpatialImage, path: Path
) -> np.ndarray:
    """The dose in Gy on the CT's canonical (z, y, x) grid: read as it is where it already lies there,
    else resampled, after checking that the CT holds the dose grid."""
    same = _grid_mismatch(ct, dose) is None
    voxels = _zyx(dose, path) if same else _voxels(dose, path, canonical=False)
    bad = ~np.isfinite(voxels)
    if bad.any():
        raise CtanError(path, f"{int(bad.sum())} voxel(s) are NaN or infinite")
    if same:
        return voxels
    check_dose(voxels, path)  # negative or cGy: said of the file's own voxels, before interpolation
    inside = _inside(ct, dose)
    where = f"dose grid {_extent(dose)}; CT grid {_extent(ct)}"
    if not inside.any():
        raise CtanError(
            path,
            f"its grid and the CT's do not overlap ({where}): the wrong file, or a dose in another frame "
            "of reference? write the dose in the CT's world coordinates",
        )
    # Every voxel of one grid has the same volume: the fraction of dose x volume is that of the dose sums.
    total = float(voxels.sum(dtype=np.float64))
    outside = float(voxels[~inside].sum(dtype=np.float64))
    if total > 0 and outside > MAX_DOSE_OUTSIDE * total:
        raise CtanError(
            path,
            f"{outside / total:.1%} of its total dose lies outside the CT grid ({where}); the CT does not "
            "hold the dose grid: is this the dose planned on this CT (wrong pairing?)",
        )
    return _resample_dose(ct, dose, voxels)


def _canonical_grid(image: nib.spatialimages.SpatialImage) -> tuple[tuple[int, ...], np.ndarray]:
    """(shape, affine) of ``nib.as_closest_canonical(image)``, from the header alone."""
    ornt = nib.orientations.io_orientation(image.affine)
    shape = [0] * len(ornt)
    for axis, (new_axis, _) in enumerate(ornt):
        shape[int(new_axis)] = int(image.shape[axis])
    return tuple(shape), image.affine @ nib.orientations.inv_ornt_aff(ornt, image.shape)


def read_case(root: Path, ref: CaseRef) -> Case:
    """One case: CT (HU), dose (Gy), possible-dose mask and structure masks in canonical (z, y, x)."""
    root = Path(root)
    folder = root / MARKER / ref.case_id
    if not folder.is_dir():
        raise CtanError(folder, "case folder not found")
    ct_path, dose_path = _nifti_file(folder, "ct"), _nifti_file(folder, "dose")
    ct_img = _load(ct_path)
    ct = _zyx(ct_img, ct_path)
    if not np.isfinite(ct).all():
        raise CtanError(ct_path, f"{int((~np.isfinite(ct)).sum())} voxel(s) are NaN or infinite")
    check_hu(ct, ct_path)

    dose = _dose_on_ct_grid(ct_img, _load(dose_path), dose_path)
    check_dose(dose, dose_path)
    sources = [ct_path, dose_path]

    pdm_path = _nifti_file(folder, "possible_dose_mask")
    if pdm_path.is_file():
        pdm_img = _load(pdm_path)
        _check_same_grid(ct_img, pdm_img, pdm_path)
        possible = _binary(pdm_img, pdm_path)
        sources.append(pdm_path)
    else:
        possible = (ct > BODY_THRESHOLD_HU).astype(np.uint8)
    if not possible.any():  # the dose score divides by its voxels: 0/0, a case left out of the mean
        where = pdm_path if pdm_path.is_file() else ct_path
        what = "is empty" if pdm_path.is_file() else f"(the body, CT > {BODY_THRESHOLD_HU} HU) is empty"
        raise CtanError(where, f"the possible-dose mask {what}: the dose could not be scored on this case")

    names = structure_names(root)
    structures = np.zeros((len(names), *ct.shape), dtype=np.uint8)
    present = []
    for c, name in enumerate(names):
        path = _nifti_file(folder / "masks", name)
        if path.is_file():
            mask_img = _load(path)
            _check_same_grid(ct_img, mask_img, path)
            structures[c] = _binary(mask_img, path)
            sources.append(path)
        present.append(bool(structures[c].any()))

    spacing, origin, direction = geometry(nib.as_closest_canonical(ct_img).affine)
    return Case(
        case_id=ref.case_id,
        split=ref.split,
        image=ct[None],
        spacing=spacing,
        origin=origin,
        direction=direction,
        dense={"dose": dose[None], "possible_dose_mask": possible[None], "structures": structures},
        structure_present=tuple(present),
        sources=tuple(sources),
    )
