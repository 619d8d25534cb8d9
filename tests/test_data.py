"""Tests of repsearch.data: roots, layouts, decode cache, splits, device loader, augmentation."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from repsearch import data as D
from repsearch.errors import DataError
from repsearch.data import DeviceLoader, build_data, find_layout, load_arrays, make_splits, resolve_data_root

MEAN = (0.5, 0.25, 0.75)
STD = (0.2, 0.3, 0.4)


def _write_folder(root: Path, splits=("train", "val"), classes=("a", "b", "c"), per_class=4, size=32, seed=0) -> dict:
    """An ImageFolder of lossless PNGs; returns {split: (N, size, size, 3) uint8 in ImageFolder order}."""
    rng = np.random.default_rng(seed)
    out = {}
    for split in splits:
        images = []
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(img).save(folder / f"{i:04d}.png")
                images.append(img)
        out[split] = np.stack(images)
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("REPSEARCH_CACHE", str(folder))
    return folder


# --------------------------------------------------------------------------- root and layout


def test_resolve_data_root_precedence_and_relative(tmp_path, monkeypatch):
    for name in ("cli", "env", "recipe"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REPSEARCH_DATA", str(tmp_path / "env"))
    assert resolve_data_root("cli", "recipe") == tmp_path / "cli"  # relative to cwd
    assert resolve_data_root(None, "recipe") == tmp_path / "env"
    monkeypatch.delenv("REPSEARCH_DATA")
    assert resolve_data_root(None, "recipe") == tmp_path / "recipe"
    assert resolve_data_root(None, str(tmp_path / "recipe")) == tmp_path / "recipe"


def test_resolve_data_root_missing_names_all_three_sources(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REPSEARCH_DATA", "/nonexistent/env-root")
    with pytest.raises(DataError) as info:
        resolve_data_root("nope-cli", "nope-recipe")
    msg = str(info.value)
    assert "\n" not in msg
    for part in ("--data-root", "nope-cli", "REPSEARCH_DATA", "/nonexistent/env-root", "data.root", "nope-recipe"):
        assert part in msg
    monkeypatch.delenv("REPSEARCH_DATA")
    with pytest.raises(DataError, match=r"REPSEARCH_DATA=\(unset\)"):
        resolve_data_root(None, None)


def test_find_layout(tmp_path):
    (tmp_path / "cifar10" / "train").mkdir(parents=True)
    (tmp_path / "cifar10" / "test").mkdir()
    assert find_layout(tmp_path, "cifar10") == ("imagefolder", tmp_path / "cifar10")
    (tmp_path / "cifar-10-batches-py").mkdir()
    assert find_layout(tmp_path, "cifar10", "auto") == ("torchvision", tmp_path / "cifar-10-batches-py")
    assert find_layout(tmp_path, "cifar10", "imagefolder") == ("imagefolder", tmp_path / "cifar10")
    with pytest.raises(DataError) as info:
        find_layout(tmp_path, "cifar100")
    msg = str(info.value)
    assert "cifar-100-python" in msg and "cifar100" in msg and "\n" not in msg
    with pytest.raises(DataError, match="cifar-100-python"):
        find_layout(tmp_path, "cifar100", "torchvision")
    with pytest.raises(DataError, match="unknown dataset"):
        find_layout(tmp_path, "mnist")
    with pytest.raises(DataError, match="unknown data format"):
        find_layout(tmp_path, "cifar10", "lmdb")
    with pytest.raises(DataError, match="val"):
        find_layout(tmp_path, "folder")
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    assert find_layout(tmp_path, "folder") == ("imagefolder", tmp_path)


def test_real_data_layout(data_root):
    assert find_layout(data_root, "cifar10") == ("imagefolder", data_root / "cifar10")


def test_corrupt_torchvision_layout_is_a_data_error(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(DataError) as info:
        load_arrays(tmp_path, "cifar10")
    assert "CIFAR-10" in str(info.value) and "\n" not in str(info.value)


def test_download_refuses_imagefolder(tmp_path):
    with pytest.raises(DataError, match="download"):
        load_arrays(tmp_path, "cifar10", "imagefolder", download=True)
    with pytest.raises(DataError, match="download"):
        load_arrays(tmp_path, "folder", download=True)


# --------------------------------------------------------------------------- decode cache


def test_decode_cache_reused_and_root_untouched(tmp_path, cache, monkeypatch):
    root = tmp_path / "data"
    truth = _write_folder(root)
    before = sorted(str(p) for p in root.rglob("*"))
    calls = []
    real_decode = D._decode_all

    def counting(paths, size):
        calls.append(len(paths))
        return real_decode(paths, size)

    monkeypatch.setattr(D, "_decode_all", counting)
    first = load_arrays(root, "folder")
    assert calls == [24]
    np.testing.assert_array_equal(first.train_x, truth["train"])  # lossless PNG: exact pixels
    np.testing.assert_array_equal(first.test_x, truth["val"])
    np.testing.assert_array_equal(first.train_y, np.repeat([0, 1, 2], 4))
    assert first.classes == ["a", "b", "c"]
    assert len(list(cache.glob("*.npz"))) == 1
    assert not list(cache.glob("*.tmp"))
    assert sorted(str(p) for p in root.rglob("*")) == before  # nothing written into the data root

    def fail(paths, size):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(D, "_decode_all", fail)
    second = load_arrays(root, "folder")
    np.testing.assert_array_equal(second.train_x, first.train_x)
    assert second.mean == pytest.approx(first.mean) and second.std == pytest.approx(first.std)
    assert second.mean == pytest.approx(tuple(truth["train"].reshape(-1, 3).mean(0) / 255), abs=1e-9)

    # a changed source file (new mtime and size) changes the key: decoded again
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "train" / "a" / "0000.png")
    os.utime(root / "train" / "a" / "0000.png", ns=(1, 1))
    monkeypatch.setattr(D, "_decode_all", counting)
    third = load_arrays(root, "folder")
    assert calls == [24, 24]
    assert third.train_x[0].max() == 0


def test_concurrent_loads_decode_once(tmp_path, cache, monkeypatch):
    root = tmp_path / "data"
    _write_folder(root, per_class=2)
    calls = []
    real_decode = D._decode_all

    def slow(paths, size):
        calls.append(len(paths))
        time.sleep(0.3)  # the other thread arrives while this one decodes
        return real_decode(paths, size)

    monkeypatch.setattr(D, "_decode_all", slow)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: load_arrays(root, "folder"), range(2)))
    assert calls == [12]  # the second waited on the lock, then read the cache
    np.testing.assert_array_equal(results[0].train_x, results[1].train_x)


def test_corrupt_cache_is_decoded_again(tmp_path, cache, monkeypatch):
    root = tmp_path / "data"
    _write_folder(root, per_class=2)
    load_arrays(root, "folder")
    (cache_file,) = cache.glob("*.npz")
    cache_file.write_bytes(cache_file.read_bytes()[:100])  # a truncated file
    again = load_arrays(root, "folder")
    assert again.train_x.shape == (6, 32, 32, 3)
    with np.load(cache_file) as npz:  # rewritten whole
        assert npz["train_x"].shape == (6, 32, 32, 3)


def test_folder_resize_and_cifar_class_count(tmp_path, cache):
    root = tmp_path / "data"
    _write_folder(root, per_class=2, size=40)
    arrays = load_arrays(root, "folder", image_size=16)
    assert arrays.train_x.shape == (6, 16, 16, 3) and arrays.train_x.dtype == np.uint8
    cifar = tmp_path / "c"
    _write_folder(cifar / "cifar10", splits=("train", "test"), per_class=1)
    with pytest.raises(DataError, match="3 class folders"):
        load_arrays(cifar, "cifar10")
    with pytest.raises(DataError, match="image_size"):
        load_arrays(cifar, "cifar10", image_size=64)


# --------------------------------------------------------------------------- splits


def test_stratified_split_counts_and_determinism(data_root):
    arrays = load_arrays(data_root, "cifar10")
    assert arrays.train_x.shape == (50000, 32, 32, 3) and arrays.test_x.shape == (10000, 32, 32, 3)
    tr, va, te = make_splits(arrays.train_y, arrays.test_y, val_size=5000, split_seed=0)
    assert np.bincount(arrays.train_y[va], minlength=10).tolist() == [500] * 10
    assert len(tr) == 45000 and len(np.intersect1d(tr, va)) == 0 and len(te) == 10000
    tr2, va2, _ = make_splits(arrays.train_y, arrays.test_y, val_size=5000, split_seed=0, train_subset=1000, test_subset=300)
    np.testing.assert_array_equal(va, va2)  # the validation images do not depend on the subsets
    assert np.bincount(arrays.train_y[tr2], minlength=10).tolist() == [100] * 10
    assert len(np.intersect1d(tr2, va)) == 0
    _, va3, _ = make_splits(arrays.train_y, arrays.test_y, val_size=5000, split_seed=1)
    assert len(np.intersect1d(va, va3)) < 1000  # another split seed draws other images


def test_stratified_indices_largest_remainder():
    labels = np.array([0] * 5 + [1] * 3 + [2] * 2)
    for n, expected in [(5, [3, 1, 1]), (1, [1, 0, 0]), (9, [4, 3, 2]), (10, [5, 3, 2])]:
        idx = D.stratified_indices(labels, n, np.random.default_rng(0))
        assert len(idx) == n and len(set(idx.tolist())) == n
        assert np.bincount(labels[idx], minlength=3).tolist() == expected


def test_split_independent_of_trial_seed(tiny_data, data_root):
    other = build_data(data_root, train_subset=200, val_size=100, test_subset=100, batch_size=32, seed=7)
    assert torch.equal(other.val.images, tiny_data.val.images)
    assert torch.equal(other.train.images, tiny_data.train.images)
    assert torch.equal(other.test.labels, tiny_data.test.labels)
    a = next(iter(tiny_data.train.batches(0)))[1]
    b = next(iter(other.train.batches(0)))[1]
    assert not torch.equal(a, b)  # the trial seed changes the shuffle


def test_tiny_data_bundle(tiny_data):
    assert (tiny_data.n_train, tiny_data.n_val, tiny_data.n_test) == (200, 100, 100)
    assert tiny_data.num_classes == 10 and tiny_data.classes[0] == "airplane" and tiny_data.classes[9] == "truck"
    assert torch.bincount(tiny_data.train.labels, minlength=10).tolist() == [20] * 10
    assert torch.bincount(tiny_data.val.labels, minlength=10).tolist() == [10] * 10
    assert len(tiny_data.train) == 6 and len(tiny_data.val) == 4 and len(tiny_data.test) == 4
    x, y = next(iter(tiny_data.test))
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert tiny_data.mean == D.CIFAR_STATS["cifar10"][0]


def test_split_errors_are_one_line(tiny_data, data_root):
    labels = np.repeat(np.arange(10), 10)
    cases = [
        dict(val_size=100),
        dict(val_size=-1),
        dict(val_size=10, train_subset=91),
        dict(val_size=10, train_subset=0),
        dict(val_size=10, test_subset=101),
        dict(val_size=10, split_seed=-1),
    ]
    for kwargs in cases:
        with pytest.raises(DataError) as info:
            make_splits(labels, labels, **kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="fewer than one batch"):
        build_data(data_root, train_subset=20, val_size=10, test_subset=10, batch_size=32)


# --------------------------------------------------------------------------- loader and augmentation


def _images(n=40, h=8, w=8, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 256, (n, h, w, 3), dtype=np.uint8)  # no zero pixel


def _normalised(img: np.ndarray) -> torch.Tensor:
    """Reference normalisation of uint8 (N, H, W, 3) -> float (N, 3, H, W)."""
    x = torch.from_numpy(img).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def test_eval_loader_order_normalisation_and_partial_batch():
    imgs = _images(10)
    loader = DeviceLoader(imgs, np.arange(10), 4, mean=MEAN, std=STD)
    batches = list(loader)
    assert len(loader) == 3 and [len(y) for _, y in batches] == [4, 4, 2]
    x = torch.cat([b[0] for b in batches])
    assert torch.equal(torch.cat([b[1] for b in batches]), torch.arange(10))
    torch.testing.assert_close(x, _normalised(imgs), rtol=0, atol=1e-5)
    assert x.is_contiguous()
    nchw = DeviceLoader(np.ascontiguousarray(imgs.transpose(0, 3, 1, 2)), np.arange(10), 4, mean=MEAN, std=STD, channels_last=True)
    x_cl = next(iter(nchw))[0]
    assert x_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x_cl, _normalised(imgs[:4]), rtol=0, atol=1e-5)


def test_train_loader_visits_every_image_once_per_epoch():
    loader = DeviceLoader(_images(96), np.arange(96), 32, mean=MEAN, std=STD, train=True, seed=3)
    seen = [torch.cat([y for _, y in loader]) for _ in range(2)]
    for ids in seen:
        assert sorted(ids.tolist()) == list(range(96))
    assert not torch.equal(seen[0], seen[1])  # reshuffled every epoch
    assert loader.epoch == 2
    loader.set_epoch(1)
    assert torch.equal(torch.cat([y for _, y in loader]), seen[1])  # (seed, epoch) reproduces it
    dropped = DeviceLoader(_images(100), np.arange(100), 32, mean=MEAN, std=STD, train=True)
    ids = torch.cat([y for _, y in dropped])
    assert len(dropped) == 3 and len(ids) == 96 and len(set(ids.tolist())) == 96
    assert dropped.num_samples == 100


def _reference_augment(img: np.ndarray, dy: int, dx: int, flip: bool, pad: int) -> torch.Tensor:
    """torchvision-style RandomCrop(padding=pad) then horizontal flip, then normalise: (3, H, W)."""
    h, w, _ = img.shape
    padded = np.zeros((h + 2 * pad, w + 2 * pad, 3), np.uint8)
    padded[pad : pad + h, pad : pad + w] = img
    crop = padded[dy : dy + h, dx : dx + w]
    if flip:
        crop = crop[:, ::-1]
    return _normalised(np.ascontiguousarray(crop)[None])[0]


def test_crop_and_flip_match_reference_and_change_images():
    imgs = _images(64)
    loader = DeviceLoader(imgs, np.arange(64), 16, mean=MEAN, std=STD, train=True, seed=1)
    perm, draws = loader._plan(0)
    out = torch.cat([x for x, _ in loader.batches(0)])
    for pos in range(0, 64, 7):
        i, (dy, dx, flip) = int(perm[pos]), draws[pos, :3].tolist()
        torch.testing.assert_close(out[pos], _reference_augment(imgs[i], dy, dx, bool(flip), 4), rtol=0, atol=1e-5)
    clean = _normalised(imgs)[perm]
    changed = (out - clean).abs().flatten(1).amax(1) > 1e-3
    assert changed.float().mean() > 0.8  # most images really moved or flipped
    assert draws[:, 2].float().mean().item() == pytest.approx(0.5, abs=0.2)
    assert set(draws[:, 0].tolist()) <= set(range(9))


def test_flip_only_keeps_statistics():
    imgs = _images(64)
    loader = DeviceLoader(imgs, np.arange(64), 64, mean=MEAN, std=STD, train=True, pad=0, seed=5)
    x, y = next(iter(loader))
    ref = _normalised(imgs)[y]
    torch.testing.assert_close(x.mean(dim=(2, 3)), ref.mean(dim=(2, 3)), rtol=0, atol=1e-5)
    assert not torch.equal(x, ref)
    flipped = torch.isclose(x, ref.flip(3), atol=1e-5).flatten(1).all(1)
    same = torch.isclose(x, ref, atol=1e-5).flatten(1).all(1)
    assert bool((flipped | same).all()) and 0 < int(flipped.sum()) < 64


def test_cutout_zeroes_one_clipped_square():
    imgs = _images(32, h=16, w=16)
    loader = DeviceLoader(imgs, np.arange(32), 32, mean=MEAN, std=STD, train=True, pad=0, flip=False, cutout=8, seed=2)
    _, draws = loader._plan(0)
    x, y = next(iter(loader.batches(0)))
    ref = _normalised(imgs)[y]
    for k in range(32):
        cy, cx = draws[k, 3].item(), draws[k, 4].item()
        r0, r1, c0, c1 = max(cy - 4, 0), min(cy + 4, 16), max(cx - 4, 0), min(cx + 4, 16)
        square = torch.zeros(16, 16, dtype=torch.bool)
        square[r0:r1, c0:c1] = True
        assert torch.equal(x[k][:, square], torch.zeros_like(x[k][:, square]))
        torch.testing.assert_close(x[k][:, ~square], ref[k][:, ~square], rtol=0, atol=1e-5)
        assert 16 <= int(square.sum()) <= 64


# --------------------------------------------------------------------------- ImageNet-style folders (issue 14)


def _write_rect_folder(root: Path, classes=("a", "b", "c", "d"), per_class=(6, 2), seed=0) -> None:
    """An ImageFolder (train/, val/) of lossless PNGs of assorted non-square sizes."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), per_class):
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = int(rng.integers(20, 48)), int(rng.integers(20, 48))
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


def test_folder_imagenet_augment_sizes_and_centre_crop(tmp_path, cache):
    root = tmp_path / "data"
    _write_rect_folder(root)
    assert D.stored_size(16, "imagenet") == 18 and D.stored_size(224, "imagenet") == 256
    assert D.stored_size(None, "cifar") is None and D.stored_size(40, "cifar") == 40
    bundle = build_data(root, dataset="folder", image_size=16, augment="imagenet", val_size=4, batch_size=4)
    assert bundle.image_size == 16 and bundle.augment == "imagenet"
    x, y = next(iter(bundle.train))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and y.shape == (4,)
    # evaluation = Resize(18) + CenterCrop(16): the centre of the stored 18x18 images, normalised
    stored = load_arrays(root, "folder", image_size=18)
    assert stored.test_x.shape == (8, 18, 18, 3)
    xt, yt = next(bundle.test.batches())
    centre = torch.as_tensor(stored.test_x[:4, 1:17, 1:17]).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(bundle.mean)[:, None, None], torch.tensor(bundle.std)[:, None, None]
    torch.testing.assert_close(xt, (centre - mean) / std, atol=1e-5, rtol=0)
    assert yt.tolist() == stored.test_y[:4].tolist()
    # the default keeps today's behaviour: stored at the image size, CIFAR augmentation
    plain = build_data(root, dataset="folder", image_size=16, val_size=4, batch_size=4)
    assert plain.augment == "cifar" and next(iter(plain.train))[0].shape == (4, 3, 16, 16)
    with pytest.raises(DataError, match="folder only"):
        build_data(root, dataset="cifar10", image_size=32, augment="imagenet")
    with pytest.raises(DataError, match="needs data.image_size"):
        build_data(root, dataset="folder", augment="imagenet", val_size=4, batch_size=4)


def test_resized_crop_resamples_the_box_bilinearly():
    """A box larger than the output equals torch's bilinear resize of the cropped box (no
    antialiasing); the flip mirrors it."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 20, 20, 3), dtype=torch.uint8, generator=g)
    loader = DeviceLoader(images, torch.zeros(2), 2, mean=(0, 0, 0), std=(1, 1, 1), train=True, crop=12, resized_crop=True)
    # rows: top, left, height, width, flip, cutout row, cutout col
    draws = torch.tensor([[0, 0, 20, 20, 0, 0, 0], [2, 3, 16, 14, 1, 0, 0]])
    out = loader._resized_crop(torch.tensor([0, 1]), draws).permute(0, 3, 1, 2)
    src = images.permute(0, 3, 1, 2).float() / 255
    ref0 = F.interpolate(src[0:1], size=(12, 12), mode="bilinear", align_corners=False)
    ref1 = F.interpolate(src[1:2, :, 2:18, 3:17], size=(12, 12), mode="bilinear", align_corners=False).flip(-1)
    torch.testing.assert_close(out[0:1], ref0, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1:2], ref1, atol=1e-5, rtol=0)


def test_resized_crop_boxes_follow_torchvision_rules():
    boxes = D._resized_crop_boxes(4000, 50, 50, torch.Generator().manual_seed(1))
    top, left, h, w = boxes.T
    assert ((top >= 0) & (left >= 0) & (top + h <= 50) & (left + w <= 50) & (h > 0) & (w > 0)).all()
    frac = (h * w).double() / 2500
    assert frac.min() >= 0.06 and frac.max() <= 1.0  # scale (0.08, 1) up to rounding
    ratio = w.double() / h.double()
    assert ratio.min() >= 0.7 and ratio.max() <= 1.45  # ratio (3/4, 4/3) up to rounding
    assert frac.std() > 0.1 and len(set(top.tolist())) > 20  # spread, not a fixed crop
    again = D._resized_crop_boxes(4000, 50, 50, torch.Generator().manual_seed(1))
    assert torch.equal(boxes, again)
    # a 10x100 strip: most draws do not fit; after 10 tries the box is the centred 10x13 one
    strip = D._resized_crop_boxes(500, 10, 100, torch.Generator().manual_seed(2))
    centred = (strip == torch.tensor([0, 43, 10, 13])).all(dim=1)
    assert centred.sum() > 250  # few draws fit a strip: most images fall back to the centred box
    assert ((strip[:, 2] <= 10) & (strip[:, 1] + strip[:, 3] <= 100)).all()


def test_resized_crop_loader_is_deterministic_per_epoch():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 20, 20, 3), dtype=torch.uint8, generator=g)
    make = lambda: DeviceLoader(images, torch.arange(16), 8, mean=MEAN, std=STD, train=True, crop=12,
                                resized_crop=True, cutout=4, seed=3)
    a, b = make(), make()
    ea = [x for x, _ in a.batches(0)]
    assert all(torch.equal(x, y) for x, (y, _) in zip(ea, b.batches(0)))
    assert not torch.equal(ea[0], next(a.batches(1))[0])
    assert ea[0].shape == (8, 3, 12, 12)
    with pytest.raises(ValueError, match="crop"):
        DeviceLoader(images, torch.arange(16), 8, mean=MEAN, std=STD, crop=30)


def test_data_spec_image_size_and_augment():
    from repsearch.spec import Recipe, hashed_recipe

    assert "data" not in hashed_recipe(Recipe()) or "image_size" not in hashed_recipe(Recipe())["data"]
    ok = Recipe.model_validate({"data": {"dataset": "folder", "image_size": 224, "augment": "imagenet"}})
    assert ok.data.image_size == 224 and hashed_recipe(ok)["data"]["augment"] == "imagenet"
    for bad, words in [
        ({"dataset": "cifar10", "image_size": 64}, "needs dataset folder"),
        ({"dataset": "cifar100", "augment": "imagenet"}, "needs dataset folder"),
        ({"dataset": "folder", "augment": "imagenet"}, "needs image_size"),
    ]:
        with pytest.raises(Exception, match=words):
            Recipe.model_validate({"data": bad})


def test_imagenet_recipe_smoke_profile_trains_on_a_tiny_folder(tmp_path, cache):
    """recipes/imagenet_resnet.yaml's smoke profile on an ImageFolder this test writes: the recipe's
    data section builds 64 px batches, its ResNet-18 (ImageNet stem) trains one epoch, and flops_m
    is counted at the batches' size."""
    from repsearch.measures import count_macs
    from repsearch.methods import build_method
    from repsearch.models import build_model, model_kwargs
    from repsearch.spec import load_recipe, trial_recipe
    from repsearch.train import Trainer

    rec, _ = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "imagenet_resnet.yaml", "smoke")
    r = trial_recipe(rec, {"method.name": "origin", "model.name": "resnet18"}, 0)
    d = r.data
    assert (d.dataset, d.augment, d.image_size) == ("folder", "imagenet", 64)
    root = tmp_path / "tiny"
    _write_rect_folder(root, classes=("a", "b"), per_class=(20, 4))
    data = build_data(root, dataset=d.dataset, image_size=d.image_size, augment=d.augment, val_size=8,
                      batch_size=r.train.batch_size, eval_batch_size=r.train.eval_batch_size, seed=0)
    assert next(iter(data.train))[0].shape == (r.train.batch_size, 3, 64, 64)
    kwargs = model_kwargs(r.model.name, data.num_classes, r.model.width, **r.model.options)
    assert kwargs["stem"] == "imagenet"
    model = build_model(r.model.name, **kwargs)
    method = build_method(r, "cpu")
    trainer = Trainer(method.prepare(model, data.train), method, data.train, data.val, r.train, torch.device("cpu"))
    history = trainer.fit(stop_after=1)
    assert np.isfinite(history[0]["train/loss"]) and 0.0 <= history[0]["val/top1"] <= 100.0
    assert history[0]["flops_m"] == pytest.approx(count_macs(model, (1, 3, 64, 64)) / 1e6)
