"""Small synthetic datasets written in each dataset's real on-disk format.

Why: the default pipeline must run offline in minutes, yet go through the very readers that the real
data use. So the generator writes files, not arrays: OpenKBP sparse CSVs on the 128³ grid, NIfTI cases
with a scanner-like affine, HAM10000 JPEGs with PNG masks, STOIC MetaImages with ``reference.csv``.

Each phantom is drawn so that the two tasks of a dataset share information, which is what multi-task
learning exploits: dose is planned on targets that are visible on the CT; a skin lesion's diagnosis sets
its size, elongation, border irregularity and colour; ground-glass opacities decide COVID-19 and their
extent decides severity.

The output is a pure function of ``seed`` and ``counts``: byte-identical files for the same arguments
(fixed JPEG quality, no timestamps, gzip mtime 0 in nibabel). Each case draws from its own random
stream, keyed by its split and position, so its content does not change when other splits grow (its
name may, where names are drawn at random as in the real data).

Formats without an official split get a split file that the readers honour: ``split.csv`` (image_id,
split) for ham10000, ``split.csv`` (case, split) for nifti_cases and ``split.csv`` (PatientID, split)
for stoic, each at the dataset root; OpenKBP's split is its folder layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import SimpleITK as sitk
from PIL import Image
from scipy import ndimage

from ctan.datasets import openkbp
from ctan.datasets.base import SPLITS
from ctan.errors import CtanError

# A fixed number per format keeps the random streams of different formats apart for the same seed.
_STREAM = {"openkbp": 1, "nifti_cases": 2, "ham10000": 3, "stoic": 4}


def generate(format: str, root: Path, counts: dict[str, int], seed: int) -> Path:
    """Write a demo dataset of ``format`` into the empty folder ``root``; return ``root``.

    ``counts`` gives the number of cases per split (keys train, validation, test; other keys such as
    ``seed`` are ignored, so a params ``demo:`` section can be passed as is).
    """
    if format not in _GENERATORS:
        raise CtanError(None, f"no demo generator for format {format!r}; known: {', '.join(_GENERATORS)}")
    root = Path(root)
    n = {}
    for split in SPLITS:
        value = counts.get(split)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CtanError(None, f"demo counts need a positive integer for {split!r}, got {value!r}")
        n[split] = value
    if root.exists() and any(root.iterdir()):
        raise CtanError(root, "the demo generator writes into an empty folder, and this one is not empty")
    root.mkdir(parents=True, exist_ok=True)
    _GENERATORS[format](root, n, int(seed))
    return root


def _rng(seed: int, format: str, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAM[format], *keys])


def _case_splits(counts: dict[str, int]) -> list[tuple[str, int]]:
    """(split, index within split) for every case, in split order."""
    return [(split, i) for split in SPLITS for i in range(counts[split])]


def _stratified(rng: np.random.Generator, n: int, classes: list[int], weights: list[float]) -> np.ndarray:
    """``n`` labels in proportion to ``weights``, each class at least once where ``n`` allows; shuffled."""
    quota = np.floor(np.asarray(weights) / sum(weights) * n).astype(int)
    quota[: min(n, len(classes))] = np.maximum(quota[: min(n, len(classes))], 1)
    while quota.sum() > n:
        quota[np.argmax(quota)] -= 1
    order = np.argsort(-np.asarray(weights), kind="stable")
    i = 0
    while quota.sum() < n:
        quota[order[i % len(order)]] += 1
        i += 1
    labels = np.repeat(classes, quota)
    return rng.permutation(labels)


# --------------------------------------------------------------------------------------------------
# Phantom geometry in patient coordinates (mm): X to the patient's left, Y posterior, Z superior (LPS).


@dataclass(frozen=True)
class _Grid:
    """Patient coordinates of every voxel, as arrays broadcastable to the on-disk array's shape."""

    X: np.ndarray
    Y: np.ndarray
    Z: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return np.broadcast_shapes(self.X.shape, self.Y.shape, self.Z.shape)


def _rho(g: _Grid, centre: tuple[float, float, float], radii: tuple[float, float, float]) -> np.ndarray:
    """Normalised ellipsoid radius: <= 1 inside; ``(rho - 1) * mean(radii)`` approximates mm outside."""
    return np.sqrt(
        ((g.X - centre[0]) / radii[0]) ** 2
        + ((g.Y - centre[1]) / radii[1]) ** 2
        + ((g.Z - centre[2]) / radii[2]) ** 2
    )


def _distance_outside(g: _Grid, centre, radii) -> np.ndarray:
    return np.maximum(_rho(g, centre, radii) - 1.0, 0.0) * float(np.mean(radii))


def _tube(g: _Grid, x: float, y: float, r: float, z_lo: float, z_hi: float) -> np.ndarray:
    """A cylinder along Z (cord, airway, rectum)."""
    return (np.hypot(g.X - x, g.Y - y) <= r) & (g.Z >= z_lo) & (g.Z <= z_hi)


# --------------------------------------------------------------------------------------------------
# OpenKBP: provided-data/{train,validation,test}-pats/pt_<n>/*.csv on the 128³ grid.

OPENKBP_GRID = (128, 128, 128)
OPENKBP_VOXEL_MM = (3.906, 3.906, 3.0)  # along the array axes (y, x, z), as voxel_dimensions.csv
OPENKBP_FIRST_PATIENT = {"train": 1, "validation": 201, "test": 241}
OPENKBP_SPLIT_SIZE = {"train": 200, "validation": 40, "test": 100}
OPENKBP_FOLDER = {"train": "train-pats", "validation": "validation-pats", "test": "test-pats"}
# Only this box of the 128³ grid holds the phantom; computing on it keeps generation fast.
_OPENKBP_BOX = (slice(36, 92), slice(38, 90), slice(30, 98))


def _write_sparse_csv(path: Path, index: np.ndarray, data: np.ndarray | None) -> None:
    """OpenKBP's sparse format: a ``,data`` header, then the flat C-order index of the (y, x, z) grid in
    ascending order and the value; masks leave the value empty.

    The bytes equal ``pandas.DataFrame({"data": data}, index=index).to_csv(path)``, which is how the
    challenge wrote its files (the test checks this); formatting the lines directly takes half the time.
    """
    if data is None:
        lines = [f"{i},\n" for i in index.tolist()]
    else:
        values = np.asarray(data, dtype=np.float64).tolist()
        lines = [f"{i},{v!r}\n" for i, v in zip(index.tolist(), values, strict=True)]
    path.write_text(",data\n" + "".join(lines))


def _openkbp_patient(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """One head-and-neck phantom on the OpenKBP box: HU, dose (Gy), possible-dose mask, structures."""
    centre = 64 + rng.uniform(-2, 2, 3)
    a0, a1, a2 = np.ogrid[_OPENKBP_BOX]
    # Array axes: y grows posterior, x grows to the patient's left, z grows inferior (as in OpenKBP).
    g = _Grid(
        X=(a1 - centre[1]) * OPENKBP_VOXEL_MM[1],
        Y=(a0 - centre[0]) * OPENKBP_VOXEL_MM[0],
        Z=-(a2 - centre[2]) * OPENKBP_VOXEL_MM[2],
    )
    rx, ry = rng.uniform(72, 78), rng.uniform(80, 88)
    z_bottom, z_dome = -rng.uniform(75, 85), rng.uniform(28, 36)
    cap = np.maximum(g.Z - z_dome, 0) / 50.0
    body_rho = np.sqrt((g.X / rx) ** 2 + (g.Y / ry) ** 2 + cap**2)
    body = (body_rho <= 1) & (g.Z >= z_bottom)

    hu = np.where(body, 35.0, -1000.0)
    hu[body & (body_rho > 0.9)] = -90.0  # subcutaneous fat

    # Targets: a primary (PTV70) on one side, elective volumes (PTV63, PTV56) around and below it.
    side = rng.choice([-1.0, 1.0])
    c70 = (side * rng.uniform(10, 28), rng.uniform(-32, 0), rng.uniform(-25, 5))
    r70 = tuple(rng.uniform(22, 30, 3))
    targets = [("PTV70", 70.0, c70, r70)]
    if rng.random() < 0.4:
        c63 = (c70[0] + side * 8, c70[1] + 5, c70[2] - 15)
        targets.append(("PTV63", 63.0, c63, tuple(np.asarray(r70) + 6)))
    c56 = (c70[0] + side * rng.uniform(6, 14), c70[1] + rng.uniform(5, 12), c70[2] - rng.uniform(22, 32))
    targets.append(("PTV56", 56.0, c56, tuple(rng.uniform(32, 40, 3))))
    rho_t = {name: _rho(g, c, r) for name, _, c, r in targets}

    structures: dict[str, np.ndarray] = {}
    covered = np.zeros(g.shape, bool)
    for name, _, _, _ in targets:  # higher dose levels first; lower ones are cropped from them
        mask = (rho_t[name] <= 1) & body & ~covered
        structures[name] = mask
        covered |= mask
    # The tumour shows as an enhancing mass, the elective volumes as milder enhancement: learnable from
    # CT on a coarse demo grid, which is what lets dose and segmentation help each other.
    hu[structures["PTV56"]] += 40.0
    if "PTV63" in structures:
        hu[structures["PTV63"]] += 80.0
    hu[structures["PTV70"]] += 140.0

    # Organs at risk.
    y_cord, r_cord = 0.35 * ry + 24.0, 12.0
    cord = _tube(g, 0.0, y_cord, r_cord, z_bottom, 12.0) & body
    brainstem = (_rho(g, (0.0, y_cord - 6.0, 34.0), (17.0, 17.0, 25.0)) <= 1) & body
    parotid = {
        name: (_rho(g, (s * 0.7 * rx, 0.1 * ry, 15.0), (16.0, 22.0, 24.0)) <= 1) & body
        for name, s in (("LeftParotid", 1.0), ("RightParotid", -1.0))
    }
    y_airway = -0.3 * ry
    esophagus = _tube(g, 0.0, y_airway + 23.0, 12.0, z_bottom, -10.0) & body
    for mask in parotid.values():
        hu[mask] = -15.0
    hu[esophagus] = 45.0
    # Bone and air last: vertebrae with the spinal canal, mandible, airway.
    vertebra = _tube(g, 0.0, 0.35 * ry, 15.0, z_bottom, 12.0)
    arch = _tube(g, 0.0, y_cord, r_cord + 8.0, z_bottom, 12.0) & ~_tube(g, 0.0, y_cord, r_cord, -1e9, 1e9)
    hu[(vertebra | arch) & body] = 650.0
    jaw = (g.X / 60.0) ** 2 + ((g.Y + 8.0) / 68.0) ** 2
    hu[(jaw >= 0.75) & (jaw <= 1.0) & (g.Y < -10) & (g.Z >= -12) & (g.Z <= 8) & body] = 1100.0
    hu[_tube(g, 0.0, y_airway, 10.0, z_bottom, 0.0) & body] = -900.0
    hu[cord] = 35.0
    hu[brainstem] = 30.0
    hu = np.where(body, np.rint(hu + rng.normal(0, 12, hu.shape)), -1000.0)

    structures.update({"SpinalCord": cord, "Brainstem": brainstem})
    for name, mask in parotid.items():
        if rng.random() < 0.85:  # sometimes not contoured: absent is not the same as empty
            structures[name] = mask
    if rng.random() < 0.5:
        structures["Esophagus"] = esophagus

    # Dose: each target's level inside it, falling off with distance; the cord is spared.
    falloff = rng.uniform(11, 15)
    dose = np.zeros(g.shape)
    for name, level, _, r in targets:
        d = np.maximum(rho_t[name] - 1.0, 0.0) * float(np.mean(r))
        dose = np.maximum(dose, level * np.exp(-d / falloff))
    d_cord = np.maximum(np.hypot(g.X, g.Y - y_cord) - r_cord, 0.0)
    dose *= 1.0 - 0.35 * np.exp(-d_cord / 8.0) * (g.Z <= 12.0)
    dose *= 1.0 + rng.normal(0, 0.01, dose.shape)
    z_lo = min(c[2] - r[2] for _, _, c, r in targets) - 20.0
    z_hi = max(c[2] + r[2] for _, _, c, r in targets) + 20.0
    possible = body & (g.Z >= z_lo) & (g.Z <= z_hi)
    dose = np.where(possible, np.maximum(np.round(dose, 3), 0.001), 0.0)
    return hu, dose, possible, structures


def _generate_openkbp(root: Path, counts: dict[str, int], seed: int) -> None:
    for split, n in counts.items():
        if n > OPENKBP_SPLIT_SIZE[split]:
            raise CtanError(
                None, f"OpenKBP's {split} range holds {OPENKBP_SPLIT_SIZE[split]} patients, not {n}"
            )
    offset = np.array([s.start for s in _OPENKBP_BOX])

    def flat(mask: np.ndarray) -> np.ndarray:
        # C order of the box is also ascending order of the full-grid index.
        return np.ravel_multi_index(tuple(np.nonzero(mask) + offset[:, None]), OPENKBP_GRID)

    for split, i in _case_splits(counts):
        number = OPENKBP_FIRST_PATIENT[split] + i
        hu, dose, possible, structures = _openkbp_patient(_rng(seed, "openkbp", number))
        folder = root / "provided-data" / OPENKBP_FOLDER[split] / f"pt_{number}"
        folder.mkdir(parents=True)
        # OpenKBP stores HU + 1024 and leaves zeros out; outside air is written as the grid's 0.
        ct = np.where(hu <= -1000, 0.0, np.clip(hu + openkbp.CT_OFFSET, 0, 4095))
        _write_sparse_csv(folder / "ct.csv", flat(ct > 0), ct[ct > 0])
        _write_sparse_csv(folder / "dose.csv", flat(possible), dose[possible])
        _write_sparse_csv(folder / "possible_dose_mask.csv", flat(possible), None)
        for name, mask in structures.items():
            _write_sparse_csv(folder / f"{name}.csv", flat(mask), None)
        np.savetxt(folder / "voxel_dimensions.csv", np.asarray(OPENKBP_VOXEL_MM))


# --------------------------------------------------------------------------------------------------
# Bring-your-own NIfTI cases (prostate): cases/<case>/{ct,dose}.nii.gz, masks/<structure>.nii.gz.

NIFTI_SHAPE = (64, 64, 48)  # (i, j, k) = columns, rows, slices
NIFTI_STRUCTURES = ("Prostate", "Bladder", "Rectum", "PTV")
_PIXEL_MM = (2.734375, 2.9296875, 3.125)  # 350, 375 and 400 mm fields of view over 128 columns


def _pelvis(rng: np.random.Generator, g: _Grid) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """One prostate phantom: HU, dose (Gy) and structure masks."""
    rx, ry = rng.uniform(74, 82), rng.uniform(54, 62)
    body_rho = np.broadcast_to(np.hypot(g.X / rx, g.Y / ry), g.shape)
    body = body_rho <= 1
    hu = np.where(body, 45.0, -1000.0)
    hu[body & (body_rho > 0.85)] = -100.0

    c_bladder = (rng.uniform(-5, 5), rng.uniform(-28, -18), rng.uniform(14, 24))
    bladder = (_rho(g, c_bladder, tuple(rng.uniform([26, 20, 18], [34, 27, 25]))) <= 1) & body
    c_prostate = (rng.uniform(-3, 3), rng.uniform(-12, -4), c_bladder[2] - rng.uniform(34, 40))
    r_prostate = tuple(rng.uniform([18, 14, 15], [24, 18, 20]))
    prostate = (_rho(g, c_prostate, r_prostate) <= 1) & body
    y_rectum = c_prostate[1] + r_prostate[1] + 14.0
    z_rectum = (c_prostate[2] - 35.0, c_prostate[2] + 40.0)
    rectum = _tube(g, 0.0, y_rectum, 14.0, *z_rectum) & body
    r_ptv = tuple(np.asarray(r_prostate) + rng.uniform(6, 8))
    ptv = (_rho(g, c_prostate, r_ptv) <= 1) & body

    hu[bladder] = 8.0
    hu[prostate] = 110.0  # contrast-enhanced gland, visible on the demo's coarse grid
    hu[rectum] = 32.0
    if rng.random() < 0.6:
        hu[_tube(g, 0.0, y_rectum, 6.0, *z_rectum) & body] = -700.0  # rectal gas
    for s in (-1.0, 1.0):  # femoral heads: cortex and marrow
        c_femur = (s * rng.uniform(54, 60), rng.uniform(-5, 5), c_prostate[2] + rng.uniform(-5, 5))
        rho = _rho(g, c_femur, (19.0, 19.0, 19.0))
        hu[(rho <= 1) & body] = 900.0
        hu[(rho <= 0.75) & body] = 300.0
    hu[(_rho(g, (0.0, 0.82 * ry, 25.0), (28.0, 10.0, 40.0)) <= 1) & body] = 500.0  # sacrum
    hu = np.where(
        body, np.rint(hu + rng.normal(0, 12, hu.shape)), np.rint(-1000 + rng.normal(0, 4, hu.shape))
    )

    falloff = rng.uniform(14, 18)
    dose = 78.0 * np.exp(-_distance_outside(g, c_prostate, r_ptv) / falloff)
    dose *= 1.0 - 0.15 * rectum  # the plan spares the rectal wall
    dose *= 1.0 + rng.normal(0, 0.01, dose.shape)
    dose = np.where(body, dose, 0.0)
    masks = {"Prostate": prostate, "Bladder": bladder, "Rectum": rectum, "PTV": ptv}
    return hu, dose, masks


def _nifti(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)  # scanner coordinates, as dcm2niix writes them
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    return image


def _generate_nifti_cases(root: Path, counts: dict[str, int], seed: int) -> None:
    rows = []
    for number, (split, i) in enumerate(_case_splits(counts), start=1):
        rng = _rng(seed, "nifti_cases", SPLITS.index(split), i)
        case = f"case_{number:03d}"
        pixel, slice_mm = float(rng.choice(_PIXEL_MM)), 3.0
        i, j, k = np.ogrid[: NIFTI_SHAPE[0], : NIFTI_SHAPE[1], : NIFTI_SHAPE[2]]
        # Stored as a DICOM series is: columns to the patient's left, rows posterior, slices superior.
        g = _Grid(
            X=(i - (NIFTI_SHAPE[0] - 1) / 2) * pixel,
            Y=(j - (NIFTI_SHAPE[1] - 1) / 2) * pixel,
            Z=(k - (NIFTI_SHAPE[2] - 1) / 2) * slice_mm,
        )
        hu, dose, masks = _pelvis(rng, g)
        # The scanner's LPS position of voxel 0, turned into NIfTI's RAS affine (x and y flip sign).
        lps0 = (
            -(NIFTI_SHAPE[0] - 1) / 2 * pixel + rng.uniform(-8, 8),
            -(NIFTI_SHAPE[1] - 1) / 2 * pixel + rng.uniform(-30, 10),
            -rng.uniform(400, 700),
        )
        affine = np.diag([-pixel, -pixel, slice_mm, 1.0])
        affine[:3, 3] = np.round([-lps0[0], -lps0[1], lps0[2]], 3)
        folder = root / "cases" / case
        (folder / "masks").mkdir(parents=True)
        nib.save(_nifti(hu.astype(np.int16), affine), folder / "ct.nii.gz")
        nib.save(_nifti(dose.astype(np.float32), affine), folder / "dose.nii.gz")
        for name in NIFTI_STRUCTURES:
            if name == "Rectum" and rng.random() < 0.15:
                continue  # not contoured in this case: the reader marks it absent, not empty
            nib.save(_nifti(masks[name].astype(np.uint8), affine), folder / "masks" / f"{name}.nii.gz")
        rows.append({"case": case, "split": split})
    pd.DataFrame(rows).to_csv(root / "split.csv", index=False)


# --------------------------------------------------------------------------------------------------
# HAM10000: HAM10000_images/ISIC_*.jpg, HAM10000_segmentations_lesion_tschandl/*_segmentation.png,
# HAM10000_metadata.csv.

HAM_IMAGE_SIZE = (64, 48)  # (width, height) of the JPEGs, as the real sample's 200×150 downscales
HAM_MASK_SCALE = 3  # masks keep a larger size than the images, as in the real sample (600×450)
HAM_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
JPEG_QUALITY = 90


@dataclass(frozen=True)
class _LesionStyle:
    """What a diagnosis looks like: radius (fraction of the image height), elongation, border
    irregularity, colour (RGB), texture contrast and centre shading (+ lighter centre)."""

    size: float
    elongation: float
    irregularity: float
    colour: tuple[int, int, int]
    texture: float
    shading: float
    weight: float  # share among the demo lesions
    dx_types: tuple[str, ...]
    sites: tuple[str, ...]


_STYLES = {
    "akiec": _LesionStyle(
        0.20, 0.30, 0.16, (200, 112, 104), 0.12, 0.0, 1.0, ("histo",), ("face", "scalp", "hand")
    ),
    "bcc": _LesionStyle(
        0.24, 0.20, 0.10, (214, 150, 156), 0.07, -0.15, 1.2, ("histo",), ("face", "back", "neck")
    ),
    "bkl": _LesionStyle(
        0.30,
        0.45,
        0.07,
        (150, 102, 70),
        0.10,
        0.0,
        1.2,
        ("histo", "consensus", "confocal"),
        ("face", "trunk"),
    ),
    "df": _LesionStyle(
        0.15, 0.10, 0.03, (168, 104, 88), 0.04, 0.30, 0.8, ("histo", "consensus"), ("lower extremity",)
    ),
    "mel": _LesionStyle(
        0.36, 0.35, 0.22, (66, 42, 36), 0.28, 0.0, 1.2, ("histo",), ("back", "upper extremity", "chest")
    ),
    "nv": _LesionStyle(
        0.25,
        0.08,
        0.03,
        (120, 78, 52),
        0.05,
        0.0,
        1.6,
        ("follow_up", "histo", "consensus"),
        ("back", "abdomen"),
    ),
    "vasc": _LesionStyle(
        0.14, 0.15, 0.05, (146, 36, 66), 0.05, 0.0, 0.8, ("consensus", "histo"), ("trunk", "abdomen")
    ),
}


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Low-frequency noise with unit standard deviation (texture, illumination)."""
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma, mode="wrap")
    return field / (field.std() + 1e-9)


def _dermoscopy(
    rng: np.random.Generator, style: _LesionStyle, shape_params: dict, skin: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One image (H, W, 3) uint8 and its mask (3H, 3W) uint8 0/255 of a lesion seen from some angle."""
    w, h = HAM_IMAGE_SIZE
    mw, mh = w * HAM_MASK_SCALE, h * HAM_MASK_SCALE
    yy, xx = np.mgrid[0:mh, 0:mw] + 0.5
    angle = shape_params["angle"] + rng.uniform(-0.6, 0.6)
    cx = mw / 2 + rng.uniform(-0.08, 0.08) * mw
    cy = mh / 2 + rng.uniform(-0.08, 0.08) * mh
    u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    u, v = u / (1 + shape_params["elongation"]), v / (1 - shape_params["elongation"] / 2)
    radius = np.hypot(u, v)
    phi = np.arctan2(v, u)
    border = (
        shape_params["radius"]
        * mh
        * (1 + sum(a * np.cos(k * phi + p) for k, a, p in shape_params["harmonics"]))
    )
    inside = radius <= border
    rel = np.clip(radius / border, 0, 1)

    def to_image(a: np.ndarray) -> np.ndarray:  # area average: the mask and the image agree exactly
        return a.reshape(h, HAM_MASK_SCALE, w, HAM_MASK_SCALE).mean(axis=(1, 3))

    alpha = ndimage.gaussian_filter(to_image(inside.astype(float)), 0.4)[..., None]
    rel = to_image(rel)[..., None]
    ys, xs = np.mgrid[0:h, 0:w]
    vignette = 1 - 0.25 * (((xs - w / 2) / w) ** 2 + ((ys - h / 2) / h) ** 2) * 4
    light = (
        rng.uniform(0.92, 1.05) * vignette[..., None] * (1 + 0.03 * _smooth_noise(rng, (h, w), 6)[..., None])
    )
    colour = np.asarray(shape_params["colour"], float)
    lesion = colour * (1 + style.texture * _smooth_noise(rng, (h, w), 1.5)[..., None])
    lesion = lesion * (1 + style.shading * (1 - rel))
    image = (skin * (1 - alpha) + lesion * alpha) * light + rng.normal(0, 3, (h, w, 3))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), (inside * 255).astype(np.uint8)


def _generate_ham10000(root: Path, counts: dict[str, int], seed: int) -> None:
    rng = _rng(seed, "ham10000", 0)
    total = sum(counts.values())
    image_numbers = iter(rng.choice(np.arange(24306, 34321), total, replace=False))
    lesion_numbers = iter(rng.choice(np.arange(0, 7500), total, replace=False))
    classes = list(range(len(HAM_CLASSES)))
    weights = [_STYLES[c].weight for c in HAM_CLASSES]
    (root / "HAM10000_images").mkdir()
    (root / "HAM10000_segmentations_lesion_tschandl").mkdir()
    rows, splits = [], []
    for s, split in enumerate(SPLITS):
        n_images = counts[split]
        n_lesions = n_images - n_images // 6  # about one lesion in five is photographed twice
        dx = _stratified(_rng(seed, "ham10000", 1, s), n_lesions, classes, weights)
        per_lesion = np.ones(n_lesions, int)
        per_lesion[: n_images - n_lesions] = 2
        for lesion, (d, n_views) in enumerate(zip(dx, per_lesion, strict=True)):
            lrng = _rng(seed, "ham10000", 2, s, lesion)
            name = HAM_CLASSES[d]
            style = _STYLES[name]
            shape_params = {
                "angle": lrng.uniform(0, np.pi),
                "radius": style.size * lrng.uniform(0.85, 1.15),
                "elongation": float(np.clip(style.elongation + lrng.normal(0, 0.05), 0, 0.6)),
                "harmonics": [
                    (k, style.irregularity * lrng.normal() / np.sqrt(k - 1), lrng.uniform(0, 2 * np.pi))
                    for k in range(2, 8)
                ],
                "colour": np.clip(np.asarray(style.colour) * lrng.uniform(0.9, 1.1, 3), 0, 255),
            }
            skin = np.asarray([226, 182, 160]) * lrng.uniform(0.85, 1.05) * lrng.uniform(0.97, 1.03, 3)
            lesion_id = f"HAM_{next(lesion_numbers):07d}"
            age = float(
                5 * lrng.integers(6, 18)
                if name in ("mel", "bcc", "akiec", "bkl")
                else 5 * lrng.integers(3, 14)
            )
            sex = str(lrng.choice(["male", "female"]))
            site = str(lrng.choice(style.sites))
            dx_type = str(lrng.choice(style.dx_types))
            for _ in range(n_views):
                image_id = f"ISIC_{next(image_numbers):07d}"
                image, mask = _dermoscopy(lrng, style, shape_params, skin)
                Image.fromarray(image).save(
                    root / "HAM10000_images" / f"{image_id}.jpg", quality=JPEG_QUALITY
                )
                Image.fromarray(mask).save(
                    root / "HAM10000_segmentations_lesion_tschandl" / f"{image_id}_segmentation.png"
                )
                rows.append([lesion_id, image_id, name, dx_type, age, sex, site])
                splits.append({"image_id": image_id, "split": split})
    metadata = pd.DataFrame(
        rows, columns=["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
    )
    metadata = metadata.sort_values(["dx", "lesion_id", "image_id"], kind="stable")
    metadata.to_csv(
        root / "HAM10000_metadata.csv", index=False, lineterminator="\r\n"
    )  # CRLF, as the original
    pd.DataFrame(splits).to_csv(root / "split.csv", index=False)


# --------------------------------------------------------------------------------------------------
# STOIC 2021: data/mha/<PatientID>.mha and metadata/reference.csv.

STOIC_SHAPE = (32, 48, 48)  # (z, y, x) voxels
NEGATIVE, COVID, SEVERE = 0, 1, 2


def _chest(rng: np.random.Generator, g: _Grid, outcome: int) -> np.ndarray:
    """One chest phantom in HU: ground-glass opacities mark COVID-19; their extent marks severity."""
    rx, ry = rng.uniform(130, 145), rng.uniform(92, 105)
    body_rho = np.broadcast_to(np.hypot(g.X / rx, g.Y / ry), g.shape)
    body = body_rho <= 1
    hu = np.where(body, 40.0, -1000.0)
    hu[body & (body_rho > 0.88)] = -100.0
    lungs = np.zeros(g.shape, bool)
    for s in (-1.0, 1.0):
        centre = (s * rng.uniform(56, 64), rng.uniform(-6, 6), rng.uniform(-8, 8))
        lungs |= _rho(g, centre, tuple(rng.uniform([40, 58, 80], [48, 66, 92]))) <= 1
    heart = _rho(g, (15.0, -28.0, -25.0), (42.0, 38.0, 42.0)) <= 1
    lungs &= body & ~heart
    hu[lungs] = -850.0
    hu[_tube(g, 0.0, 0.75 * ry, 17.0, -1e9, 1e9) & body] = 450.0  # vertebrae

    def blobs(n: int, radius: tuple[float, float], value: float) -> None:
        points = np.argwhere(lungs)
        for _ in range(n):
            p = points[rng.integers(len(points))]
            centre = (float(g.X.flat[p[2]]), float(g.Y.flat[p[1]]), float(g.Z.flat[p[0]]))
            hu[(_rho(g, centre, tuple(rng.uniform(*radius, 3))) <= 1) & lungs] = value

    # Extents are exaggerated relative to real scans so that a small network on a 24x32x32 grid can
    # learn them from a few dozen patients: the demo must show learning within seconds. With 6-10
    # opacities of 20-32 mm at -350 HU the single-task COVID network sat at the class prior for 20
    # epochs at lr 1e-3 (it learned only through severity's gradient in the multi-task models); with
    # these it leaves the prior after ~8 epochs.
    if outcome == COVID:
        blobs(int(rng.integers(9, 13)), (24, 34), -300.0)
    elif outcome == SEVERE:
        blobs(int(rng.integers(12, 16)), (28, 40), -350.0)
        blobs(int(rng.integers(3, 5)), (16, 24), -20.0)  # consolidation
    elif rng.random() < 0.3:
        blobs(1, (6, 9), 30.0)  # an incidental solid nodule: not COVID-19
    noise = rng.normal(0, 15, g.shape)
    return np.clip(np.rint(np.where(body, hu + noise, -1000 + noise / 3)), -1024, 3071).astype(np.int16)


def _generate_stoic(root: Path, counts: dict[str, int], seed: int) -> None:
    rng = _rng(seed, "stoic", 0)
    ids = iter(rng.choice(np.arange(1, 11000), sum(counts.values()), replace=False))
    (root / "data" / "mha").mkdir(parents=True)
    (root / "metadata").mkdir()
    rows, splits = [], []
    for s, split in enumerate(SPLITS):
        outcomes = _stratified(
            _rng(seed, "stoic", 1, s), counts[split], [NEGATIVE, COVID, SEVERE], [0.4, 0.35, 0.25]
        )
        for i, outcome in enumerate(outcomes):
            prng = _rng(seed, "stoic", 2, s, i)
            patient = str(next(ids))
            pixel = float(prng.choice([6.5, 7.0, 7.5]))
            iz, iy, ix = np.ogrid[: STOIC_SHAPE[0], : STOIC_SHAPE[1], : STOIC_SHAPE[2]]
            g = _Grid(
                X=(ix - (STOIC_SHAPE[2] - 1) / 2) * pixel,
                Y=(iy - (STOIC_SHAPE[1] - 1) / 2) * pixel,
                Z=(iz - (STOIC_SHAPE[0] - 1) / 2) * 8.0,
            )
            image = sitk.GetImageFromArray(_chest(prng, g, int(outcome)))
            image.SetSpacing((pixel, pixel, 8.0))
            image.SetOrigin(
                (
                    round(-(STOIC_SHAPE[2] - 1) / 2 * pixel + prng.uniform(-5, 5), 3),
                    round(-(STOIC_SHAPE[1] - 1) / 2 * pixel + prng.uniform(-20, 20), 3),
                    round(-prng.uniform(250, 450), 3),
                )
            )
            sitk.WriteImage(image, str(root / "data" / "mha" / f"{patient}.mha"), useCompression=True)
            ages = [55, 65, 75, 85] if outcome == SEVERE else [35, 45, 55, 65, 75, 85]
            rows.append(
                {
                    "PatientID": patient,
                    "probCOVID": int(outcome != NEGATIVE),
                    "probSevere": int(outcome == SEVERE),
                    "age": f"{int(prng.choice(ages)):03d}Y",
                    "sex": str(prng.choice(["M", "F"])),
                }
            )
            splits.append({"PatientID": patient, "split": split})
    order = rng.permutation(len(rows))  # the real file is not sorted
    pd.DataFrame([rows[i] for i in order]).to_csv(root / "metadata" / "reference.csv", index=False)
    pd.DataFrame(splits).to_csv(root / "split.csv", index=False)


_GENERATORS: dict[str, Callable[[Path, dict[str, int], int], None]] = {
    "openkbp": _generate_openkbp,
    "nifti_cases": _generate_nifti_cases,
    "ham10000": _generate_ham10000,
    "stoic": _generate_stoic,
}
