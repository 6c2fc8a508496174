"""HAM10000 reader: real images and masks on one grid, splits by lesion, bad files refused."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctan.datasets import ham10000
from ctan.datasets.base import CaseRef
from ctan.errors import CtanError


@pytest.fixture(scope="session")
def ham_sample(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real 1,911-image sample (8 MB), extracted once."""
    out = tmp_path_factory.mktemp("ham10000")
    with tarfile.open(shared_data / "ham10000-sample.tar.gz") as tar:
        tar.extractall(out, filter="data")
    return out / "ham10000-sample"


def write_dataset(root: Path, rows: list[tuple[str, str, str]], size: tuple[int, int] = (8, 6)) -> Path:
    """Tiny dataset of (lesion_id, image_id, dx) rows; masks at 3x the image size, like the sample."""
    (root / "HAM10000_images").mkdir(parents=True, exist_ok=True)
    (root / ham10000.MASK_FOLDER).mkdir(exist_ok=True)
    lines = ["lesion_id,image_id,dx,dx_type,age,sex,localization"]
    rng = np.random.default_rng(0)
    w, h = size
    for lesion, image, dx in rows:
        lines.append(f"{lesion},{image},{dx},histo,50.0,male,back")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            root / "HAM10000_images" / f"{image}.jpg"
        )
        mask = np.zeros((3 * h, 3 * w), dtype=np.uint8)
        mask[3:12, 6:15] = 255
        Image.fromarray(mask).save(root / ham10000.MASK_FOLDER / f"{image}_segmentation.png")
    (root / ham10000.MARKER).write_text("\n".join(lines) + "\n")
    return root


ROWS = [(f"HAM_{i // 2:03d}", f"ISIC_{i:04d}", ham10000.CLASS_NAMES[(i // 2) % 7]) for i in range(40)]


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "ham", ROWS)


def assert_names(err: pytest.ExceptionInfo[CtanError], filename: str) -> None:
    assert err.value.path is not None and err.value.path.endswith(filename), str(err.value)


# --- real data ---------------------------------------------------------------------------------------


@pytest.mark.realdata
def test_real_image_and_mask_share_the_image_grid(ham_sample: Path) -> None:
    refs = ham10000.list_cases(ham_sample)
    ref = refs[0]
    case = ham10000.read_case(ham_sample, ref)
    jpg = np.asarray(Image.open(ham_sample / "HAM10000_images" / f"{ref.case_id}.jpg"))
    png = np.asarray(Image.open(ham_sample / ham10000.MASK_FOLDER / f"{ref.case_id}_segmentation.png"))
    assert jpg.shape == (150, 200, 3) and png.shape == (450, 600)
    assert case.image.shape == (3, 150, 200) and case.image.dtype == np.uint8
    assert np.array_equal(case.image.transpose(1, 2, 0), jpg)
    lesion = case.dense["lesion"]
    assert lesion.shape == (1, 150, 200) and lesion.dtype == np.uint8
    # nearest neighbour from 450x600 to 150x200 samples the centre pixel of every 3x3 block
    assert np.array_equal(lesion[0], (png[1::3, 1::3] > 127).astype(np.uint8))
    assert 0 < lesion.mean() < 1
    dx = ham10000.read_metadata(ham_sample).at[ref.case_id, "dx"]
    assert case.labels == {"diagnosis": ham10000.CLASS_NAMES.index(dx)}
    assert case.spatial_shape == (150, 200) and len(case.spacing) == 2


@pytest.mark.realdata
def test_real_split_keeps_each_lesion_in_one_split(ham_sample: Path) -> None:
    refs = ham10000.list_cases(ham_sample)
    meta = ham10000.read_metadata(ham_sample)
    assert len(refs) == 1911
    split = {r.case_id: r.split for r in refs}
    per_lesion = meta.assign(split=[split[i] for i in meta.index]).groupby("lesion_id")["split"].nunique()
    assert per_lesion.max() == 1
    fractions = {s: sum(r.split == s for r in refs) / len(refs) for s in ("train", "validation", "test")}
    assert abs(fractions["test"] - 0.2) < 0.03 and abs(fractions["validation"] - 0.15) < 0.03
    for s in ("validation", "test"):  # stratified: every diagnosis in every split
        assert set(meta.loc[[r.case_id for r in refs if r.split == s], "dx"]) == set(ham10000.CLASS_NAMES)
    assert ham10000.class_names(ham_sample) == list(ham10000.CLASS_NAMES)


# --- splits ------------------------------------------------------------------------------------------


def test_split_is_deterministic_and_independent_of_row_order(tiny: Path, tmp_path: Path) -> None:
    first = ham10000.list_cases(tiny)
    assert ham10000.list_cases(tiny) == first
    other = write_dataset(tmp_path / "shuffled", ROWS[::-1])
    assert ham10000.list_cases(other) == first
    assert ham10000.list_cases(tiny, {"validation": 0.15, "test": 0.2, "seed": 1}) != first
    by_id = {r.case_id: r.split for r in first}
    for i in range(0, 40, 2):  # images 2k and 2k+1 show the same lesion
        assert by_id[f"ISIC_{i:04d}"] == by_id[f"ISIC_{i + 1:04d}"]


def test_split_file_overrides_the_computed_split(tiny: Path) -> None:
    lines = ["image_id,split"] + [
        f"{image},{'test' if i < 4 else 'train'}" for i, (_, image, _) in enumerate(ROWS)
    ]
    (tiny / "split.csv").write_text("\n".join(lines) + "\n")
    refs = ham10000.list_cases(tiny)
    assert [r.case_id for r in refs if r.split == "test"] == [f"ISIC_{i:04d}" for i in range(4)]


def test_split_file_putting_one_lesion_in_two_splits_is_refused(tiny: Path) -> None:
    lines = ["image_id,split"] + [
        f"{image},{'test' if i == 0 else 'train'}" for i, (_, image, _) in enumerate(ROWS)
    ]
    (tiny / "split.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(CtanError, match="HAM_000 is put in two splits") as err:
        ham10000.list_cases(tiny)
    assert_names(err, "split.csv")


def test_split_file_with_unknown_split_is_refused(tiny: Path) -> None:
    lines = ["image_id,split"] + [
        f"{image},{'holdout' if i == 0 else 'train'}" for i, (_, image, _) in enumerate(ROWS)
    ]
    (tiny / "split.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(CtanError, match="holdout") as err:
        ham10000.list_cases(tiny)
    assert_names(err, "split.csv")


# --- bad input ---------------------------------------------------------------------------------------


def test_synthetic_case_reads(tiny: Path) -> None:
    case = ham10000.read_case(tiny, CaseRef("ISIC_0002", "train"))
    assert case.image.shape == (3, 6, 8)
    assert case.dense["lesion"][0].tolist() == LESION
    assert case.labels == {"diagnosis": 1}


LESION = [[0] * 8] + [[0, 0, 1, 1, 1, 0, 0, 0]] * 3 + [[0] * 8] * 2  # write_dataset's lesion, image grid


def mask_variant(kind: str) -> Image.Image:
    """write_dataset's mask as users' copies of HAM10000 come: other values, noise, colour."""
    on = np.zeros((18, 24), dtype=bool)
    on[3:12, 6:15] = True
    grey = on.astype(np.uint8)
    if kind == "0/1 with a stray 2":
        grey[0, 0] = 2
        return Image.fromarray(grey)
    if kind == "0/1":
        return Image.fromarray(grey)
    if kind == "noisy 0/255":  # as a JPEG round trip leaves it: the background not quite 0
        return Image.fromarray(np.where(on, 250, np.arange(on.size).reshape(on.shape) % 4).astype(np.uint8))
    rgb = np.zeros((*on.shape, 3), dtype=np.uint8)
    rgb[on] = (255, 0, 0)  # "red lesion": grey 76, below a fixed cut at 127
    return Image.fromarray(rgb)


@pytest.mark.parametrize("kind", ["0/1", "0/1 with a stray 2", "noisy 0/255", "red lesion"])
def test_masks_in_other_values_give_the_same_lesion(tiny: Path, kind: str) -> None:
    mask_variant(kind).save(tiny / ham10000.MASK_FOLDER / "ISIC_0002_segmentation.png")
    assert ham10000.read_case(tiny, CaseRef("ISIC_0002", "train")).dense["lesion"][0].tolist() == LESION


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_corrupt_jpg_is_refused(tiny: Path, kind: str) -> None:
    path = tiny / "HAM10000_images" / "ISIC_0003.jpg"
    path.write_bytes(b"not a jpeg at all" if kind == "garbage" else path.read_bytes()[:200])
    with pytest.raises(CtanError, match="not a readable image") as err:
        ham10000.read_case(tiny, CaseRef("ISIC_0003", "train"))
    assert_names(err, "ISIC_0003.jpg")


def test_corrupt_png_is_refused(tiny: Path) -> None:
    path = tiny / ham10000.MASK_FOLDER / "ISIC_0003_segmentation.png"
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(CtanError, match="not a readable image") as err:
        ham10000.read_case(tiny, CaseRef("ISIC_0003", "train"))
    assert_names(err, "ISIC_0003_segmentation.png")


@pytest.mark.parametrize(
    ("shape", "message"), [((10, 10), "not the same picture"), ((18, 24), "lesion mask is empty")]
)
def test_mask_of_another_shape_or_empty_is_refused(tiny: Path, shape: tuple[int, int], message: str) -> None:
    Image.fromarray(np.full(shape, 0, dtype=np.uint8)).save(
        tiny / ham10000.MASK_FOLDER / "ISIC_0003_segmentation.png"
    )
    with pytest.raises(CtanError, match=message) as err:
        ham10000.read_case(tiny, CaseRef("ISIC_0003", "train"))
    assert_names(err, "ISIC_0003_segmentation.png")


def test_unknown_dx_is_refused(tmp_path: Path) -> None:
    root = write_dataset(tmp_path, [*ROWS[:3], ("HAM_999", "ISIC_9999", "melanoma")])
    with pytest.raises(CtanError, match="unknown dx 'melanoma'") as err:
        ham10000.list_cases(root)
    assert_names(err, ham10000.MARKER)


@pytest.mark.parametrize("missing", ["image", "mask"])
def test_missing_image_or_mask_is_refused(tiny: Path, missing: str) -> None:
    if missing == "image":
        path = tiny / "HAM10000_images" / "ISIC_0005.jpg"
    else:
        path = tiny / ham10000.MASK_FOLDER / "ISIC_0005_segmentation.png"
    path.unlink()
    for call in (
        lambda: ham10000.list_cases(tiny),
        lambda: ham10000.read_case(tiny, CaseRef("ISIC_0005", "train")),
    ):
        with pytest.raises(CtanError, match="missing") as err:
            call()
        assert_names(err, path.name)


def test_metadata_missing_columns_is_refused(tiny: Path) -> None:
    (tiny / ham10000.MARKER).write_text("lesion_id,image\nHAM_000,ISIC_0000\n")
    with pytest.raises(CtanError, match="missing column") as err:
        ham10000.list_cases(tiny)
    assert_names(err, ham10000.MARKER)


def test_empty_dataset_is_refused(tiny: Path) -> None:
    (tiny / ham10000.MARKER).write_text("lesion_id,image_id,dx,dx_type,age,sex,localization\n")
    with pytest.raises(CtanError, match="lists no images") as err:
        ham10000.list_cases(tiny)
    assert_names(err, ham10000.MARKER)


def test_image_parts_folders_of_the_official_release_are_found(tiny: Path) -> None:
    part = tiny / "HAM10000_images_part_2"
    part.mkdir()
    (tiny / "HAM10000_images" / "ISIC_0007.jpg").rename(part / "ISIC_0007.jpg")
    assert len(ham10000.list_cases(tiny)) == 40
    assert ham10000.read_case(tiny, CaseRef("ISIC_0007", "train")).sources[0] == part / "ISIC_0007.jpg"


def test_a_16_bit_picture_is_refused(tiny: Path) -> None:
    """Pillow clips a 16-bit grey image to 255 when making it RGB: the picture would be white."""
    path = tiny / "HAM10000_images" / "ISIC_0003.jpg"
    Image.fromarray(np.full((6, 8), 30000, dtype=np.uint16)).save(path, format="PNG")
    with pytest.raises(CtanError, match="16/32-bit") as err:
        ham10000.read_case(tiny, CaseRef("ISIC_0003", "train"))
    assert_names(err, "ISIC_0003.jpg")


def test_a_16_bit_mask_reads(tiny: Path) -> None:
    mask = np.zeros((18, 24), dtype=np.uint16)
    mask[3:12, 6:15] = 65535
    Image.fromarray(mask).save(tiny / ham10000.MASK_FOLDER / "ISIC_0002_segmentation.png")
    assert ham10000.read_case(tiny, CaseRef("ISIC_0002", "train")).dense["lesion"][0].tolist() == LESION


@pytest.mark.parametrize("name", ["ISIC_0003.JPG", "ISIC_0003.png"])
def test_a_picture_named_otherwise_is_pointed_at(tiny: Path, name: str) -> None:
    folder = tiny / "HAM10000_images"
    (folder / "ISIC_0003.jpg").rename(folder / name)
    with pytest.raises(CtanError, match=f"found {name}: rename it") as err:
        ham10000.list_cases(tiny)
    assert_names(err, "ISIC_0003.jpg")


def test_one_image_in_two_part_folders_is_refused(tiny: Path) -> None:
    part = tiny / "HAM10000_images_part_2"
    part.mkdir()
    (part / "ISIC_0003.jpg").write_bytes((tiny / "HAM10000_images" / "ISIC_0003.jpg").read_bytes())
    with pytest.raises(CtanError, match="also in HAM10000_images/") as err:
        ham10000.list_cases(tiny)
    assert_names(err, "ISIC_0003.jpg")


def test_metadata_typed_with_spaces_after_the_commas_reads(tiny: Path) -> None:
    """ "lesion_id, image_id, dx" was refused as missing image_id and dx."""
    meta = tiny / ham10000.MARKER
    meta.write_text(meta.read_text().replace(",", ", "))
    refs = ham10000.list_cases(tiny)
    assert len(refs) == len(ROWS)
    assert ham10000.read_case(tiny, refs[0]).labels["diagnosis"] == ham10000.CLASS_NAMES.index(ROWS[0][2])


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels (a damaged header), with one byte of data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


def test_a_mask_whose_header_claims_a_huge_size_is_refused(tiny: Path) -> None:
    """Pillow's DecompressionBombError (not an OSError) escaped as a traceback."""
    (tiny / ham10000.MASK_FOLDER / "ISIC_0003_segmentation.png").write_bytes(
        png_header_claiming(30000, 30000)
    )
    with pytest.raises(CtanError, match="not a readable image") as err:
        ham10000.read_case(tiny, CaseRef("ISIC_0003", "train"))
    assert_names(err, "ISIC_0003_segmentation.png")


def test_an_image_id_written_with_its_extension_is_pointed_at(tiny: Path) -> None:
    """Was "HAM10000_images/ISIC_0003.jpg.jpg: missing", which hides what is wrong."""
    meta = tiny / ham10000.MARKER
    meta.write_text(meta.read_text().replace(",ISIC_0003,", ",ISIC_0003.jpg,"))
    with pytest.raises(CtanError, match=r"image_id ISIC_0003.jpg has a file extension.*\(ISIC_0003\)") as err:
        ham10000.list_cases(tiny)
    assert_names(err, ham10000.MARKER)
