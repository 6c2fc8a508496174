"""`ctan preprocess`: resampling keeps world coordinates, and real samples survive it voxel for voxel.

Real-data tests go through the CLI the way users do (`ctan download` a shared sample, `ctan preprocess`)
and check the stores against an independent reading of the source files.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
import yaml
from PIL import Image
from skimage.transform import resize

from ctan.cli import main
from ctan.datasets.base import Case
from ctan.manifest import verify_stores
from ctan.preprocess.intensity import normalise_ct, normalise_rgb
from ctan.preprocess.resample import crop_or_pad, resample_case, resampled_shape
from ctan.provenance import file_sha256
from ctan.store import SplitStore

REPO = Path(__file__).resolve().parents[1]
OPENKBP_STRUCTURES = [
    "Brainstem",
    "SpinalCord",
    "RightParotid",
    "LeftParotid",
    "Esophagus",
    "Larynx",
    "Mandible",
    "PTV56",
    "PTV63",
    "PTV70",
]

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------------
# Helpers


def shared_sha(shared_data: Path, name: str) -> str:
    for line in (shared_data / "SHA256SUMS").read_text().splitlines():
        digest, file = line.split()
        if file == name:
            return digest
    raise KeyError(name)


def params_args(tmp_path: Path, datasets: dict) -> list[str]:
    """--params arguments: the repository's params.yaml plus an override with every path in tmp_path."""
    override = {
        "run": {"datasets": list(datasets)},
        "paths": {k: str(tmp_path / k) for k in ("raw", "preprocessed", "models", "results")},
        "datasets": datasets,
    }
    path = tmp_path / "params.override.yaml"
    path.write_text(yaml.safe_dump(override))
    return ["--params", str(REPO / "params.yaml"), "--params", str(path)]


def ctan_ok(*argv: str) -> None:
    assert main(list(argv)) == 0, argv


def case_3d(shape=(6, 8, 10), spacing=(2.0, 1.0, 1.5), origin=(5.0, -3.0, 7.0), direction=None) -> Case:
    """A CT whose value is the world z coordinate, so where each voxel sits can be read off its value."""
    direction = np.eye(3) if direction is None else np.asarray(direction, float)
    idx = np.indices(shape).reshape(3, -1).T * np.asarray(spacing)
    world = (np.asarray(origin) + idx @ direction.T).T.reshape(3, *shape)
    mask = np.zeros((2, *shape), np.uint8)
    mask[0, 1:4, 2:6, 3:8] = 1
    return Case(
        case_id="c",
        split="train",
        image=world[0][None].astype(np.float32),
        spacing=tuple(spacing),
        origin=tuple(origin),
        direction=tuple(direction.ravel()),
        dense={"dose": world[1][None].astype(np.float32), "structures": mask},
    )


def world_of(attrs_or_case, index_zyx: np.ndarray) -> np.ndarray:
    """World coordinates (z, y, x order) of voxel indices under ctan's geometry convention."""
    if isinstance(attrs_or_case, Case):
        sp, og, dr = attrs_or_case.spacing, attrs_or_case.origin, attrs_or_case.direction
    else:
        sp, og, dr = attrs_or_case["spacing"], attrs_or_case["origin"], attrs_or_case["direction"]
    d = np.asarray(dr, float).reshape(3, 3)
    return np.asarray(og, float) + (np.asarray(index_zyx, float) * np.asarray(sp, float)) @ d.T


# ----------------------------------------------------------------------------------------------------
# Resampling and intensity (pure functions, hand-checked values)


def test_native_grid_is_bit_for_bit():
    case = case_3d()
    out = resample_case(case, None, None)
    assert out.image is case.image and out.dense["dose"] is case.dense["dose"]
    assert out.spacing == case.spacing and out.origin == case.origin


def test_same_spacing_is_bit_for_bit():
    case = case_3d()
    out = resample_case(case, case.spacing, None)
    assert np.array_equal(out.image, case.image) and np.array_equal(
        out.dense["structures"], case.dense["structures"]
    )
    assert out.origin == case.origin


def test_halving_resolution_shifts_origin_by_half_the_spacing_change():
    case = case_3d(shape=(4, 4, 4), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
    out = resample_case(case, (2.0, 2.0, 2.0), None)
    assert out.image.shape == (1, 2, 2, 2)
    assert out.spacing == (2.0, 2.0, 2.0)
    assert out.origin == pytest.approx((0.5, 0.5, 0.5))  # (2 - 1) / 2 along each axis
    # Voxel (0,0,0) now averages old voxels 0 and 1: world z 0.5, which the geometry also says.
    assert out.image[0, 0, 0, 0] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "direction",
    [np.eye(3), np.diag([1.0, -1.0, 1.0]), [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]]],
    ids=["identity", "flipped-y", "rotated"],
)
def test_resampling_preserves_world_coordinates(direction):
    """Trilinear interpolation reproduces a linear field exactly: every interior voxel's value must be the
    world z (and y) coordinate its geometry gives it, whatever the direction cosines."""
    case = case_3d(shape=(12, 14, 16), spacing=(2.0, 1.0, 1.5), origin=(5.0, -3.0, 7.0), direction=direction)
    for spacing, shape in [((3.0, 0.7, 2.5), None), ((3.0, 0.7, 2.5), (6, 30, 7)), (None, (9, 10, 11))]:
        out = resample_case(case, spacing, shape)
        assert out.direction == case.direction
        idx = np.indices(out.spatial_shape).reshape(3, -1).T
        world = world_of(out, idx)
        # Interior voxels only: outside the source's voxel centres trilinear clamps, and padding is -1024.
        old_idx = (world - np.asarray(case.origin)) @ np.asarray(direction, float) / np.asarray(case.spacing)
        inside = np.all((old_idx >= 0) & (old_idx <= np.asarray(case.spatial_shape) - 1), axis=1)
        assert inside.sum() > 50
        assert np.allclose(out.image[0].reshape(-1)[inside], world[inside, 0], atol=1e-3)
        assert np.allclose(out.dense["dose"][0].reshape(-1)[inside], world[inside, 1], atol=1e-3)
        assert set(np.unique(out.dense["structures"])) <= {0, 1}
        assert out.dense["structures"].dtype == np.uint8


def test_crop_and_pad_fill_values_and_origin():
    case = case_3d(shape=(4, 6, 8), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
    out = resample_case(case, (1.0, 1.0, 1.0), (6, 6, 4))
    assert out.image.shape == (1, 6, 6, 4)
    assert np.all(out.image[0, 0] == -1024) and np.all(out.image[0, -1] == -1024)  # CT padded with air
    assert np.all(out.dense["dose"][0, 0] == 0)  # everything else with 0
    assert out.origin == pytest.approx((-1.0, 0.0, 2.0))  # pad 1 in z, crop 2 in x
    assert np.array_equal(out.image[0, 1:5], case.image[0, :, :, 2:6])


def test_crop_or_pad_reports_where_the_new_grid_starts():
    array = np.arange(10, dtype=np.float32)[None, None, None, :].repeat(3, 1).repeat(3, 2)
    out, start = crop_or_pad(array, (3, 3, 4), 0)
    assert list(start) == [0, 0, 3] and list(out[0, 0, 0]) == [3, 4, 5, 6]
    out, start = crop_or_pad(array, (5, 3, 10), -1)
    assert list(start) == [-1, 0, 0] and np.all(out[:, 0] == -1)


def test_resampled_shape_survives_float_rounding():
    assert resampled_shape((128,), (3.906,), (1.953,)) == (256,)
    assert resampled_shape((101,), (3.0,), (4.0,)) == (75,)


def test_2d_resize_keeps_rgb_and_mask_types():
    rgb = np.zeros((3, 30, 40), np.uint8)
    rgb[:, 4:14, 10:30] = 200
    mask = np.zeros((1, 90, 120), np.uint8)  # the mask may come on a finer grid than the picture
    mask[:, 12:42, 30:90] = 1
    case = Case("i", "train", rgb, (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), dense={"lesion": mask})
    out = resample_case(case, None, (15, 20))
    assert out.image.dtype == np.uint8 and out.image.shape == (3, 15, 20)
    assert out.dense["lesion"].shape == (1, 15, 20) and set(np.unique(out.dense["lesion"])) == {0, 1}
    assert np.array_equal(out.dense["lesion"][0] == 1, out.image[0] > 100)
    assert out.spacing == (2.0, 2.0) and out.origin == pytest.approx((0.5, 0.5))


def test_intensity_normalisation():
    hu = np.array([-2000.0, -1000.0, 250.0, 1500.0, 3000.0], np.float32)
    assert normalise_ct(hu, [-1000, 1500]).tolist() == pytest.approx([0, 0, 0.5, 1, 1])
    assert normalise_ct(hu, [-1000, 1500]).dtype == np.float32
    assert torch.allclose(normalise_ct(torch.from_numpy(hu), (-1000, 1500)), torch.tensor([0, 0, 0.5, 1, 1]))
    rgb = np.array([0, 51, 255], np.uint8)
    assert normalise_rgb(rgb).tolist() == pytest.approx([0, 0.2, 1])
    assert normalise_rgb(torch.from_numpy(rgb)).dtype == torch.float32
    with pytest.raises(ValueError):
        normalise_ct(hu, [1, 1])


# ----------------------------------------------------------------------------------------------------
# OpenKBP: the stores equal the challenge CSVs voxel for voxel


def read_openkbp_patient(folder: Path) -> dict[str, np.ndarray]:
    """The OpenKBP reference reading (sparse CSV -> np.unravel_index into the 128³ grid), done here
    independently of ctan, then put in ctan's documented (z, y, x) order:
    ours[z, y, x] = raw[y, x, 127 - z]."""

    def volume(name: str, mask: bool) -> np.ndarray:
        table = pd.read_csv(folder / f"{name}.csv", index_col=0)
        raw = np.zeros((128, 128, 128), np.float64)
        raw[np.unravel_index(table.index.to_numpy(), raw.shape)] = 1 if mask else table["data"].to_numpy()
        return np.moveaxis(raw, 2, 0)[::-1]

    dims = np.loadtxt(folder / "voxel_dimensions.csv")
    structures = [
        volume(s, True) if (folder / f"{s}.csv").exists() else np.zeros((128,) * 3)
        for s in OPENKBP_STRUCTURES
    ]
    return {
        "image": (volume("ct", False) - 1024)[None].astype(np.float32),  # ct.csv holds HU + 1024
        "dose": volume("dose", False)[None].astype(np.float32),
        "possible_dose_mask": volume("possible_dose_mask", True)[None].astype(np.uint8),
        "structures": np.stack(structures).astype(np.uint8),
        "spacing": [dims[2], dims[0], dims[1]],
        "present": [(folder / f"{s}.csv").exists() for s in OPENKBP_STRUCTURES],
    }


def check_openkbp_patient(pre: Path, raw_root: Path, split: str, folder: str, patient: str) -> None:
    expected = read_openkbp_patient(raw_root / "provided-data" / folder / patient)
    got = SplitStore.open(pre / f"{split}.zarr").read_case(patient)
    for name in ("image", "dose", "possible_dose_mask", "structures"):
        assert got[name].dtype == expected[name].dtype, name
        assert np.array_equal(got[name], expected[name]), name
    attrs = got["attrs"]
    assert attrs["spacing"] == pytest.approx(expected["spacing"]) == attrs["source_spacing"]
    assert attrs["structure_present"] == expected["present"]
    assert attrs["source_shape"] == [128, 128, 128]


SUBSET = {"train-pats/pt_1", "train-pats/pt_3", "validation-pats/pt_201", "test-pats/pt_242"}


@pytest.fixture(scope="session")
def openkbp_subset(shared_data: Path, request) -> tuple[Path, str]:
    """Four patients of the real sample, re-tarred; (archive, sha256). Cut once (one pass over the
    .tar.xz, ~6 s) and kept in pytest's cache, keyed by the sample's digest."""
    sample = shared_data / "openkbp-sample.tar.xz"
    folder = request.config.cache.mkdir(f"ctan-openkbp-subset-{shared_sha(shared_data, sample.name)[:16]}")
    out = folder / "openkbp-subset.tar.gz"
    if not out.is_file():
        partial = folder / "partial.tar.gz"
        with tarfile.open(sample, "r|xz") as src, tarfile.open(partial, "w:gz", compresslevel=1) as dst:
            for member in src:
                parts = member.name.split("/")
                if len(parts) <= 3 or "/".join(parts[2:4]) in SUBSET:
                    dst.addfile(member, src.extractfile(member) if member.isfile() else None)
        partial.replace(out)
    return out, file_sha256(out)


def openkbp_dataset(source: Path, sha: str) -> dict:
    return {
        "format": "openkbp",
        "source": str(source),
        "sha256": sha,
        "tasks": ["dose", "structures"],
        "preprocess": {"spacing": None, "shape": None, "ct_window": [-1000, 1500]},
    }


@pytest.mark.realdata
def test_openkbp_subset_equals_csv_voxel_for_voxel(openkbp_subset, tmp_path, capsys):
    archive, sha = openkbp_subset
    args = params_args(tmp_path, {"okbp": openkbp_dataset(archive, sha)})
    ctan_ok("download", *args, "okbp")
    ctan_ok("preprocess", *args, "okbp")
    raw, pre = tmp_path / "raw" / "okbp", tmp_path / "preprocessed" / "okbp"
    source = json.loads((raw / "source.json").read_text())
    assert source["sha256"] == sha and source["root"] == "open-kbp-sample"
    root = raw / "open-kbp-sample"
    check_openkbp_patient(pre, root, "train", "train-pats", "pt_3")  # no Mandible, Esophagus, Larynx
    check_openkbp_patient(pre, root, "test", "test-pats", "pt_242")  # no Mandible, PTV63

    manifest = json.loads((pre / "manifest.json").read_text())
    assert [(c["split"], c["case_id"]) for c in manifest["cases"]] == [
        ("train", "pt_1"),
        ("train", "pt_3"),
        ("validation", "pt_201"),
        ("test", "pt_242"),
    ]
    assert manifest["source_sha256"] == sha and manifest["structure_names"] == OPENKBP_STRUCTURES
    # plan.json: what was done, from what (OpenKBP's 128³ grid, 3.9 x 3.9 x ~2.5 mm voxels, kept as is).
    plan = json.loads((pre / "plan.json").read_text())
    fp = plan["source_fingerprint"]
    assert fp["cases"] == 4 and fp["shape"]["median"] == [128, 128, 128]
    assert fp["spacing_mm"]["min"][1] == pytest.approx(3.906, abs=0.01)
    assert plan["target_grid"] == {"spacing_mm": None, "shape": None}
    assert plan["intensity"] == {"ct_window": [-1000.0, 1500.0]} and plan["spatial_dims"] == 3
    assert "trilinear" in plan["resampling"]["image"] and "nearest" in plan["resampling"]["masks"]
    ct = "open-kbp-sample/provided-data/train-pats/pt_3/ct.csv"
    assert manifest["cases"][1]["sources"][ct] == file_sha256(raw / ct)
    assert verify_stores(pre) == []
    store = SplitStore.open(pre / "train.zarr")
    assert store.attrs["case_ids"] == ["pt_1", "pt_3"] and store.attrs["intensity"] == {
        "ct_window": [-1000, 1500]
    }

    # Running both again changes nothing and says so.
    capsys.readouterr()
    ctan_ok("download", *args, "okbp")
    ctan_ok("preprocess", *args, "okbp")
    assert "nothing to do" in capsys.readouterr().out


@pytest.mark.realdata
@pytest.mark.slow
def test_openkbp_full_sample_equals_csv(shared_data, tmp_path):
    """All 70 patients of the real archive (about a minute on 2 cores)."""
    archive = shared_data / "openkbp-sample.tar.xz"
    args = params_args(tmp_path, {"okbp": openkbp_dataset(archive, shared_sha(shared_data, archive.name))})
    ctan_ok("download", *args, "okbp")
    ctan_ok("preprocess", *args, "okbp")
    pre, root = tmp_path / "preprocessed" / "okbp", tmp_path / "raw" / "okbp" / "open-kbp-sample"
    manifest = json.loads((pre / "manifest.json").read_text())
    splits = pd.Series([c["split"] for c in manifest["cases"]]).value_counts().to_dict()
    assert splits == {"train": 40, "validation": 10, "test": 20}
    check_openkbp_patient(pre, root, "train", "train-pats", "pt_47")
    check_openkbp_patient(pre, root, "validation", "validation-pats", "pt_209")


# ----------------------------------------------------------------------------------------------------
# HAM10000: picture and lesion mask stay aligned through resizing

HAM_SHAPE = [48, 64]  # the 4:3 aspect of the released 600×450 pictures


def check_ham_alignment(pre: Path, root: Path) -> None:
    """Each stored mask (1) equals the native-resolution mask file resized straight to the target, and
    (2) covers the darker part of the stored picture (lesions are darker than skin) better than the
    same mask flipped would: a flipped, transposed or shifted mask fails one of the two."""
    wins, contrasts, checked = 0, [], 0
    for split in ("train", "validation", "test"):
        store = SplitStore.open(pre / f"{split}.zarr")
        for image_id in store.case_ids:
            got = store.read_case(image_id)
            lesion = got["lesion"][0].astype(bool)
            mask_file = root / "HAM10000_segmentations_lesion_tschandl" / f"{image_id}_segmentation.png"
            native = np.asarray(Image.open(mask_file).convert("L"))  # some masks are inverted palettes
            direct = resize(native > 127, HAM_SHAPE, order=0, anti_aliasing=False)
            iou = (lesion & direct).sum() / max(1, (lesion | direct).sum())
            assert iou > 0.9, (image_id, iou)
            assert got["attrs"]["source_shape"] == list(
                np.asarray(Image.open(root / "HAM10000_images" / f"{image_id}.jpg")).shape[:2]
            )

            gray = got["image"].astype(float).mean(0)
            flipped = lesion[::-1, ::-1]
            if not lesion.any() or lesion.all() or (lesion & flipped).sum() / (lesion | flipped).sum() > 0.5:
                continue  # a centred, symmetric lesion cannot tell the two apart
            contrast = gray[~lesion].mean() - gray[lesion].mean()
            wins += contrast > gray[~flipped].mean() - gray[flipped].mean()
            contrasts.append(contrast)
            checked += 1
    assert checked >= 10
    assert wins / checked >= 0.75, (wins, checked)
    assert np.median(contrasts) > 5


def ham_dataset(source: Path, sha: str | None) -> dict:
    return {
        "format": "ham10000",
        "source": str(source),
        "sha256": sha,
        "tasks": ["lesion", "diagnosis"],
        "preprocess": {"shape": HAM_SHAPE},
    }


@pytest.mark.realdata
def test_ham10000_fullres_mask_stays_aligned(shared_data, tmp_path):
    archive = shared_data / "ham10000-fullres.tar.gz"
    args = params_args(tmp_path, {"ham": ham_dataset(archive, shared_sha(shared_data, archive.name))})
    ctan_ok("download", *args, "ham")
    ctan_ok("preprocess", *args, "ham")
    pre = tmp_path / "preprocessed" / "ham"
    check_ham_alignment(pre, tmp_path / "raw" / "ham" / "ham10000-fullres")
    manifest = json.loads((pre / "manifest.json").read_text())
    assert len(manifest["cases"]) == 68 and manifest["spatial_dims"] == 2
    assert SplitStore.open(pre / "test.zarr").attrs["intensity"] == {"scale": 255}


@pytest.mark.realdata
def test_ham10000_sample_small_pictures_big_masks(shared_data, tmp_path):
    """The sample pairs 200×150 pictures with 600×450 masks; a 60-image subset passed as a folder."""
    with tarfile.open(shared_data / "ham10000-sample.tar.gz") as tf:
        tf.extractall(tmp_path / "x", filter="data")
    full, subset = tmp_path / "x" / "ham10000-sample", tmp_path / "subset"
    meta = pd.read_csv(full / "HAM10000_metadata.csv").head(60)
    for folder in ("HAM10000_images", "HAM10000_segmentations_lesion_tschandl"):
        (subset / folder).mkdir(parents=True)
    for image_id in meta["image_id"]:
        shutil.copy(full / "HAM10000_images" / f"{image_id}.jpg", subset / "HAM10000_images")
        name = f"{image_id}_segmentation.png"
        shutil.copy(
            full / "HAM10000_segmentations_lesion_tschandl" / name,
            subset / "HAM10000_segmentations_lesion_tschandl",
        )
    meta.to_csv(subset / "HAM10000_metadata.csv", index=False)

    args = params_args(tmp_path, {"ham": ham_dataset(subset, None)})
    ctan_ok("download", *args, "ham")
    ctan_ok("preprocess", *args, "ham")
    check_ham_alignment(tmp_path / "preprocessed" / "ham", subset)
    plan = json.loads((tmp_path / "preprocessed" / "ham" / "plan.json").read_text())
    assert plan["source_fingerprint"]["cases"] == 60 and plan["spatial_dims"] == 2
    assert plan["source_fingerprint"]["shape"]["median"] == [150, 200]  # the pictures, not the masks
    assert plan["intensity"] == {"scale": 255} and plan["training_patch_size"] is None


# ----------------------------------------------------------------------------------------------------
# Real CT geometry: MetaImage (STOIC reader) and NIfTI (bring-your-own reader)


def mass_weights(hu: np.ndarray) -> np.ndarray:
    """Density above air. Its centroid is a landmark that linear resampling keeps in place (a thresholded
    structure is not: thin bone vanishes unevenly when averaged into coarser voxels)."""
    return np.clip(np.asarray(hu, dtype=np.float64) + 1000, 0, None)


def centroid_index(weights: np.ndarray) -> np.ndarray:
    """Weighted centroid of an array, as a continuous index in the array's axis order."""
    grids = np.indices(weights.shape, sparse=True)
    return np.array([(g * weights).sum() for g in grids]) / weights.sum()


def mass_centroid_world_itk(image: sitk.Image) -> np.ndarray:
    """World (x, y, z) of the body's mass centroid, by SimpleITK's own index-to-world map."""
    centroid_zyx = centroid_index(mass_weights(sitk.GetArrayViewFromImage(image)))
    return np.asarray(image.TransformContinuousIndexToPhysicalPoint(centroid_zyx[::-1].tolist()))


def store_as_itk(array: np.ndarray, attrs: dict) -> sitk.Image:
    """A stored (z, y, x) volume as a SimpleITK image, with ctan's geometry put back in ITK's (x, y, z)."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(attrs["spacing"][::-1])
    image.SetOrigin(attrs["origin"][::-1])
    image.SetDirection(np.asarray(attrs["direction"]).reshape(3, 3)[::-1, ::-1].ravel().tolist())
    return image


@pytest.mark.realdata
def test_real_mha_keeps_spacing_direction_and_world_position(shared_data, tmp_path):
    """Two real chest CTs, one also with an oblique (30° about z) direction written into its header."""
    root = tmp_path / "stoic"
    (root / "data" / "mha").mkdir(parents=True)
    (root / "metadata").mkdir()
    reference = pd.read_csv(shared_data / "stoic" / "reference.csv").head(3)
    ids = [str(i) for i in reference["PatientID"]]
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    sources = {}
    for patient, (name, direction) in zip(
        ids,
        [
            ("Lung_Dx-A0001_128", None),
            ("Lung_Dx-A0002_128", None),
            ("Lung_Dx-A0002_128", (c, -s, 0, s, c, 0, 0, 0, 1)),
        ],
        strict=True,
    ):
        image = sitk.ReadImage(str(shared_data / "ct-samples" / f"{name}.mha"))
        if direction is not None:
            # 1 HU more: the same scan in two splits is refused as a leak (ctan.leakage).
            image = sitk.Add(image, 1)
            image.SetDirection(direction)
        sitk.WriteImage(image, str(root / "data" / "mha" / f"{patient}.mha"))
        sources[patient] = image
    reference.to_csv(root / "metadata" / "reference.csv", index=False)
    pd.DataFrame({"PatientID": ids, "split": ["train", "validation", "test"]}).to_csv(
        root / "split.csv", index=False
    )

    dataset = {
        "format": "stoic",
        "source": str(root),
        "tasks": ["covid", "severity"],
        # 128×128 × 3.4 mm and 2.6 mm in-plane -> 62 and 48 voxels, padded to 64; 64 × 5 mm and 30 × 8 mm
        # slices -> 40 and 30, padded to 40.
        "preprocess": {"spacing": [8.0, 7.0, 7.0], "shape": [40, 64, 64], "ct_window": [-1000, 500]},
    }
    args = params_args(tmp_path, {"stoic": dataset})
    ctan_ok("download", *args, "stoic")
    ctan_ok("preprocess", *args, "stoic")
    pre = tmp_path / "preprocessed" / "stoic"
    for patient, split in zip(ids, ["train", "validation", "test"], strict=True):
        got = SplitStore.open(pre / f"{split}.zarr").read_case(patient)
        attrs, source = got["attrs"], sources[patient]
        assert attrs["source_spacing"] == pytest.approx(source.GetSpacing()[::-1])
        assert attrs["source_origin"] == pytest.approx(source.GetOrigin()[::-1])
        itk_direction = np.asarray(source.GetDirection()).reshape(3, 3)
        assert np.allclose(np.asarray(attrs["source_direction"]).reshape(3, 3)[::-1, ::-1], itk_direction)
        assert attrs["direction"] == attrs["source_direction"] and attrs["spacing"] == [8.0, 7.0, 7.0]
        assert got["image"].shape == (1, 40, 64, 64)
        before = mass_centroid_world_itk(source)
        after = mass_centroid_world_itk(store_as_itk(got["image"][0], attrs))
        # Within half a voxel of the new grid (measured: well under 1 mm).
        assert np.all(np.abs(after - before) < np.asarray(attrs["spacing"][::-1]) / 2), (
            patient,
            before,
            after,
        )


@pytest.mark.realdata
def test_real_nifti_keeps_its_affine(shared_data, tmp_path):
    """The real CT with a synthetic dose blob on its affine: bone and dose peak keep their RAS position."""
    ct = nib.load(shared_data / "nifti" / "example_ct.nii.gz")
    ijk = np.indices(ct.shape).reshape(3, -1).T
    ras = nib.affines.apply_affine(ct.affine, ijk)
    centre = ras.mean(0) + [20.0, -10.0, 15.0]
    dose = 60 * np.exp(-((ras - centre) ** 2).sum(1) / (2 * 25.0**2)).reshape(ct.shape)
    root = tmp_path / "byo"
    for i, case in enumerate(("a", "b", "c")):
        folder = root / "cases" / case
        (folder / "masks").mkdir(parents=True)
        if i == 0:
            shutil.copy(shared_data / "nifti" / "example_ct.nii.gz", folder / "ct.nii.gz")
        else:  # i HU more: the same scan in two splits is refused as a leak (ctan.leakage)
            nib.save(
                nib.Nifti1Image(np.asanyarray(ct.dataobj) + i, ct.affine, ct.header), folder / "ct.nii.gz"
            )
        nib.save(nib.Nifti1Image(dose.astype(np.float32), ct.affine), folder / "dose.nii.gz")
        nib.save(nib.Nifti1Image((dose > 30).astype(np.uint8), ct.affine), folder / "masks" / "PTV.nii.gz")
    pd.DataFrame({"case": ["a", "b", "c"], "split": ["train", "validation", "test"]}).to_csv(
        root / "split.csv", index=False
    )
    dataset = {
        "format": "nifti_cases",
        "source": str(root),
        "tasks": ["dose", "structures"],
        # 3 mm -> 6 mm gives 61×50×56 voxels: z padded to 64, y cropped to 48 (air only), x padded.
        "preprocess": {"spacing": [6.0, 6.0, 6.0], "shape": [64, 48, 64], "ct_window": [-1000, 1500]},
    }
    args = params_args(tmp_path, {"byo": dataset})
    ctan_ok("download", *args, "byo")
    ctan_ok("preprocess", *args, "byo")
    got = SplitStore.open(tmp_path / "preprocessed" / "byo" / "train.zarr").read_case("a")
    attrs = got["attrs"]
    assert got["image"].shape == (1, 64, 48, 64)

    def ras_before(weights: np.ndarray) -> np.ndarray:
        return nib.affines.apply_affine(ct.affine, centroid_index(weights))

    def ras_after(weights: np.ndarray) -> np.ndarray:
        return world_of(attrs, centroid_index(weights))[::-1]  # ctan lists world coordinates as (S, A, R)

    half_voxel = np.asarray(attrs["spacing"][::-1]) / 2
    body_before = ras_before(mass_weights(np.asanyarray(ct.dataobj)))
    body_after = ras_after(mass_weights(got["image"][0]))
    assert np.all(np.abs(body_after - body_before) < half_voxel), (body_before, body_after)
    hot_before = ras_before(np.where(dose > 30, dose, 0))
    hot_after = ras_after(np.where(got["dose"][0] > 30, got["dose"][0], 0))
    assert np.all(np.abs(hot_after - hot_before) < half_voxel), (hot_before, hot_after)
    assert np.allclose(hot_after, centre, atol=0.5)
    # The affine stored as source geometry is the NIfTI's (canonical RAS here): spacing 3 mm, origin.
    assert attrs["source_spacing"] == pytest.approx([3.0, 3.0, 3.0])
    assert attrs["source_origin"] == pytest.approx(ct.affine[:3, 3][::-1].tolist())


# ----------------------------------------------------------------------------------------------------
# Re-running


def test_preprocess_is_guarded_against_other_parameters(tmp_path, capsys):
    dataset = {
        "format": "ham10000",
        "source": "demo",
        "demo": {"train": 3, "validation": 1, "test": 1, "seed": 4},
        "tasks": ["lesion", "diagnosis"],
        "preprocess": {"shape": [16, 16]},
    }
    args = params_args(tmp_path, {"ham": dataset})
    ctan_ok("download", *args, "ham")
    ctan_ok("preprocess", *args, "ham")
    pre = tmp_path / "preprocessed" / "ham"
    first = json.loads((pre / "manifest.json").read_text())

    args = params_args(tmp_path, {"ham": {**dataset, "preprocess": {"shape": [24, 24]}}})
    capsys.readouterr()
    assert main(["preprocess", *args, "ham"]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert json.loads((pre / "manifest.json").read_text()) == first  # untouched

    ctan_ok("preprocess", *args, "ham", "--force")
    second = json.loads((pre / "manifest.json").read_text())
    assert second["params_hash"] != first["params_hash"] and second["data_hash"] != first["data_hash"]
    store = SplitStore.open(pre / "train.zarr")
    assert store.array(store.case_ids[0], "image").shape == (3, 24, 24)
    assert sorted(p.name for p in pre.parent.iterdir()) == ["ham"]


def test_a_split_without_a_class_is_noted():
    """A small or skewed dataset's computed split can leave a diagnosis out of a split: said, not silent."""
    from ctan.datasets import ham10000
    from ctan.preprocess.pipeline import absent_classes

    diagnosis = ham10000.TASKS["diagnosis"]
    every = [{"diagnosis": i} for i in range(7)]
    labels = {"train": every, "validation": every, "test": [{"diagnosis": 0}, {"diagnosis": 5}]}
    (note,) = absent_classes(labels, [ham10000.TASKS["lesion"], diagnosis])
    assert note.startswith("the test split has no diagnosis bcc, bkl, df, mel, vasc (2 cases)")
    assert absent_classes({"train": every, "test": every}, [diagnosis]) == []
