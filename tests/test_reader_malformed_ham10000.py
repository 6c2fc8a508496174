"""HAM10000 reader against real-world picture variants: an inverted lesion mask, and camera JPGs whose
pixels are stored rotated with an EXIF orientation. Files are written with Pillow as a user's are."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctan.datasets import ham10000
from ctan.datasets.base import CaseRef
from ctan.errors import CtanError

H, W = 40, 30  # the picture as shown: portrait


def upright() -> tuple[np.ndarray, np.ndarray]:
    """(picture, 0/255 mask) as shown: skin with a dark lesion in the upper left quarter."""
    picture = np.full((H, W, 3), (220, 170, 150), dtype=np.uint8)
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[4:16, 3:12] = 255
    picture[mask > 0] = (60, 30, 20)
    return picture, mask


def write(root: Path, picture: Image.Image, mask: np.ndarray, exif: Image.Exif | None = None) -> Path:
    (root / "HAM10000_images").mkdir(parents=True, exist_ok=True)
    (root / ham10000.MASK_FOLDER).mkdir(exist_ok=True)
    picture.save(root / "HAM10000_images" / "ISIC_0001.jpg", quality=95, **({"exif": exif} if exif else {}))
    Image.fromarray(mask).save(root / ham10000.MASK_FOLDER / "ISIC_0001_segmentation.png")
    (root / ham10000.MARKER).write_text("lesion_id,image_id,dx\nHAM_1,ISIC_0001,nv\n")
    return root


def read(root: Path):
    return ham10000.read_case(root, CaseRef("ISIC_0001", "train"))


def rotated_by_camera(picture: np.ndarray) -> tuple[Image.Image, Image.Exif]:
    """The picture stored a quarter turn anticlockwise, tagged EXIF orientation 6 (viewers turn it
    clockwise): how a phone held upright stores a portrait photo."""
    exif = Image.Exif()
    exif[ham10000.EXIF_ORIENTATION] = 6
    return Image.fromarray(np.ascontiguousarray(np.rot90(picture))), exif


def test_a_picture_stored_rotated_reads_upright_with_its_mask(tmp_path: Path) -> None:
    picture, mask = upright()
    stored, exif = rotated_by_camera(picture)
    assert stored.size == (H, W)  # stored landscape
    case = read(write(tmp_path, stored, mask, exif))
    assert case.image.shape == (3, H, W)
    np.testing.assert_array_equal(case.dense["lesion"][0], mask > 0)
    dark = case.image.mean(axis=0) < 100
    assert (dark == (mask > 0)).mean() > 0.98  # the lesion is where the mask says (JPEG blurs its edge)


def test_a_mask_drawn_on_the_stored_pixels_of_a_rotated_picture_is_refused(tmp_path: Path) -> None:
    picture, mask = upright()
    stored, exif = rotated_by_camera(picture)
    write(tmp_path, stored, np.ascontiguousarray(np.rot90(mask)), exif)
    with pytest.raises(CtanError, match="EXIF orientation \\(6: a quarter turn\\).*turn the mask") as err:
        read(tmp_path)
    assert err.value.path is not None and err.value.path.endswith("ISIC_0001_segmentation.png")


def test_an_inverted_mask_is_refused(tmp_path: Path) -> None:
    """Lesion black on white: Otsu's threshold took the skin for the lesion without a word."""
    picture, mask = upright()
    write(tmp_path, Image.fromarray(picture), 255 - mask)
    with pytest.raises(CtanError, match="whole image border .* inverted mask") as err:
        read(tmp_path)
    assert err.value.path is not None and err.value.path.endswith("ISIC_0001_segmentation.png")


@pytest.mark.parametrize("rows", [slice(0, H), slice(0, H - 3)])
def test_a_lesion_filling_the_frame_or_touching_three_borders_reads(tmp_path: Path, rows: slice) -> None:
    picture, _ = upright()
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[rows] = 255
    case = read(write(tmp_path, Image.fromarray(picture), mask))
    np.testing.assert_array_equal(case.dense["lesion"][0], mask > 0)
