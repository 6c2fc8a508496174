"""HAM10000 dermoscopy: lesion segmentation (Tschandl et al. 2020 masks) and 7-class diagnosis.

Layout (the official Harvard Dataverse release, also the ISIC 2018 task 3 training set)::

    HAM10000_metadata.csv                          lesion_id,image_id,dx,dx_type,age,sex,localization
    HAM10000_images/ISIC_<n>.jpg                   (or HAM10000_images_part_1/, _part_2/ as released)
    HAM10000_segmentations_lesion_tschandl/ISIC_<n>_segmentation.png     binary, 0/255
    split.csv                                      optional: image_id,split (overrides the computed split)

Images and masks need not share a size (our real sample pairs 200×150 JPGs with 600×450 masks): the
mask is brought to the image grid with nearest-neighbour resampling, so one case has one grid; the
preprocess step then resizes both to the configured shape. A mask whose aspect ratio differs from its
image's is refused, since it cannot belong to it. A picture is read upright, as viewers show it: a
camera's JPG whose EXIF orientation turns its stored pixels is turned (the release's have none).

Several images can show the same lesion, so the split is by ``lesion_id``: deterministic from the split
parameters ``{validation, test, seed}`` and stratified by diagnosis where the counts allow.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError
from skimage.filters import threshold_otsu
from skimage.transform import resize

from ctan.datasets.base import Case, CaseRef, cached_per_file, read_table
from ctan.datasets.splits import assign_splits, read_split_file
from ctan.errors import CtanError
from ctan.tasks import Task, label_task

FORMAT = "ham10000"
SPATIAL_DIMS = 2
WORLD = None  # dermoscopy photographs: no patient frame
MARKER = "HAM10000_metadata.csv"

CLASS_NAMES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
STRUCTURES: tuple[str, ...] = ()
METADATA_COLUMNS: tuple[str, ...] = ("lesion_id", "image_id", "dx")
IMAGE_FOLDERS: tuple[str, ...] = ("HAM10000_images", "HAM10000_images_part_1", "HAM10000_images_part_2")
MASK_FOLDER = "HAM10000_segmentations_lesion_tschandl"
SPLIT_FILE = "split.csv"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
ASPECT_TOLERANCE = 0.02  # relative difference of width/height ratios still taken as the same picture
EXIF_ORIENTATION = 0x0112  # 1: stored upright; 2-8: viewers flip or turn the stored pixels

TASKS: dict[str, Task] = {
    "lesion": Task(
        name="lesion",
        kind="segmentation",
        target="lesion",
        channels=1,
        multilabel=True,
        class_names=("lesion",),
        metrics=("dice", "jaccard_thresholded"),
        primary_metrics=("dice", "jaccard_thresholded"),
    ),
    "diagnosis": label_task("diagnosis", CLASS_NAMES, ("balanced_accuracy", "auc_macro")),
}


def structure_names(root: Path | None = None) -> list[str]:
    """HAM10000 has no multi-structure target."""
    return []


def class_names(root: Path | None = None) -> list[str]:
    """The seven diagnoses, in label order (alphabetical, as ISIC 2018 task 3 lists them)."""
    return list(CLASS_NAMES)


@cached_per_file
def _metadata(path: Path) -> pd.DataFrame:
    table = read_table(path, METADATA_COLUMNS, dtype=str, keep_default_na=False)
    table = table[list(METADATA_COLUMNS)].apply(lambda c: c.str.strip())
    if table.empty:
        raise CtanError(path, "lists no images")
    if (table == "").any().any():
        row = int(np.flatnonzero((table == "").any(axis=1))[0])
        raise CtanError(path, f"row {row + 2} has an empty lesion_id, image_id or dx")
    unknown = sorted(set(table["dx"]) - set(CLASS_NAMES))
    if unknown:
        raise CtanError(
            path, f"unknown dx {', '.join(map(repr, unknown))}; expected one of {', '.join(CLASS_NAMES)}"
        )
    with_suffix = table["image_id"][table["image_id"].str.lower().str.endswith(IMAGE_SUFFIXES)]
    if len(with_suffix):
        image_id = with_suffix.iloc[0]
        raise CtanError(
            path,
            f"image_id {image_id} has a file extension; list ids as released ({image_id.rsplit('.', 1)[0]})",
        )
    duplicated = table["image_id"][table["image_id"].duplicated()]
    if len(duplicated):
        raise CtanError(path, f"image_id {duplicated.iloc[0]} is listed twice")
    mixed = table.groupby("lesion_id")["dx"].nunique()
    if (mixed > 1).any():
        raise CtanError(path, f"lesion {mixed[mixed > 1].index[0]} has two different diagnoses")
    return table.set_index("image_id")


def read_metadata(root: Path) -> pd.DataFrame:
    """The checked metadata, indexed by image_id (cached: read_case needs one row per call)."""
    return _metadata(Path(root) / MARKER)


def list_cases(root: Path, split_params: dict | None = None) -> list[CaseRef]:
    """Every image with its split: from ``split.csv`` if present, else by lesion from the split parameters."""
    root = Path(root)
    meta = read_metadata(root)
    image_ids = list(meta.index)
    split_file = root / SPLIT_FILE
    if split_file.is_file():
        by_image = read_split_file(split_file, "image_id", image_ids)
        per_lesion = pd.Series(by_image).groupby(meta["lesion_id"]).nunique()
        if (per_lesion > 1).any():
            raise CtanError(split_file, f"lesion {per_lesion[per_lesion > 1].index[0]} is put in two splits")
    else:
        lesion_dx = meta.groupby("lesion_id")["dx"].first().to_dict()
        by_lesion = assign_splits(lesion_dx, split_params)
        by_image = {i: by_lesion[lesion] for i, lesion in zip(image_ids, meta["lesion_id"], strict=True)}
    _check_files(root, image_ids)
    return [CaseRef(i, by_image[i]) for i in sorted(image_ids)]


def _check_files(root: Path, image_ids: list[str]) -> None:
    """Every listed image needs its JPG and its mask; one directory listing per folder keeps this cheap."""
    jpgs: dict[str, str] = {}  # file name -> the image folder holding it
    for folder in IMAGE_FOLDERS:
        if (root / folder).is_dir():
            for name in sorted(os.listdir(root / folder)):
                if name in jpgs:  # the release's part folders never share an image: which one is it?
                    raise CtanError(root / folder / name, f"also in {jpgs[name]}/: keep one copy")
                jpgs[name] = folder
    masks = set(os.listdir(root / MASK_FOLDER)) if (root / MASK_FOLDER).is_dir() else set()
    for image_id in image_ids:
        if f"{image_id}.jpg" not in jpgs:
            raise CtanError(image_path(root, image_id), _missing(image_id, set(jpgs)))
        if f"{image_id}_segmentation.png" not in masks:
            raise CtanError(mask_path(root, image_id), _missing(f"{image_id}_segmentation", masks))


def _missing(stem: str, names: set[str]) -> str:
    """ "missing", with the file that is probably meant where one differs only in case or extension."""
    near = sorted(n for n in names if n.rsplit(".", 1)[0].casefold() == stem.casefold())
    hint = f"; found {near[0]}: rename it (file names and extensions are as released)" if near else ""
    return f"missing (listed in HAM10000_metadata.csv){hint}"


def image_path(root: Path, image_id: str) -> Path:
    """The JPG of an image, in whichever of the released image folders holds it."""
    for folder in IMAGE_FOLDERS:
        path = Path(root) / folder / f"{image_id}.jpg"
        if path.is_file():
            return path
    return Path(root) / IMAGE_FOLDERS[0] / f"{image_id}.jpg"


def mask_path(root: Path, image_id: str) -> Path:
    return Path(root) / MASK_FOLDER / f"{image_id}_segmentation.png"


def _load(path: Path, mode: str) -> np.ndarray:
    """Decode an image file completely (truncated files fail here, not later)."""
    if not path.is_file():
        raise CtanError(path, "missing")
    try:
        with Image.open(path) as im:
            im.load()
            if mode == "RGB" and im.mode in ("I", "I;16", "I;16B", "F"):  # RGB of them: clipped, white
                raise CtanError(path, f"a {im.mode} (16/32-bit) image; HAM10000's are 8-bit: convert it")
            # As viewers and annotation tools show it: a camera's JPG may store its pixels rotated.
            upright = ImageOps.exif_transpose(im)
            return np.asarray(upright.convert(mode))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise CtanError(path, f"not a readable image: {err}") from None
    except Image.DecompressionBombError as err:  # a header claiming a huge size: damaged, or not a photo
        raise CtanError(path, f"not a readable image: {err} (damaged header?)") from None


def _mismatch(image_file: Path) -> str:
    """Why a mask's aspect ratio is not its picture's: another picture, or one drawn on a camera JPG's
    stored pixels while the picture is read upright by its EXIF orientation."""
    with Image.open(image_file) as im:
        orientation = im.getexif().get(EXIF_ORIENTATION, 1)
    if orientation in (5, 6, 7, 8):
        return (
            f"the image is turned upright by its EXIF orientation ({orientation}: a quarter turn), as "
            "viewers show it; the mask was drawn on the stored pixels? turn the mask to the picture as shown"
        )
    return "not the same picture"


def lesion_of(mask: np.ndarray, path: Path) -> np.ndarray:
    """The lesion of a grey mask, split from the background at Otsu's threshold.

    The release's masks are 0/255; users' copies come as 0/1, JPEG-noisy, anti-aliased or with a
    coloured lesion (pure red is grey 76). A fixed cut at 127 lost a coloured lesion, and a 0/1 mask
    with one stray 2 lost its whole lesion; Otsu's threshold separates all of these, and gives the
    release's masks exactly what 127 did. An empty mask is refused: every HAM10000 image shows a lesion.
    """
    low, high = int(mask.min()), int(mask.max())
    if high == 0:
        raise CtanError(
            path, "lesion mask is empty (every HAM10000 image shows a lesion): wrong or blank file?"
        )
    if low == high:
        return np.ones(mask.shape, dtype=bool)
    lesion = mask > threshold_otsu(mask)
    border = np.concatenate([lesion[0], lesion[-1], lesion[:, 0], lesion[:, -1]])
    if border.all():  # a lesion fills the frame, or is enclosed by skin: never skin enclosed by lesion
        raise CtanError(
            path,
            f"the lesion (white) covers the whole image border and surrounds {int((~lesion).sum())} "
            "background pixel(s): an inverted mask (lesion black on white)? invert it",
        )
    return lesion


def read_case(root: Path, ref: CaseRef) -> Case:
    """One image: RGB (3, H, W) uint8, lesion mask (1, H, W) 0/1 on the image grid, diagnosis label."""
    root = Path(root)
    meta = read_metadata(root)
    if ref.case_id not in meta.index:
        raise CtanError(root / MARKER, f"image {ref.case_id} is not listed")
    image_file, mask_file = image_path(root, ref.case_id), mask_path(root, ref.case_id)
    rgb = _load(image_file, "RGB")
    mask = _load(mask_file, "L")
    h, w = rgb.shape[:2]
    mh, mw = mask.shape
    if abs((mw / mh) / (w / h) - 1) > ASPECT_TOLERANCE:
        raise CtanError(mask_file, f"mask is {mw}x{mh} but the image is {w}x{h}: {_mismatch(image_file)}")
    lesion = lesion_of(mask, mask_file)
    if (mh, mw) != (h, w):
        lesion = resize(lesion, (h, w), order=0, preserve_range=True, anti_aliasing=False)
    return Case(
        case_id=ref.case_id,
        split=ref.split,
        image=np.ascontiguousarray(rgb.transpose(2, 0, 1)),
        spacing=(1.0, 1.0),
        origin=(0.0, 0.0),
        direction=(1.0, 0.0, 0.0, 1.0),
        dense={"lesion": lesion.astype(np.uint8)[None]},
        labels={"diagnosis": CLASS_NAMES.index(meta.at[ref.case_id, "dx"])},
        sources=(image_file, mask_file, root / MARKER),
    )
