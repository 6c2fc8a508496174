"""CaseDataset: items as the contract says, normalisation, deterministic augmentation, patches, flips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ctan.datasets.base import Case
from ctan.errors import CtanError
from ctan.loader import (
    CaseDataset,
    EpochSampler,
    colour_jitter,
    flip,
    lateral_pairs,
    patch_start,
    prefetched,
    read_window,
    swap_channels,
)
from ctan.preprocess.intensity import normalise_ct, normalise_rgb
from ctan.store import create_split, write_case
from ctan.tasks import Task

WINDOW = [-1000.0, 1500.0]
STRUCTURES = ["LeftParotid", "RightParotid", "PTV70"]
DOSE = Task("dose", "regression", "dose", metrics=("dose_score",), primary_metrics=("dose_score",))
SEG = Task(
    "structures",
    "segmentation",
    "structures",
    channels=3,
    multilabel=True,
    metrics=("dice",),
    primary_metrics=("dice",),
)
LESION = Task("lesion", "segmentation", "lesion", metrics=("jaccard",), primary_metrics=("jaccard",))
DIAGNOSIS = Task(
    "diagnosis",
    "classification",
    "diagnosis",
    classes=7,
    metrics=("balanced_accuracy",),
    primary_metrics=("balanced_accuracy",),
)
SHAPE_3D = (6, 8, 10)  # (z, y, x); x even so that the left and right halves mirror each other


def _ct_case(i: int) -> Case:
    """A case whose targets are functions of the image, so image and targets can be checked together:
    dose = HU / 100 in Gy, PTV70 = HU > 0, and parotids that depend only on x (left half / right half)."""
    rng = np.random.default_rng(i)
    hu = rng.uniform(-1200, 2000, (1, *SHAPE_3D)).astype(np.float32)
    x = np.arange(SHAPE_3D[2])
    left = np.broadcast_to(x < SHAPE_3D[2] // 2, SHAPE_3D)
    structures = np.stack([left, ~left, hu[0] > 0]).astype(np.uint8)
    return Case(
        case_id=f"pt_{i}",
        split="train",
        image=hu,
        spacing=(3.0, 4.0, 4.0),
        dense={
            "dose": hu / 100,
            "possible_dose_mask": (hu > -500).astype(np.uint8),
            "structures": structures,
        },
        structure_present=(True, False, True),  # RightParotid not contoured: must move with a left-right flip
    )


def _rgb_case(i: int) -> Case:
    rng = np.random.default_rng(100 + i)
    rgb = rng.integers(0, 256, (3, 12, 16), dtype=np.uint8)
    return Case(
        case_id=f"ISIC_{i:07d}",
        split="train",
        image=rgb,
        spacing=(1.0, 1.0),
        dense={"lesion": (rgb[0] > 128)[None].astype(np.uint8)},
        labels={"diagnosis": i % 7},
    )


def _store(tmp: Path, cases: list[Case], spatial_dims: int, intensity: dict) -> Path:
    root = create_split(
        tmp / "train.zarr",
        {
            "dataset": "test",
            "format": "test",
            "split": "train",
            "spatial_dims": spatial_dims,
            "case_ids": [c.case_id for c in cases],
            "structure_names": STRUCTURES if spatial_dims == 3 else [],
            "class_names": [],
            "tasks": [],
            "intensity": intensity,
        },
    )
    for case in cases:
        write_case(root, case)
    return tmp


@pytest.fixture(scope="module")
def ct_store(tmp_path_factory) -> Path:
    return _store(tmp_path_factory.mktemp("ct"), [_ct_case(i) for i in range(5)], 3, {"ct_window": WINDOW})


@pytest.fixture(scope="module")
def rgb_store(tmp_path_factory) -> Path:
    return _store(tmp_path_factory.mktemp("rgb"), [_rgb_case(i) for i in range(4)], 2, {"scale": 255})


def test_whole_case_items_follow_the_contract(ct_store):
    ds = CaseDataset(ct_store, "train", [DOSE, SEG])
    assert len(ds) == 5
    item = ds[1]
    case = _ct_case(1)
    assert item["case_id"] == "pt_1"
    for name, shape in [("image", (1, *SHAPE_3D)), ("dose", (1, *SHAPE_3D)), ("structures", (3, *SHAPE_3D))]:
        assert item[name].dtype == torch.float32 and tuple(item[name].shape) == shape, name
    assert item["possible_dose_mask"].dtype == torch.float32
    assert item["structure_present"].dtype == torch.bool
    assert item["structure_present"].tolist() == [True, False, True]
    image = item["image"].numpy()
    assert 0.0 <= image.min() and image.max() <= 1.0
    np.testing.assert_array_equal(image, normalise_ct(case.image, WINDOW))
    np.testing.assert_array_equal(item["dose"].numpy(), case.dense["dose"])
    np.testing.assert_array_equal(item["structures"].numpy(), case.dense["structures"])


def test_rgb_is_scaled_to_unit_range_and_labels_are_int64(rgb_store):
    ds = CaseDataset(rgb_store, "train", [LESION, DIAGNOSIS])
    item = ds[3]
    np.testing.assert_array_equal(item["image"].numpy(), normalise_rgb(_rgb_case(3).image))
    assert (
        item["diagnosis"].dtype == torch.int64
        and item["diagnosis"].shape == ()
        and int(item["diagnosis"]) == 3
    )
    assert item["lesion"].dtype == torch.float32 and tuple(item["lesion"].shape) == (1, 12, 16)
    assert "possible_dose_mask" not in item and "structure_present" not in item


def test_augmentation_is_a_function_of_seed_epoch_and_index(ct_store):
    a = CaseDataset(ct_store, "train", [DOSE, SEG], patch_size=(4, 4, 4), augment=True, seed=3)
    b = CaseDataset(ct_store, "train", [DOSE, SEG], patch_size=(4, 4, 4), augment=True, seed=3)
    for i in range(len(a)):
        for key in ("image", "dose", "structures", "structure_present"):
            assert torch.equal(a[i][key], b[i][key])
    plans = {a.augmentation(i) for i in range(len(a))}
    a.set_epoch(1)
    assert {a.augmentation(i) for i in range(len(a))} != plans  # a new epoch draws anew
    b.seed = 4
    assert {b.augmentation(i) for i in range(len(b))} != plans


def test_batches_do_not_depend_on_the_number_of_workers(ct_store):
    ds = CaseDataset(ct_store, "train", [DOSE, SEG], patch_size=(4, 6, 6), augment=True, seed=1)
    ds.set_epoch(2)
    single = list(DataLoader(ds, batch_size=2))
    parallel = list(DataLoader(ds, batch_size=2, num_workers=2))
    assert len(single) == len(parallel) == 3
    for s, p in zip(single, parallel, strict=True):
        assert s["case_id"] == p["case_id"]
        for key in ("image", "dose", "structures", "possible_dose_mask", "structure_present"):
            assert torch.equal(s[key], p[key]), key
    assert tuple(single[0]["image"].shape) == (2, 1, 4, 6, 6)


def test_a_patch_is_the_corresponding_slice_of_the_case(ct_store):
    whole = CaseDataset(ct_store, "train", [DOSE, SEG])
    ds = CaseDataset(ct_store, "train", [DOSE, SEG], patch_size=(3, 5, 4), augment=True, seed=7)
    seen_flips = set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            full, item, aug = whole[i], ds[i], ds.augmentation(i)
            seen_flips.add(aug.flips)
            window = tuple(slice(s, s + p) for s, p in zip(aug.start, (3, 5, 4), strict=True))
            for key in ("image", "dose", "possible_dose_mask"):
                expected = flip(full[key].numpy()[(slice(None), *window)], aug.flips)
                np.testing.assert_array_equal(item[key].numpy(), expected, err_msg=key)
    assert len(seen_flips) > 3  # the test did see several flip combinations


def test_without_augmentation_a_patch_is_centred(ct_store):
    ds = CaseDataset(ct_store, "train", [DOSE], patch_size=(4, 4, 4))
    full = CaseDataset(ct_store, "train", [DOSE])[0]["image"].numpy()
    np.testing.assert_array_equal(ds[0]["image"].numpy(), full[:, 1:5, 2:6, 3:7])


def test_flips_move_image_and_dense_targets_together(ct_store):
    ds = CaseDataset(ct_store, "train", [DOSE, SEG], augment=True, seed=0)
    x_flips = 0
    for epoch in range(6):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            hu = item["image"].numpy() * (WINDOW[1] - WINDOW[0]) + WINDOW[0]
            inside = (hu > WINDOW[0] + 1) & (hu < WINDOW[1] - 1)  # not clipped by the window
            np.testing.assert_allclose(item["dose"].numpy()[inside] * 100, hu[inside], rtol=1e-4, atol=0.05)
            np.testing.assert_array_equal(item["structures"].numpy()[2], (item["dose"].numpy()[0] > 0))
            # Parotids depend on x only: after a left-right flip with the channel swap they are unchanged.
            np.testing.assert_array_equal(item["structures"].numpy()[:2], _ct_case(i).dense["structures"][:2])
            x_flipped = 2 in ds.augmentation(i).flips
            x_flips += x_flipped
            assert item["structure_present"].tolist() == (
                [False, True, True] if x_flipped else [True, False, True]
            )
    assert x_flips > 0


def test_2d_flips_and_colour_jitter(rgb_store):
    ds = CaseDataset(rgb_store, "train", [LESION, DIAGNOSIS], augment=True, seed=5)
    whole = CaseDataset(rgb_store, "train", [LESION, DIAGNOSIS])
    for i in range(len(ds)):
        aug, item, full = ds.augmentation(i), ds[i], whole[i]
        assert aug.brightness != 1.0 and 0.9 <= aug.saturation <= 1.1
        expected = colour_jitter(
            flip(full["image"].numpy(), aug.flips), aug.brightness, aug.contrast, aug.saturation
        )
        np.testing.assert_array_equal(item["image"].numpy(), expected)
        np.testing.assert_array_equal(item["lesion"].numpy(), flip(full["lesion"].numpy(), aug.flips))
        assert 0 <= item["image"].min() and item["image"].max() <= 1
        assert int(item["diagnosis"]) == int(full["diagnosis"])


def test_colour_jitter_gives_the_bits_of_the_plain_formula():
    """The in-place form equals the textbook one (ColorJitter's order), so items did not change."""
    grey_row = np.array([0.299, 0.587, 0.114], np.float32)

    def plain(rgb, b, c, s):
        out = np.clip(rgb * b, 0, 1)
        grey = np.tensordot(grey_row, out, axes=1)
        out = np.clip(grey.mean() + c * (out - grey.mean()), 0, 1)
        grey = np.tensordot(grey_row, out, axes=1)
        return np.clip(grey + s * (out - grey), 0, 1).astype(np.float32)

    rng = np.random.default_rng(0)
    for shape in ((3, 48, 48), (3, 5, 7), (3, 150, 200)):
        rgb = rng.random(shape, dtype=np.float32)
        for b, c, s in rng.uniform(0.6, 1.4, size=(5, 3)).tolist():
            expected = plain(rgb, b, c, s)
            got = colour_jitter(rgb, b, c, s)
            assert got.dtype == np.float32 and got.shape == shape
            np.testing.assert_array_equal(got, expected)


def test_epoch_sampler_orders_as_a_seeded_shuffling_dataloader():
    for seed, epoch, size in ((0, 1, 10), (3, 7, 33)):
        sampler = EpochSampler(size, seed, shuffle=True)
        sampler.set_epoch(epoch)
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        expected = list(DataLoader(range(size), batch_size=None, shuffle=True, generator=generator))
        assert list(sampler) == [(epoch, int(i)) for i in expected]
    assert list(EpochSampler(4, 0, shuffle=False)) == [(0, 0), (0, 1), (0, 2), (0, 3)]


def test_persistent_workers_give_the_batches_of_the_main_process(ct_store):
    from ctan.training.trainer import loaders

    batches = {}
    for workers in (0, 1):
        train = CaseDataset(ct_store, "train", [DOSE, SEG], patch_size=(4, 6, 6), augment=True, seed=1)
        val = CaseDataset(ct_store, "train", [DOSE, SEG], patch_size=(4, 6, 6), seed=1)
        train_loader, val_loader = loaders(train, val, {"batch_size": 2, "num_workers": workers}, 1)
        batches[workers] = []
        for epoch in (1, 2, 3):  # the same worker serves every epoch, drawing each epoch's augmentation
            train_loader.sampler.set_epoch(epoch)
            batches[workers] += list(train_loader) + list(val_loader)
    assert len(batches[0]) == len(batches[1]) > 6
    for a, b in zip(batches[0], batches[1], strict=True):
        assert a["case_id"] == b["case_id"]
        for key in ("image", "dose", "structures", "possible_dose_mask", "structure_present"):
            assert torch.equal(a[key], b[key]), key
    assert not torch.equal(batches[0][0]["image"], batches[0][len(batches[0]) // 3]["image"])


def test_prefetched_batches_are_the_loaders_in_order(ct_store, rgb_store):
    for store, tasks, patch in ((ct_store, [DOSE, SEG], (4, 6, 6)), (rgb_store, [LESION, DIAGNOSIS], None)):
        ds = CaseDataset(store, "train", tasks, patch_size=patch, augment=True, seed=3)
        loader = DataLoader(ds, batch_size=2, sampler=EpochSampler(len(ds), 3, shuffle=True))
        for epoch in (1, 2):
            loader.sampler.set_epoch(epoch)
            plain, ahead = list(loader), list(prefetched(loader, depth=1))
            assert len(plain) == len(ahead) > 1
            for a, b in zip(plain, ahead, strict=True):
                assert a["case_id"] == b["case_id"]
                for key in ("image", *(t.name for t in tasks)):
                    assert torch.equal(a[key], b[key]), key


def test_prefetched_raises_the_threads_error_and_stops_when_closed():
    import threading

    def failing():
        yield 1
        raise CtanError(Path("store.zarr"), "broken shard")

    batches = prefetched(failing())
    assert next(batches) == 1
    with pytest.raises(CtanError, match="broken shard"):
        next(batches)

    built = []

    def endless():
        while True:
            built.append(len(built))
            yield built[-1]

    batches = prefetched(endless(), depth=2)
    assert [next(batches) for _ in range(3)] == [0, 1, 2]
    batches.close()
    assert not any(t.name == "ctan-prefetch" for t in threading.enumerate())
    assert len(built) <= 3 + 2 + 1  # consumed, queued, and at most one being built when told to stop


def test_patch_larger_than_the_case_is_padded_with_air_and_background(ct_store):
    ds = CaseDataset(ct_store, "train", [DOSE, SEG], patch_size=(8, 8, 12))
    item = ds[0]
    assert tuple(item["image"].shape) == (1, 8, 8, 12)
    assert item["image"][0, 0].abs().max() == 0  # air: the bottom of the window
    assert item["dose"][0, -1].abs().max() == 0 and item["structures"][:, :, :, 0].abs().max() == 0


def test_pure_helpers():
    assert patch_start((10, 4), (4, 4)) == (3, 0)
    assert patch_start((4,), (6,)) == (-1,)
    starts = {patch_start((10,), (4,), np.random.default_rng(s))[0] for s in range(60)}
    assert starts == set(range(7))
    a = np.arange(12).reshape(1, 3, 4)
    np.testing.assert_array_equal(read_window(a, (1, -1), (2, 3), fill=-5), [[[-5, 4, 5], [-5, 8, 9]]])
    assert lateral_pairs(["LeftParotid", "Brainstem", "RightParotid", "Femur_R", "Femur_L", "PTV"]) == [
        (0, 2),
        (4, 3),
    ]
    np.testing.assert_array_equal(swap_channels(np.array([1, 2, 3]), [(0, 2)]), [3, 2, 1])
    grey = np.full((3, 2, 2), 0.5, np.float32)
    np.testing.assert_allclose(colour_jitter(grey, 1.0, 1.3, 0.7), grey, atol=1e-6)  # grey has no contrast
    np.testing.assert_allclose(colour_jitter(grey, 1.2, 1.0, 1.0), grey * 1.2, atol=1e-6)


def test_bad_requests_name_the_store(ct_store, tmp_path):
    with pytest.raises(CtanError, match="diagnosis"):
        CaseDataset(ct_store, "train", [DIAGNOSIS])
    with pytest.raises(CtanError, match="patch_size"):
        CaseDataset(ct_store, "train", [DOSE], patch_size=(4, 4))
    with pytest.raises(CtanError, match="zarr"):
        CaseDataset(tmp_path, "validation", [DOSE])


def test_cached_items_equal_read_items_and_the_cache_keeps_its_budget(ct_store):
    plain = CaseDataset(ct_store, "train", [DOSE, SEG], patch_size=(4, 6, 6), augment=True, seed=3)
    cached = CaseDataset(
        ct_store, "train", [DOSE, SEG], patch_size=(4, 6, 6), augment=True, seed=3, cache_mb=64
    )
    for epoch in (1, 2):
        plain.set_epoch(epoch)
        cached.set_epoch(epoch)
        for i in range(len(plain)):
            a, b = plain[i], cached[i]
            for key in ("image", "dose", "structures", "possible_dose_mask", "structure_present"):
                assert torch.equal(a[key], b[key]), key
    assert 0 < cached._cached <= 64 * 2**20
    assert plain._cached == 0
    tiny = CaseDataset(ct_store, "train", [DOSE, SEG], cache_mb=0)
    tiny[0]
    assert tiny._cached == 0 and not any(isinstance(v, np.ndarray) for v in tiny._arrays.values())


def test_preloaded_items_equal_read_items(ct_store, rgb_store):
    """The one-pass preload (shards decoded without zarr) gives exactly the items zarr reads give."""
    cases = [(ct_store, [DOSE, SEG], (4, 6, 6)), (rgb_store, [LESION, DIAGNOSIS], None)]
    for store, tasks, patch in cases:
        plain = CaseDataset(store, "train", tasks, patch_size=patch, augment=True, seed=3)
        loaded = CaseDataset(store, "train", tasks, patch_size=patch, augment=True, seed=3, cache_mb=64)
        loaded._open()
        names = loaded._needed_arrays()
        assert len(loaded._arrays) == len(loaded) * len(names)  # everything came from the preload
        assert loaded._attrs == {c: loaded._open().case_attrs(c) for c in loaded.case_ids}
        for epoch in (1, 2):
            plain.set_epoch(epoch)
            loaded.set_epoch(epoch)
            for i in range(len(plain)):
                a, b = plain[i], loaded[i]
                assert a.keys() == b.keys()
                for key, value in a.items():
                    if torch.is_tensor(value):
                        assert value.dtype == b[key].dtype and torch.equal(value, b[key]), key


@pytest.mark.parametrize("shape", [(2, 70, 5), (1, 3, 130, 4), (3, 8, 8)])
@pytest.mark.parametrize("dtype", [np.float32, np.uint8, np.int16])
def test_read_shard_decodes_what_zarr_reads(tmp_path, shape, dtype):
    """Several inner chunks, partial edge chunks, an empty chunk and an all-fill array."""
    import zarr

    from ctan.loader import read_shard
    from ctan.store import _COMPRESSOR, _chunks, _shards

    rng = np.random.default_rng(0)
    data = (rng.uniform(0, 100, shape)).astype(dtype)
    data[0] = 0  # the first channel's chunks hold only the fill value: zarr leaves them out
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    chunks = _chunks(shape)
    for name, values in (("a", data), ("zeros", np.zeros(shape, dtype))):
        group.create_array(
            name, data=values, chunks=chunks, shards=_shards(shape, chunks), compressors=_COMPRESSOR
        )
        expected = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")[name][...]
        out = read_shard(tmp_path / "s.zarr" / name)
        assert out is not None and out.dtype == expected.dtype and np.array_equal(out, expected)
    plain = tmp_path / "plain.zarr"
    zarr.open_group(str(plain), mode="w", zarr_format=3).create_array("a", data=data, chunks=chunks)
    assert read_shard(plain / "a") is None  # not a layout it knows: the loader reads through zarr
    assert read_shard(tmp_path / "missing") is None


@pytest.mark.parametrize("augment", [True, False])
def test_batched_2d_items_equal_items_one_by_one(rgb_store, ct_store, augment):
    """`__getitems__` (what the DataLoader calls) gives, bit for bit, the items `__getitem__` gives:
    the batched normalisation, flips and colour jitter of cached 2D images, and the per-item path
    for 3D and for cases not held in memory."""
    from torch.utils.data import DataLoader

    from ctan.loader import EpochSampler

    setups = [(rgb_store, [LESION, DIAGNOSIS], None, 64), (rgb_store, [LESION, DIAGNOSIS], None, 0)]
    setups.append((ct_store, [DOSE, SEG], (4, 6, 6), 64))
    for store, tasks, patch, cache in setups:
        ds = CaseDataset(store, "train", tasks, patch_size=patch, augment=augment, seed=7, cache_mb=cache)
        for epoch in (0, 3):
            keys = [(epoch, i) for i in (2, 0, 3, 1)]
            batch, single = ds.__getitems__(keys), [ds[k] for k in keys]
            for a, b in zip(batch, single, strict=True):
                assert a.keys() == b.keys()
                for key, value in b.items():
                    if torch.is_tensor(value):
                        assert value.dtype == a[key].dtype and torch.equal(value, a[key]), key
                    else:
                        assert value == a[key]
        sampler = EpochSampler(len(ds), 7, shuffle=True)
        loader = DataLoader(ds, batch_size=3, sampler=sampler)
        sampler.set_epoch(1)
        ds.set_epoch(1)
        order = list(sampler)
        for n, got in enumerate(loader):  # the DataLoader takes the batched path
            want = [ds[k] for k in order[3 * n : 3 * n + 3]]
            assert torch.equal(got["image"], torch.stack([w["image"] for w in want]))


def test_severity_items_carry_the_covid_label_it_is_scored_among(tmp_path):
    """STOIC's severity AUC is among COVID-positive cases: an STL severity network's validation needs
    the COVID labels it does not train on."""
    from ctan.tasks import Task

    cases = [
        Case(
            case_id=f"p{i}",
            split="train",
            image=np.full((1, 4, 4, 4), -500.0, np.float32),
            spacing=(1.0, 1.0, 1.0),
            labels={"covid": i % 2, "severity": int(i == 3)},
        )
        for i in range(4)
    ]
    store = _store(tmp_path, cases, 3, {"ct_window": WINDOW})
    severity = Task("severity", "classification", "severity", classes=2)
    covid = Task("covid", "classification", "covid", classes=2)
    items = CaseDataset(store, "train", [severity])
    assert [int(items[i]["covid"]) for i in range(4)] == [0, 1, 0, 1]
    both = CaseDataset(store, "train", [covid, severity])
    assert [int(both[i]["covid"]) for i in range(4)] == [0, 1, 0, 1]  # the covid task's own label
    assert [int(CaseDataset(store, "train", [covid])[i]["covid"]) for i in range(4)] == [0, 1, 0, 1]
