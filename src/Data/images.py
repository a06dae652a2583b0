"""Image classification data sets, delivered as 3×32×32 float tensors (``digits_flat``: 64 values).

``digits`` (scikit-learn's bundled 8×8 digits, 1,797 images, 10 classes) needs no network and loads in milliseconds:
the offline default, scaled 8→32 by nearest neighbour and normalised with its training split's mean and std;
``digits_flat`` standardises each of the 64 pixels. The torchvision sets (mnist, cifar10, …) live in ``decoded.py``,
imported only when one is asked for.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset


DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "data"
IMAGE_SIZE = 32
DIGITS_TEST_FRACTION = 0.2

Split = tuple[Dataset, Dataset, int]  # (train, test, number of classes)


def stratified_subset(labels: Tensor, size: int, seed: int) -> Tensor:
    """Pick ``size`` indices with the class proportions of ``labels`` (largest-remainder rounding).

    Args:
        labels: (N,) integer class labels.
        size: number of indices to pick, 0 <= size <= N.
        seed: seed of the pick.

    Returns:
        sorted int64 indices, shape (size,).
    """
    if not 0 <= size <= len(labels):
        raise ValueError(f"subset size must be in [0, {len(labels)}], got {size}")
    classes, counts = labels.unique(return_counts=True)
    quota = counts.double() * size / len(labels)
    take = quota.floor().long()
    # Hand the leftover picks to the classes with the largest fractional parts.
    leftover = size - int(take.sum())
    take[torch.argsort(quota - take, descending=True)[:leftover]] += 1
    generator = torch.Generator().manual_seed(seed)
    picked = []
    for c, k in zip(classes, take):
        members = (labels == c).nonzero().flatten()
        picked.append(members[torch.randperm(len(members), generator=generator)[:k]])
    return torch.cat(picked).sort().values


def _complement(indices: Tensor, n: int) -> Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[indices] = False
    return mask.nonzero().flatten()


# --- digits: offline, held as tensors ----------------------------------------------------------

def _read_digits() -> tuple[Tensor, Tensor]:
    """Return scikit-learn's digits as (1797, 64) float pixels in [0, 16] and (1797,) labels.

    Reads the bundled CSV directly: importing ``sklearn.datasets`` costs ~0.8 s, the file 20 ms.
    """
    spec = importlib.util.find_spec("sklearn")
    csv = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if csv is not None and csv.is_file():
        table = np.loadtxt(csv, delimiter=",")
        pixels, labels = table[:, :-1], table[:, -1]
    else:  # a scikit-learn whose data layout changed: take the slow, public road
        from sklearn.datasets import load_digits  # lazy: scikit-learn costs ~1 s to import, rarely needed here
        pixels, labels = load_digits(return_X_y=True)
    return torch.as_tensor(pixels, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.int64)


def _digits_split(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    pixels, labels = _read_digits()
    test = stratified_subset(labels, round(DIGITS_TEST_FRACTION * len(labels)), seed)
    train = _complement(test, len(labels))
    return pixels[train], labels[train], pixels[test], labels[test]


def _load_digits(root: Path, download: bool, seed: int) -> Split:
    x_train, y_train, x_test, y_test = _digits_split(seed)

    def to_images(pixels: Tensor) -> Tensor:  # (N, 64) in [0, 16] -> (N, 1, 32, 32) in [0, 1]
        return F.interpolate(pixels.view(-1, 1, 8, 8) / 16.0, size=IMAGE_SIZE, mode="nearest")

    train_images, test_images = to_images(x_train), to_images(x_test)
    mean, std = train_images.mean(), train_images.std()
    return (TensorDataset(((train_images - mean) / std).repeat(1, 3, 1, 1), y_train),
            TensorDataset(((test_images - mean) / std).repeat(1, 3, 1, 1), y_test), 10)


def _load_digits_flat(root: Path, download: bool, seed: int) -> Split:
    x_train, y_train, x_test, y_test = _digits_split(seed)
    mean, std = x_train.mean(0), x_train.std(0)
    std[std == 0] = 1.0  # border pixels that are 0 in every training image
    return TensorDataset((x_train - mean) / std, y_train), TensorDataset((x_test - mean) / std, y_test), 10


DECODED = ("mnist", "mini_mnist", "mnist_flat", "cifar10", "cifar100", "svhn", "imagenet")  # see decoded.py
IMAGE_DATASETS: dict[str, Callable[[Path, bool, int], Split] | str] = {
    "digits": _load_digits, "digits_flat": _load_digits_flat, **dict.fromkeys(DECODED, "src.Data.decoded")}


def generate_imagedata(name: str, root: str | Path | None = None, download: bool = False,
                       seed: int = 0) -> Split:
    """Load an image classification data set by name (the seed's name for this function).

    Args:
        name: a key of ``IMAGE_DATASETS``.
        root: folder holding the torchvision files; default ``<project root>/data``.
        download: let torchvision download missing files.
        seed: seed of the data split / subset (digits, mini_mnist); not of the batch order.

    Returns:
        (train, test, number of classes); targets are int64 class indices.

    Raises:
        ValueError: unknown name.
        FileNotFoundError: a torchvision set whose files are missing and could not be downloaded.
    """
    if name not in IMAGE_DATASETS:
        raise ValueError(f"unknown image dataset {name!r}; valid: {sorted(IMAGE_DATASETS)}")
    load = IMAGE_DATASETS[name]
    if isinstance(load, str):  # a torchvision set: its module is imported now
        load = importlib.import_module(load).LOADERS[name]
    return load(Path(root) if root is not None else DEFAULT_ROOT, download, seed)
