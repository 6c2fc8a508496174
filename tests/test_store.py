"""Preprocessed stores are valid OME-Zarr 0.5 (checked with ome-zarr-models) and read back by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from ome_zarr_models.v05 import image as ome  # the dev extra: a validator made for OME-Zarr
from zarr.codecs import BloscCodec
from zarr.core.sync import sync

from ctan.datasets.base import Case
from ctan.store import _BLOSC, _COMPRESSOR, SplitStore, _case_nodes, _write_case, create_split, write_case


def _ct_case() -> Case:
    rng = np.random.default_rng(0)
    shape = (6, 7, 8)
    structures = (rng.random((2, *shape)) > 0.5).astype(np.uint8)
    return Case(
        case_id="pt_1",
        split="train",
        image=rng.normal(0, 300, (1, *shape)).astype(np.float32),
        spacing=(3.0, 2.0, 2.0),
        origin=(-10.0, 5.0, 7.5),
        direction=tuple(np.eye(3).ravel().tolist()),
        dense={
            "dose": rng.uniform(0, 70, (1, *shape)).astype(np.float32),
            "possible_dose_mask": np.ones((1, *shape), np.uint8),
            "structures": structures,
        },
        structure_present=(True, False),
    )


def _rgb_case() -> Case:
    rgb = np.random.default_rng(1).integers(0, 256, (3, 12, 16), dtype=np.uint8)
    return Case(
        case_id="ISIC_0000001",
        split="train",
        image=rgb,
        spacing=(1.0, 1.0),
        dense={"lesion": (rgb[0] > 128)[None].astype(np.uint8)},
        labels={"diagnosis": 3},
    )


def _write(path: Path, case: Case) -> SplitStore:
    root = create_split(path, {"case_ids": [case.case_id], "spatial_dims": len(case.spacing)})
    write_case(root, case)
    return SplitStore.open(path)


@pytest.mark.parametrize("make", [_ct_case, _rgb_case])
def test_each_case_is_a_valid_ome_zarr_image_with_its_masks_as_labels(tmp_path, make):
    case = make()
    _write(tmp_path / "train.zarr", case)
    image = ome.Image.from_zarr(zarr.open_group(str(tmp_path / "train.zarr" / case.case_id), mode="r"))
    masks = [name for name, data in case.dense.items() if data.dtype == np.uint8]
    assert image.labels is not None and image.labels.label_paths == masks
    multiscales = image.ome_attributes.multiscales
    assert [m.datasets[0].path for m in multiscales] == ["image"] + (["dose"] if "dose" in case.dense else [])
    axes = ["c", *["z", "y", "x"][-len(case.spacing) :]]
    assert [a.name for a in multiscales[0].axes] == axes
    scale = multiscales[0].datasets[0].coordinateTransformations[0].scale
    assert list(scale) == [1.0, *case.spacing]


@pytest.mark.parametrize("make", [_ct_case, _rgb_case])
def test_arrays_read_back_by_name(tmp_path, make):
    case = make()
    store = _write(tmp_path / "train.zarr", case)
    assert store.array_names(case.case_id) == sorted(["image", *case.dense])
    got = store.read_case(case.case_id)
    for name, data in {"image": case.image, **case.dense}.items():
        np.testing.assert_array_equal(got[name], data)
        assert got[name].dtype == data.dtype
    assert store.array(case.case_id, "image")[0, :2].shape == (2, *case.image.shape[2:])
    assert got["attrs"]["structure_present"] == list(case.structure_present)


def test_a_store_without_labels_group_still_reads(tmp_path):
    """Stores written before labels/ existed keep every array flat in the case group."""
    root = create_split(tmp_path / "old.zarr", {"case_ids": ["a"], "spatial_dims": 2})
    group = root.create_group("a")
    group.attrs["ctan"] = {"labels": {}}
    group.create_array("image", data=np.zeros((1, 4, 4), np.float32))
    group.create_array("lesion", data=np.ones((1, 4, 4), np.uint8))
    store = SplitStore.open(tmp_path / "old.zarr")
    assert store.array_names("a") == ["image", "lesion"]
    assert store.read_case("a")["lesion"].sum() == 16


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("make", [_ct_case, _rgb_case])
def test_staged_write_gives_the_files_zarr_writes_itself(tmp_path, make, monkeypatch):
    """write_case builds a case in memory (Blosc encoding inline) and writes its files; zarr writing them
    to disk with its own Blosc codec gives the same."""
    case = make()
    attrs = {"case_ids": [case.case_id, "other"], "spatial_dims": len(case.spacing)}
    ours = create_split(tmp_path / "ours.zarr", attrs)
    write_case(ours, case, {"source": "x"})
    other = Case(**{**vars(case), "case_id": "other"})
    write_case(ours, other)
    zarrs = create_split(tmp_path / "zarr.zarr", attrs)
    stock = BloscCodec(**_BLOSC)
    assert type(stock) is BloscCodec and type(_COMPRESSOR) is not BloscCodec
    monkeypatch.setattr("ctan.store._COMPRESSOR", stock)
    for c, extra in ((case, {"source": "x"}), (other, None)):
        sync(_write_case(zarrs._async_group, c.case_id, *_case_nodes(c, extra)))
    assert _files(tmp_path / "ours.zarr") == _files(tmp_path / "zarr.zarr")
    assert SplitStore.open(tmp_path / "ours.zarr").attrs == attrs  # the root's attributes are kept


def test_write_case_refuses_a_store_off_the_file_system():
    with pytest.raises(TypeError, match="local file system"):
        write_case(zarr.open_group(zarr.storage.MemoryStore(), mode="w", zarr_format=3), _ct_case())


def test_a_case_cannot_be_written_twice_into_a_split(tmp_path):
    root = create_split(tmp_path / "train.zarr", {"case_ids": ["pt_1"], "spatial_dims": 3})
    write_case(root, _ct_case())
    before = _files(tmp_path / "train.zarr")
    with pytest.raises(FileExistsError, match="pt_1"):
        write_case(root, _ct_case())
    assert _files(tmp_path / "train.zarr") == before
