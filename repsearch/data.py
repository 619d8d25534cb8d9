"""Datasets, splits, decode cache and the device-resident loader (DESIGN.md "Data — contract").

What it reads (under a data root, see :func:`resolve_data_root` and :func:`find_layout`):

- ``cifar10``: ``root/cifar-10-batches-py/`` (the original python pickles, read by
  ``torchvision.datasets.CIFAR10``) or ``root/cifar10/{train,test}/<class>/*.jpg`` (an ImageFolder,
  e.g. the JPEG re-encoding in ``shared/data``); ``cifar100`` likewise with
  ``root/cifar-100-python/`` or ``root/cifar100/``.
- ``folder``: any ImageNet-style dataset, ``root/train/<class>/...`` and ``root/val/<class>/...``.
  Every image is decoded once into a fixed square (shorter side resized with PIL's bilinear
  filter, which low-pass filters when it shrinks, then centre-cropped) and held in memory as uint8.
  Two augmentations (``augment``):

  * ``"cifar"`` (default, today's behaviour): images stored at ``image_size`` (default 32) and
    trained with the CIFAR recipe below; evaluation sees the stored image.
  * ``"imagenet"`` (the torchvision ImageNet reference recipe, as DyRep Table 3 trains): images
    stored at ``resize = round(image_size / 0.875)`` (256 for 224). Evaluation = ``Resize(resize)``
    + ``CenterCrop(image_size)`` exactly (the centre crop of the stored square). Training =
    ``RandomResizedCrop(image_size, scale=(0.08, 1), ratio=(3/4, 4/3))`` + horizontal flip, done
    in batches on the device: the crop box is drawn as torchvision draws it (10 tries, then the
    whole image), and resampled bilinearly with ``grid_sample`` (no antialiasing when a large box
    shrinks). Differences from torchvision: the box is drawn within the stored centre square, not
    the whole original image, and images are stored at ``resize`` px, so a box is upsampled from
    at most that resolution.

  Memory: the whole decoded set is held in memory (host, and device on CUDA): ``N * resize^2 * 3``
  bytes, e.g. 196 KiB per image at 256 px, 252 GB for ImageNet-1k's 1.28 M training images, so
  full ImageNet needs a machine with that much memory (or a smaller ``image_size``); the tiny
  folders of the tests and subsets fit anywhere.

Images are decoded once into uint8 arrays ``(N, H, W, 3)`` plus int64 labels ``(N,)`` and cached
under ``$REPSEARCH_CACHE`` (default ``~/.cache/repsearch``); the data root is never written to.

Splits: ``val_size`` images are held out of the training set, stratified by class, drawn with
``split_seed`` (independent of the trial seed, so every trial of a study validates on the same
images); ``train_subset`` / ``test_subset`` are stratified subsets for smoke runs.

Augmentation (training only) is the standard CIFAR recipe (He et al. 2016, Sec. 4.2): 4-pixel zero
padding + random 32x32 crop, horizontal flip with p = 0.5, then per-channel normalisation, and
optionally Cutout (DeVries & Taylor 2017, Sec. 3: one square zeroed after normalisation); or, for
``augment="imagenet"`` folders, the random-resized crop above. It runs in batches on the device
that holds the data (the whole uint8 dataset lives on the GPU on CUDA).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import logging
import math
import multiprocessing
import os
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from repsearch.errors import DataError

log = logging.getLogger(__name__)

DATASETS = ("cifar10", "cifar100", "folder")
FORMATS = ("auto", "torchvision", "imagefolder")
AUGMENTS = ("cifar", "imagenet")
#: Eval crop / resize ratio of the ImageNet recipe (224 / 256; torchvision's reference scripts).
CROP_RATIO = 0.875
#: RandomResizedCrop's defaults (torchvision; Szegedy et al. 2015 "Going deeper", Sec. 6).
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)

#: Per-channel (mean, std) of the training images, RGB order, in [0, 1] units.
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_TORCHVISION_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
_DISPLAY = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "folder": "folder dataset"}
_CACHE_VERSION = 1
_ENV_DATA = "REPSEARCH_DATA"
_ENV_CACHE = "REPSEARCH_CACHE"


def _one_line(text: object) -> str:
    """Collapse any whitespace run (newlines included) to one space: messages are one line."""
    return " ".join(str(text).split())


# --------------------------------------------------------------------------- root and layout


def resolve_data_root(cli_root: str | os.PathLike | None, recipe_root: str | os.PathLike | None) -> Path:
    """Pick the data root: ``--data-root`` > env ``REPSEARCH_DATA`` > recipe ``data.root``.

    Each source that is set is tried in that order and the first one naming an existing directory
    wins (a higher-precedence source that is set but missing is logged as a warning and skipped).
    Relative paths resolve against the current working directory; ``~`` is expanded.

    Returns:
        The absolute :class:`~pathlib.Path` of the root.
    Raises:
        DataError: no source names an existing directory; the one-line message names all three
            sources and their values.
    Source: DESIGN.md "Data — contract".
    """
    sources = (
        ("--data-root", cli_root),
        (_ENV_DATA, os.environ.get(_ENV_DATA) or None),
        ("recipe data.root", recipe_root),
    )
    for name, value in sources:
        if value is None or str(value) == "":
            continue
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = Path.cwd() / path
        if path.is_dir():
            return path.resolve()
        log.warning("data root from %s (%s) is not an existing directory; trying the next source", name, path)
    described = "; ".join(f"{name}={'(unset)' if value in (None, '') else repr(str(value))}" for name, value in sources)
    raise DataError(
        f"no existing data root: {described} (relative paths resolve against {Path.cwd()}); "
        f"pass --data-root, set {_ENV_DATA} or set data.root in the recipe"
    )


def find_layout(root: str | os.PathLike, dataset: str, fmt: str = "auto") -> tuple[str, Path]:
    """Find where ``dataset`` lives under ``root`` and in which layout.

    Args:
        root: the data root.
        dataset: ``"cifar10"``, ``"cifar100"`` or ``"folder"``.
        fmt: ``"auto"`` (torchvision pickles first — exact pixels — then the ImageFolder),
            ``"torchvision"`` or ``"imagefolder"``; ``"folder"`` datasets are always ImageFolders.
    Returns:
        ``("torchvision", root/cifar-10-batches-py)`` (resp. ``cifar-100-python``),
        ``("imagefolder", root/cifar10)`` (resp. ``cifar100``, holding ``train/`` and ``test/``),
        or ``("imagefolder", root)`` for ``"folder"`` (holding ``train/`` and ``val/``).
    Raises:
        DataError: unknown dataset or format, or the layout is missing (the message names every
            path looked for).
    Source: DESIGN.md "Data — contract".
    """
    root = Path(root)
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if dataset == "folder":
        if fmt == "torchvision":
            raise DataError("data.format 'torchvision' applies to cifar10/cifar100 only; a 'folder' dataset is an ImageFolder")
        if (root / "train").is_dir() and (root / "val").is_dir():
            return "imagefolder", root
        raise DataError(f"folder dataset not found: looked for {root / 'train'}/<class>/... and {root / 'val'}/<class>/...")
    tv_dir = root / _TORCHVISION_DIRS[dataset]
    if_dir = root / dataset
    if fmt in ("auto", "torchvision") and tv_dir.is_dir():
        return "torchvision", tv_dir
    if fmt in ("auto", "imagefolder") and (if_dir / "train").is_dir() and (if_dir / "test").is_dir():
        return "imagefolder", if_dir
    looked = []
    if fmt in ("auto", "torchvision"):
        looked.append(f"{tv_dir}/ (torchvision)")
    if fmt in ("auto", "imagefolder"):
        looked.append(f"{if_dir}/{{train,test}}/<class>/*.jpg (imagefolder)")
    raise DataError(f"{_DISPLAY[dataset]} not found under {root}: looked for {' and '.join(looked)}")


# --------------------------------------------------------------------------- decoding and cache


@dataclasses.dataclass
class DecodedData:
    """The decoded dataset, before splitting.

    Attributes:
        train_x: uint8 ``(N_train, H, W, 3)``; train_y: int64 ``(N_train,)``.
        test_x: uint8 ``(N_test, H, W, 3)``; test_y: int64 ``(N_test,)`` (``val/`` for folders).
        classes: class names, index = label.
        mean, std: per-channel statistics in [0, 1] units (CIFAR: the published constants;
            folders: measured on the training images).
        layout: ``"torchvision"`` or ``"imagefolder"``; path: where it was read from.
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    layout: str
    path: Path


def cache_dir() -> Path:
    """The decode cache folder: env ``REPSEARCH_CACHE``, else ``~/.cache/repsearch``."""
    value = os.environ.get(_ENV_CACHE)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "repsearch"


def _decode_files(paths: Sequence[str], size: int) -> np.ndarray:
    """Decode image files with PIL into uint8 ``(len(paths), size, size, 3)`` RGB.

    An image that is not ``size`` x ``size`` has its shorter side resized to ``size`` (bilinear)
    and is centre-cropped to a square.
    """
    from PIL import Image

    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        with Image.open(path) as img:
            img = img.convert("RGB")
            if img.size != (size, size):
                w, h = img.size
                scale = size / min(w, h)
                nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
                img = img.resize((nw, nh), Image.BILINEAR)
                left, top = (nw - size) // 2, (nh - size) // 2
                img = img.crop((left, top, left + size, top + size))
            out[i] = np.asarray(img)
    return out


def _decode_chunk(args: tuple[Sequence[str], int]) -> np.ndarray:
    return _decode_files(*args)


def _decode_all(paths: Sequence[str], size: int) -> np.ndarray:
    """Decode every file (a pool of processes on Linux, else serially); uint8 ``(N, size, size, 3)``."""
    n = len(paths)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    workers = min(8, cpus)
    if n < 2000 or workers < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return _decode_files(paths, size)
    chunk = max(256, math.ceil(n / (workers * 8)))
    tasks = [(list(paths[i : i + chunk]), size) for i in range(0, n, chunk)]
    # fork: the children only run PIL and numpy (no torch, no CUDA), which is fork-safe; spawn
    # would need a __main__ guard in every calling script.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            parts = pool.map(_decode_chunk, tasks)
    return np.concatenate(parts) if parts else np.empty((0, size, size, 3), np.uint8)


def _scan_imagefolder(path: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """List ``path/<class>/...`` the way ``torchvision.datasets.ImageFolder`` does (same order)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    try:
        classes, class_to_idx = find_classes(str(path))
        samples = make_dataset(str(path), class_to_idx, extensions=IMG_EXTENSIONS)
    except (FileNotFoundError, OSError) as exc:
        raise DataError(_one_line(f"cannot read image folder {path}: {exc}")) from exc
    return classes, samples


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock (fcntl) so concurrent processes decode a dataset only once."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock; os.replace keeps the cache consistent anyway
        yield
        return
    try:
        handle = open(lock_path, "a+")
    except OSError:
        yield
        return
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        except OSError:  # e.g. a file system without flock: go on unlocked
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _load_cache(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        log.warning("ignoring unreadable decode cache %s (%s); decoding again", path, _one_line(exc))
        return None


def _save_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``.npz`` atomically: a temporary file in the same folder, fsync, then os.replace."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units of uint8 ``(N, H, W, 3)``, in chunks (float64)."""
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    for i in range(0, len(images), 4096):
        chunk = images[i : i + 4096].reshape(-1, 3).astype(np.float64) / 255.0
        total += chunk.sum(0)
        total_sq += (chunk * chunk).sum(0)
        count += chunk.shape[0]
    mean = total / max(count, 1)
    std = np.sqrt(np.maximum(total_sq / max(count, 1) - mean * mean, 1e-12))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _read_imagefolder(dataset: str, path: Path, size: int) -> DecodedData:
    """Decode an ImageFolder dataset (train + test/val), through the cache."""
    splits = ("train", "val") if dataset == "folder" else ("train", "test")
    listing = []
    classes_per_split = []
    for split in splits:
        classes, samples = _scan_imagefolder(path / split)
        classes_per_split.append(classes)
        listing.append(samples)
    if classes_per_split[0] != classes_per_split[1]:
        raise DataError(
            f"class folders differ between {path / splits[0]} ({len(classes_per_split[0])} classes) "
            f"and {path / splits[1]} ({len(classes_per_split[1])} classes)"
        )
    classes = classes_per_split[0]
    if dataset in NUM_CLASSES and len(classes) != NUM_CLASSES[dataset]:
        raise DataError(f"{path / 'train'} has {len(classes)} class folders; {_DISPLAY[dataset]} has {NUM_CLASSES[dataset]}")

    digest = hashlib.sha256(f"repsearch-decode v{_CACHE_VERSION} {dataset} {size}\n".encode())
    for split, samples in zip(splits, listing):
        for file, label in samples:
            st = os.stat(file)
            rel = os.path.relpath(file, path)
            digest.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\t{label}\n".encode())
    key = digest.hexdigest()[:24]
    folder = cache_dir()
    cache_file = folder / f"{dataset}-{size}px-{key}.npz"

    try:
        folder.mkdir(parents=True, exist_ok=True)
        writable = os.access(folder, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        log.warning("decode cache folder %s is not writable; decoding without a cache", folder)

    lock = _locked(folder / (cache_file.name + ".lock")) if writable else contextlib.nullcontext()
    with lock:
        arrays = _load_cache(cache_file)
        if arrays is None:
            n_files = sum(len(s) for s in listing)
            log.info("decoding %d images from %s (cache: %s)", n_files, path, cache_file if writable else "none")
            decoded = _decode_all([f for samples in listing for f, _ in samples], size)
            n_train = len(listing[0])
            arrays = {
                "train_x": decoded[:n_train],
                "train_y": np.array([lab for _, lab in listing[0]], dtype=np.int64),
                "test_x": decoded[n_train:],
                "test_y": np.array([lab for _, lab in listing[1]], dtype=np.int64),
                "classes": np.array(classes, dtype=str),
            }
            if writable:
                try:
                    _save_cache(cache_file, arrays)
                except OSError as exc:
                    log.warning("could not write decode cache %s: %s", cache_file, _one_line(exc))
        else:
            log.info("loaded decoded images from cache %s", cache_file)

    if dataset in CIFAR_STATS:
        mean, std = CIFAR_STATS[dataset]
    else:
        mean, std = _channel_stats(arrays["train_x"])
    return DecodedData(
        train_x=arrays["train_x"],
        train_y=arrays["train_y"].astype(np.int64),
        test_x=arrays["test_x"],
        test_y=arrays["test_y"].astype(np.int64),
        classes=[str(c) for c in arrays["classes"]],
        mean=tuple(mean),
        std=tuple(std),
        layout="imagefolder",
        path=path,
    )


def _read_torchvision(dataset: str, root: Path, download: bool) -> DecodedData:
    """Read the original CIFAR python pickles with torchvision (downloading them if asked)."""
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if dataset == "cifar10" else CIFAR100
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except Exception as exc:  # torchvision raises RuntimeError, URLError, OSError, ...
        action = "download" if download else "read"
        raise DataError(_one_line(f"could not {action} {_DISPLAY[dataset]} in {root}: {exc}")) from exc
    mean, std = CIFAR_STATS[dataset]
    return DecodedData(
        train_x=np.ascontiguousarray(train.data, dtype=np.uint8),
        train_y=np.asarray(train.targets, dtype=np.int64),
        test_x=np.ascontiguousarray(test.data, dtype=np.uint8),
        test_y=np.asarray(test.targets, dtype=np.int64),
        classes=list(train.classes),
        mean=mean,
        std=std,
        layout="torchvision",
        path=root / _TORCHVISION_DIRS[dataset],
    )


def load_arrays(
    root: str | os.PathLike,
    dataset: str = "cifar10",
    fmt: str = "auto",
    download: bool = False,
    image_size: int | None = None,
) -> DecodedData:
    """Decode a dataset into uint8 arrays (cached for ImageFolders, see the module docstring).

    Args:
        root: the data root (see :func:`resolve_data_root`).
        dataset, fmt: see :func:`find_layout`.
        download: CIFAR only — let torchvision download the python version into ``root``.
        image_size: side of the square images for ``"folder"`` datasets (default 32); CIFAR
            accepts only ``None`` or 32.
    Returns:
        :class:`DecodedData` with ``(N, H, W, 3)`` uint8 images and int64 labels.
    Raises:
        DataError: missing layout, unreadable files, wrong class count, download failure, bad
            ``image_size``.
    Source: DESIGN.md "Data — contract".
    """
    root = Path(root)
    if dataset in NUM_CLASSES and image_size not in (None, 32):
        raise DataError(f"image_size {image_size} is not supported for {_DISPLAY[dataset]} (its images are 32x32)")
    size = 32 if image_size is None else int(image_size)
    if size < 1:
        raise DataError(f"image_size must be a positive number of pixels, got {image_size}")
    if download:
        if dataset not in NUM_CLASSES:
            raise DataError("data.download applies to cifar10/cifar100 only")
        if fmt == "imagefolder":
            raise DataError("data.download fetches the torchvision layout; use data.format auto or torchvision")
        if not (root / _TORCHVISION_DIRS[dataset]).is_dir():
            return _read_torchvision(dataset, root, download=True)
    layout, path = find_layout(root, dataset, fmt)
    if layout == "torchvision":
        return _read_torchvision(dataset, path.parent, download=False)
    return _read_imagefolder(dataset, path, size)


# --------------------------------------------------------------------------- splits


def stratified_indices(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``n`` indices of ``labels`` (int ``(N,)``) stratified by class, sorted ascending.

    Each class ``k`` with ``c_k`` images gets ``n * c_k / N`` images rounded by the largest
    remainder method (ties to the lower class index); within a class the images are a uniform
    random draw from ``rng``. Requires ``0 <= n <= N`` (checked by the callers).
    """
    labels = np.asarray(labels)
    total = len(labels)
    if n == 0 or total == 0:
        return np.empty(0, dtype=np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    quota = n * counts / total
    take = np.floor(quota).astype(np.int64)
    remainder = n - int(take.sum())
    if remainder > 0:
        order = np.argsort(-(quota - take), kind="stable")
        take[order[:remainder]] += 1
    picked = []
    for cls, k in zip(classes, take):
        members = np.flatnonzero(labels == cls)
        picked.append(members[rng.permutation(len(members))[:k]])
    return np.sort(np.concatenate(picked)).astype(np.int64)


def make_splits(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    val_size: int = 5000,
    split_seed: int = 0,
    train_subset: int | None = None,
    test_subset: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index arrays ``(train_idx, val_idx, test_idx)``: the fixed validation split and subsets.

    ``val_idx``: ``val_size`` stratified indices of the training set (stream ``[split_seed, 0]``);
    ``train_idx``: the rest, or a stratified ``train_subset`` of the rest (stream
    ``[split_seed, 1]``); ``test_idx``: all test indices or a stratified ``test_subset`` (stream
    ``[split_seed, 2]``). All drawn with numpy's ``default_rng`` from ``split_seed`` only, so the
    split is the same for every trial seed, and the validation images do not depend on the subsets.

    Raises:
        DataError: negative ``split_seed``/``val_size``; ``val_size`` not smaller than the training
            set; a subset below 1 or larger than what is available.
    Source: DESIGN.md "Data — contract".
    """
    n_total, n_test = len(train_labels), len(test_labels)
    if int(split_seed) < 0:
        raise DataError(f"data.split_seed must be >= 0, got {split_seed}")
    if val_size < 0:
        raise DataError(f"data.val_size must be >= 0, got {val_size}")
    if val_size >= n_total:
        raise DataError(f"data.val_size ({val_size}) must be smaller than the {n_total} training images")
    val_idx = stratified_indices(train_labels, val_size, np.random.default_rng([int(split_seed), 0]))
    rest = np.setdiff1d(np.arange(n_total), val_idx, assume_unique=True)
    if train_subset is None:
        train_idx = rest
    else:
        if not 1 <= train_subset <= len(rest):
            raise DataError(
                f"data.train_subset ({train_subset}) must be between 1 and the {len(rest)} training images "
                f"left after holding out data.val_size={val_size}"
            )
        sub = stratified_indices(train_labels[rest], train_subset, np.random.default_rng([int(split_seed), 1]))
        train_idx = rest[sub]
    if test_subset is None:
        test_idx = np.arange(n_test)
    else:
        if not 1 <= test_subset <= n_test:
            raise DataError(f"data.test_subset ({test_subset}) must be between 1 and the {n_test} test images")
        test_idx = stratified_indices(test_labels, test_subset, np.random.default_rng([int(split_seed), 2]))
    return train_idx.astype(np.int64), val_idx.astype(np.int64), test_idx.astype(np.int64)


# --------------------------------------------------------------------------- device loader


def _mix_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit torch seed from ``(seed, epoch)`` (numpy SeedSequence)."""
    state = np.random.SeedSequence([int(seed) % 2**64, int(epoch) % 2**64]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _resized_crop_boxes(n: int, h: int, w: int, gen: torch.Generator, tries: int = 10) -> torch.Tensor:
    """``n`` RandomResizedCrop boxes ``(top, left, height, width)`` in an ``h`` x ``w`` image: int64 ``(n, 4)``.

    torchvision's ``RandomResizedCrop.get_params``, vectorised over images and drawn from ``gen``:
    up to ``tries`` draws of an area fraction uniform in :data:`RRC_SCALE` and a log-uniform aspect
    ratio in :data:`RRC_RATIO`, sides ``round(sqrt(area * ratio))`` x ``round(sqrt(area / ratio))``;
    the first draw that fits is placed uniformly; an image with none falls back to the largest
    centred box within the ratio bounds (the whole image for square images).
    Source: torchvision.transforms.RandomResizedCrop; Szegedy et al. 2015 Sec. 6.
    """
    area = float(h * w)
    frac = torch.empty(n, tries, dtype=torch.float64).uniform_(RRC_SCALE[0], RRC_SCALE[1], generator=gen)
    log_r = torch.empty(n, tries, dtype=torch.float64).uniform_(math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1]), generator=gen)
    ratio = torch.exp(log_r)
    bw = torch.round(torch.sqrt(area * frac * ratio)).to(torch.int64)
    bh = torch.round(torch.sqrt(area * frac / ratio)).to(torch.int64)
    fits = (bw > 0) & (bw <= w) & (bh > 0) & (bh <= h)
    first = torch.argmax(fits.to(torch.int8), dim=1)  # index of the first fitting try (0 if none)
    found = fits.any(dim=1)
    rows = torch.arange(n)
    bw, bh = bw[rows, first], bh[rows, first]
    in_ratio = w / h
    if in_ratio < RRC_RATIO[0]:
        fw, fh = w, int(round(w / RRC_RATIO[0]))
    elif in_ratio > RRC_RATIO[1]:
        fw, fh = int(round(h * RRC_RATIO[1])), h
    else:
        fw, fh = w, h
    bw = torch.where(found, bw, torch.full_like(bw, fw))
    bh = torch.where(found, bh, torch.full_like(bh, fh))
    u = torch.rand(n, 2, dtype=torch.float64, generator=gen)
    top = torch.where(found, torch.floor(u[:, 0] * (h - bh + 1)).to(torch.int64), (h - bh) // 2)
    left = torch.where(found, torch.floor(u[:, 1] * (w - bw + 1)).to(torch.int64), (w - bw) // 2)
    return torch.stack([top, left, bh, bw], dim=1)


class DeviceLoader:
    """Batches of a uint8 image tensor that lives on ``device``, augmented and normalised there.

    Args:
        images: uint8 ``(N, H, W, 3)`` or ``(N, 3, H, W)`` (numpy array or tensor); stored on
            ``device`` as ``(N, H, W, 3)``.
        labels: int ``(N,)``; stored on ``device`` as int64.
        batch_size: images per batch (>= 1).
        mean, std: per-channel statistics in [0, 1] units (RGB).
        train: shuffle every epoch and augment (pad + crop, flip, optional cutout).
        device: where the data lives and batches are produced.
        seed: the trial seed; epoch ``e`` shuffles and augments from a generator seeded by
            ``(seed, e)``, drawn on the CPU once per epoch and moved to ``device`` in one copy, so
            the same ``(seed, e)`` gives the same batches on CPU and CUDA.
        cutout: side in pixels of the Cutout square (0: off). DeVries & Taylor 2017: centre uniform
            over the image, rows/cols ``[c - cutout//2, c + cutout//2)`` clipped at the borders,
            set to 0 after normalisation.
        pad: zero padding (pixel value 0 before normalisation, as ``RandomCrop(32, padding=4)``)
            of the random crop; 0 disables the crop.
        flip: random horizontal flip with p = 0.5 (training only).
        drop_last: drop the last partial batch (default: ``train``).
        channels_last: yield ``torch.channels_last`` tensors.
        crop: side ``C`` in pixels of the batches (default: the stored side ``H``; needs square
            images when smaller). Training: a random ``C``x``C`` crop of the zero-padded image
            (offsets uniform in ``[0, H + 2 pad - C]``) or, with ``resized_crop``, a random-resized
            crop; evaluation: the centre ``C``x``C`` crop (torchvision ``CenterCrop``).
        resized_crop: training batches use torchvision's ``RandomResizedCrop(C, scale=RRC_SCALE,
            ratio=RRC_RATIO)`` box sampling (10 tries per image, then the whole image), resampled
            bilinearly (``F.grid_sample``, ``align_corners=False``), instead of pad + crop.
        rank, world_size: DDP sharding (:mod:`repsearch.distributed`): ``batch_size`` is the
            global batch and rank ``r`` yields rows ``[r * b, (r + 1) * b)`` of every global batch
            (``b = batch_size / world_size``; the last, partial evaluation batch is split in
            ``world_size`` near-equal parts, possibly empty), of the same permutation and
            augmentation draws as one process would use. :meth:`unsharded` gives the whole batches.

    Iterating yields ``(images, labels)``: float32 ``(B, 3, C, C)`` normalised, int64 ``(B,)``.
    ``len(loader)`` is the number of batches per epoch. Call :meth:`set_epoch` at the start of
    every epoch (as with ``DistributedSampler``); without it each ``iter()`` advances the epoch by
    one. :meth:`batches` iterates a given epoch without touching the counter (for probes).

    Raises:
        ValueError: bad shapes, dtype or batch size, a training batch that ``world_size`` does not
            divide, a rank outside ``[0, world_size)`` (programming errors).
    Source: He et al. 2016 Sec. 4.2 (pad 4, crop, flip); DeVries & Taylor 2017 (Cutout);
    torchvision ``RandomResizedCrop`` / ``CenterCrop`` (ImageNet reference recipe).
    """

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor,
        batch_size: int,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool = False,
        device: str | torch.device = "cpu",
        seed: int = 0,
        cutout: int = 0,
        pad: int = 4,
        flip: bool = True,
        drop_last: bool | None = None,
        channels_last: bool = False,
        crop: int | None = None,
        resized_crop: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        device = torch.device(device)
        x = torch.as_tensor(images)
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"images must be uint8 (N, H, W, 3) or (N, 3, H, W), got {x.dtype} {tuple(x.shape)}")
        if x.shape[-1] != 3:
            if x.shape[1] != 3:
                raise ValueError(f"images must have 3 channels, got shape {tuple(x.shape)}")
            x = x.permute(0, 2, 3, 1)
        y = torch.as_tensor(labels).to(torch.int64)
        if y.shape != (x.shape[0],):
            raise ValueError(f"labels must be (N,) = ({x.shape[0]},), got {tuple(y.shape)}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if cutout < 0 or pad < 0:
            raise ValueError("cutout and pad must be >= 0")
        h, w = int(x.shape[1]), int(x.shape[2])
        if crop is None and resized_crop:
            raise ValueError("resized_crop needs crop (the output side)")
        if crop is None:
            crop_hw = (h, w)
        else:
            if h != w:
                raise ValueError(f"crop needs square images, got {h}x{w}")
            if not 1 <= int(crop) <= min(h, w):
                raise ValueError(f"crop must be between 1 and the image side {min(h, w)}, got {crop}")
            crop_hw = (int(crop), int(crop))
        self.images = x.contiguous().to(device)
        self.labels = y.contiguous().to(device)
        self.device = device
        self.batch_size = int(batch_size)
        self.train = bool(train)
        self.seed = int(seed)
        self.cutout = int(cutout)
        self.pad = int(pad)
        self.flip = bool(flip)
        self.drop_last = self.train if drop_last is None else bool(drop_last)
        self.channels_last = bool(channels_last)
        self.crop = crop_hw[0]
        self._crop_hw = crop_hw
        self.resized_crop = bool(resized_crop)
        self.num_samples = int(x.shape[0])
        self.epoch = 0
        if not 0 <= int(rank) < int(world_size):
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        if self.train and self.batch_size % int(world_size):
            raise ValueError(f"the global batch {batch_size} is not divisible by {world_size} ranks")
        self.rank, self.world_size = int(rank), int(world_size)
        mean_t = torch.tensor(mean, dtype=torch.float32)
        std_t = torch.tensor(std, dtype=torch.float32)
        # x_norm = (x / 255 - mean) / std = x * scale + shift, channels last: shape (3,)
        self._scale = (1.0 / (255.0 * std_t)).to(device)
        self._shift = (-mean_t / std_t).to(device)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch whose shuffle/augmentation the next ``iter()`` uses."""
        self.epoch = int(epoch)

    def unsharded(self) -> "DeviceLoader":
        """A view of this loader (same tensors, seed and epoch counter value) that yields the whole
        global batches, as rank 0 of a one-process run would; ``self`` when not sharded."""
        if self.world_size == 1:
            return self
        view = copy.copy(self)
        view.rank, view.world_size = 0, 1
        return view

    def _shard(self, lo: int, hi: int) -> tuple[int, int]:
        """This rank's rows ``[lo', hi')`` of the global batch ``[lo, hi)``."""
        n, r, w = hi - lo, self.rank, self.world_size
        return lo + (n * r) // w, lo + (n * (r + 1)) // w  # equal slices of a full (divisible) batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        self.epoch += 1
        return self.batches(epoch)

    def _plan(self, epoch: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The epoch's permutation ``(N,)`` and augmentation draws ``(N, 5)`` (``(N, 7)`` with
        ``resized_crop``) on ``device``.

        Columns of the draws: crop row offset, crop col offset (in ``[0, H + 2 pad - C]``, padded
        coordinates), flip (0/1), cutout centre row, cutout centre col (in the ``C``x``C`` output).
        With ``resized_crop``: box top row, box left col, box height, box width (stored pixels),
        flip, cutout centre row, cutout centre col.
        """
        if not self.train:
            return None, None
        n = self.num_samples
        h, w = self.images.shape[1:3]
        ch, cw = self._crop_hw
        gen = torch.Generator().manual_seed(_mix_seed(self.seed, epoch))
        perm = torch.randperm(n, generator=gen)
        if self.resized_crop:
            box = _resized_crop_boxes(n, h, w, gen)
            draws = torch.cat(
                [
                    box,
                    torch.randint(0, 2, (n, 1), generator=gen),
                    torch.randint(0, ch, (n, 1), generator=gen),
                    torch.randint(0, cw, (n, 1), generator=gen),
                ],
                dim=1,
            )
        else:
            draws = torch.stack(
                [
                    torch.randint(0, h + 2 * self.pad - ch + 1, (n,), generator=gen),
                    torch.randint(0, w + 2 * self.pad - cw + 1, (n,), generator=gen),
                    torch.randint(0, 2, (n,), generator=gen),
                    torch.randint(0, ch, (n,), generator=gen),
                    torch.randint(0, cw, (n,), generator=gen),
                ],
                dim=1,
            )
        both = torch.cat([perm[:, None], draws], dim=1).to(self.device)  # one host-to-device copy
        return both[:, 0], both[:, 1:]

    def batches(self, epoch: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the batches of ``epoch`` (default: the current one) without advancing the counter.

        Yields:
            float32 ``(B, 3, H, W)`` normalised images and int64 ``(B,)`` labels on ``device``.
        """
        epoch = self.epoch if epoch is None else int(epoch)
        perm, draws = self._plan(epoch)
        for b in range(len(self)):
            lo, hi = self._shard(b * self.batch_size, min((b + 1) * self.batch_size, self.num_samples))
            if hi <= lo:
                continue  # a rank's empty share of the last partial evaluation batch
            if perm is None:
                x = self.images[lo:hi]
                h, w = x.shape[1:3]
                ch, cw = self._crop_hw
                if (ch, cw) != (h, w):  # torchvision CenterCrop: offset round((H - C) / 2)
                    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
                    x = x[:, top : top + ch, left : left + cw]
                x = x.to(torch.float32)
                y = self.labels[lo:hi]
                x = x * self._scale + self._shift
            else:
                idx = perm[lo:hi]
                y = self.labels[idx]
                x = self._resized_crop(idx, draws[lo:hi]) if self.resized_crop else self._augment(idx, draws[lo:hi])
            x = x.permute(0, 3, 1, 2)  # NHWC storage viewed as NCHW: channels_last strides
            yield (x if self.channels_last else x.contiguous()), y

    def _augment(self, idx: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """Gather, crop, flip, normalise and cut out a batch: float32 ``(B, C, C, 3)``."""
        _, h, w, _ = self.images.shape
        ch, cw = self._crop_hw
        rows = torch.arange(ch, device=self.device)
        cols = torch.arange(cw, device=self.device)
        src_r = draws[:, 0:1] - self.pad + rows  # (B, C): source row of every output row
        if self.flip:
            cols_or_flipped = torch.where(draws[:, 2:3].bool(), (cw - 1) - cols, cols)  # (B, C)
        else:
            cols_or_flipped = cols.expand(len(idx), cw)
        src_c = draws[:, 1:2] - self.pad + cols_or_flipped  # (B, C)
        valid = ((src_r >= 0) & (src_r < h))[:, :, None] & ((src_c >= 0) & (src_c < w))[:, None, :]
        x = self.images[idx[:, None, None], src_r.clamp(0, h - 1)[:, :, None], src_c.clamp(0, w - 1)[:, None, :]]
        x = x.to(torch.float32) * valid[..., None]  # zero padding (before normalisation)
        x = x * self._scale + self._shift
        return self._cutout(x, draws[:, 3:4], draws[:, 4:5])

    def _resized_crop(self, idx: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """Gather, random-resized-crop (bilinear), flip, normalise, cut out: float32 ``(B, C, C, 3)``.

        The box ``(top, left, height, width)`` in stored pixels maps to the output through an
        affine grid (``align_corners=False``: pixel centres at ``(2 i + 1) / H - 1``), so the
        output samples the box exactly as a bilinear ``resize`` of the cropped box would (without
        antialiasing); a flip negates the horizontal scale.
        """
        import torch.nn.functional as F

        _, h, w, _ = self.images.shape
        ch, cw = self._crop_hw
        x = self.images[idx].permute(0, 3, 1, 2).to(torch.float32)  # (B, 3, H, W)
        d = draws.to(torch.float32)
        top, left, bh, bw = d[:, 0], d[:, 1], d[:, 2], d[:, 3]
        sign = 1.0 - 2.0 * d[:, 4] if self.flip else torch.ones_like(bw)
        theta = torch.zeros(len(idx), 2, 3, device=self.device)
        theta[:, 0, 0] = sign * bw / w
        theta[:, 0, 2] = (2 * left + bw) / w - 1
        theta[:, 1, 1] = bh / h
        theta[:, 1, 2] = (2 * top + bh) / h - 1
        grid = F.affine_grid(theta, [len(idx), 3, ch, cw], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        x = x.permute(0, 2, 3, 1) * self._scale + self._shift
        return self._cutout(x, draws[:, 5:6], draws[:, 6:7])

    def _cutout(self, x: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor) -> torch.Tensor:
        """Zero the Cutout square (centre ``(cy, cx)``, each ``(B, 1)``) of ``x`` ``(B, C, C, 3)``."""
        rows = torch.arange(x.shape[1], device=self.device)
        cols = torch.arange(x.shape[2], device=self.device)
        if self.cutout > 0:
            half = self.cutout // 2
            in_r = (rows >= cy - half) & (rows < cy + half)  # (B, H)
            in_c = (cols >= cx - half) & (cols < cx + half)  # (B, W)
            x = x.masked_fill((in_r[:, :, None] & in_c[:, None, :])[..., None], 0.0)
        return x


# --------------------------------------------------------------------------- bundle


@dataclasses.dataclass
class DataBundle:
    """Everything a trial needs from the data.

    Attributes:
        train: shuffled, augmented :class:`DeviceLoader` (drop_last).
        val: the held-out stratified validation split (``None`` when ``val_size == 0``).
        test: the test set (the ``val/`` folder for ``"folder"`` datasets).
        num_classes, classes: class count and names (index = label).
        mean, std: normalisation statistics used (RGB, [0, 1] units).
        n_train, n_val, n_test: images in each split.
        dataset, layout: what was read and how; image_size: side in pixels of the batches the
            model sees; augment: ``"cifar"`` or ``"imagenet"`` (module docstring).
    """

    train: DeviceLoader
    val: DeviceLoader | None
    test: DeviceLoader
    num_classes: int
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    n_train: int
    n_val: int
    n_test: int
    dataset: str = "cifar10"
    layout: str = "imagefolder"
    image_size: int = 32
    augment: str = "cifar"


def stored_size(image_size: int | None, augment: str = "cifar") -> int | None:
    """Side in pixels at which images are decoded and held: ``image_size`` for ``"cifar"`` (``None``
    = the dataset's own 32), ``round(image_size / CROP_RATIO)`` for ``"imagenet"`` (256 for 224:
    torchvision's ``Resize(256)`` + ``CenterCrop(224)``).

    Raises:
        DataError: an unknown ``augment``, or ``"imagenet"`` without an ``image_size``.
    """
    if augment not in AUGMENTS:
        raise DataError(f"unknown data.augment {augment!r}; choose one of {', '.join(AUGMENTS)}")
    if augment == "cifar" or image_size is None:
        if augment == "imagenet":
            raise DataError("data.augment 'imagenet' needs data.image_size (e.g. 224)")
        return image_size
    return int(round(int(image_size) / CROP_RATIO))


def build_data(
    root: str | os.PathLike,
    dataset: str = "cifar10",
    fmt: str = "auto",
    download: bool = False,
    val_size: int = 5000,
    split_seed: int = 0,
    train_subset: int | None = None,
    test_subset: int | None = None,
    cutout: int = 0,
    batch_size: int = 128,
    eval_batch_size: int | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    channels_last: bool = False,
    image_size: int | None = None,
    augment: str = "cifar",
    rank: int = 0,
    world_size: int = 1,
) -> DataBundle:
    """Decode (or load from cache), split and wrap a dataset in device-resident loaders.

    Args:
        root: the data root (:func:`resolve_data_root`).
        dataset, fmt, download: see :func:`load_arrays`.
        image_size: side in pixels of the batches (``None``: 32, the stored size).
        augment: ``"cifar"`` (pad 4 + crop + flip, images stored at ``image_size``) or
            ``"imagenet"`` (``"folder"`` only: stored at :func:`stored_size`, random-resized crop +
            flip for training, centre crop for evaluation; see the module docstring).
        val_size, split_seed, train_subset, test_subset: see :func:`make_splits`; ``val_size`` 0
            gives ``val=None``.
        cutout: Cutout side in pixels for training batches (0: off).
        batch_size: training batch (drop_last); eval_batch_size: val/test batch (default
            ``batch_size``).
        device: where the uint8 data lives and batches are made.
        seed: the trial seed (shuffling and augmentation only; never the split).
        channels_last: yield ``torch.channels_last`` batches.
        rank, world_size: DDP sharding of the training, validation and test batches
            (:class:`DeviceLoader`); ``batch_size`` and ``eval_batch_size`` stay global.
    Returns:
        :class:`DataBundle`.
    Raises:
        DataError: missing root or layout, unreadable files, subset or split larger than the
            data, a training set smaller than one batch, negative cutout, batch size below 1, an
            unknown ``augment`` or ``"imagenet"`` on a CIFAR dataset.
    Source: DESIGN.md "Data — contract"; torchvision's ImageNet reference recipe (``"imagenet"``).
    """
    if int(batch_size) < 1 or (eval_batch_size is not None and int(eval_batch_size) < 1):
        raise DataError(f"batch sizes must be >= 1, got batch_size={batch_size}, eval_batch_size={eval_batch_size}")
    if int(cutout) < 0:
        raise DataError(f"data.cutout must be >= 0 pixels, got {cutout}")
    if augment == "imagenet" and dataset != "folder":
        raise DataError(f"data.augment 'imagenet' applies to data.dataset folder only, not {dataset}")
    data = load_arrays(root, dataset, fmt, download=download, image_size=stored_size(image_size, augment))
    crop = int(image_size) if augment == "imagenet" else None
    train_idx, val_idx, test_idx = make_splits(
        data.train_y, data.test_y, val_size=val_size, split_seed=split_seed,
        train_subset=train_subset, test_subset=test_subset,
    )
    if int(batch_size) % int(world_size):
        raise DataError(f"train.batch_size {batch_size} (the global batch) is not divisible by the {world_size} DDP ranks")
    if len(train_idx) < int(batch_size):
        raise DataError(
            f"the training split has {len(train_idx)} images, fewer than one batch of {batch_size} "
            "(lower train.batch_size or raise data.train_subset)"
        )
    eval_bs = int(eval_batch_size or batch_size)
    common = dict(mean=data.mean, std=data.std, device=device, channels_last=channels_last, crop=crop,
                  rank=int(rank), world_size=int(world_size))
    train = DeviceLoader(
        data.train_x[train_idx], data.train_y[train_idx], int(batch_size),
        train=True, seed=seed, cutout=int(cutout), resized_crop=augment == "imagenet", **common,
    )
    val = None
    if len(val_idx):
        val = DeviceLoader(data.train_x[val_idx], data.train_y[val_idx], eval_bs, train=False, **common)
    test = DeviceLoader(data.test_x[test_idx], data.test_y[test_idx], eval_bs, train=False, **common)
    log.info(
        "%s (%s, %s): %d train / %d val / %d test images on %s",
        dataset, data.layout, data.path, len(train_idx), len(val_idx), len(test_idx), device,
    )
    return DataBundle(
        train=train, val=val, test=test, num_classes=len(data.classes), classes=list(data.classes),
        mean=tuple(data.mean), std=tuple(data.std), n_train=len(train_idx), n_val=len(val_idx),
        n_test=len(test_idx), dataset=dataset, layout=data.layout, image_size=train.crop, augment=augment,
    )
