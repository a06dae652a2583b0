"""Image classification data sets, all delivered as 3×32×32 float tensors (one flat exception each).

``digits`` (scikit-learn's bundled 8×8 digits) needs no network and loads in milliseconds: it is the
offline default. The torchvision sets read their usual on-disk formats under ``root`` (default
``<project root>/data``) and download only when asked:

name         files read under ``root``                       one sample
-----------  ----------------------------------------------  --------------------------------
digits       none (scikit-learn's bundled digits.csv.gz)     3×32×32, 8→32 nearest
digits_flat  none                                            64, standardised per pixel
mnist        MNIST/raw/{train,t10k}-{images,labels}-*ubyte   3×32×32, 28→32 bilinear
mini_mnist   as mnist; seeded stratified 5,000 train images  3×32×32, held as tensors
mnist_flat   as mnist                                        784 = 28×28 (not resized)
cifar10      cifar-10-batches-py/                            3×32×32
cifar100     cifar-100-python/                               3×32×32, 100 fine labels
svhn         svhn/{train,test}_32x32.mat                     3×32×32
imagenet     imagenet/{train,val}/<class>/<image>            Resize(36) + CenterCrop(32)

Every image set is normalised with its per-channel training-set constants (digits: the mean and
std of its own training split). ``imagenet`` is any small local ``ImageFolder`` subset (the full
ImageNet makes little sense at 32×32 on this sandbox's budget); its train and val folders must hold
the same class folders, and nothing downloads it. torchvision is imported inside the loaders only.
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

from .batching import gather

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "data"
IMAGE_SIZE = 32
DIGITS_TEST_FRACTION = 0.2
MINI_MNIST_SIZE = 5_000

# Per-channel (mean, std) of each training set, the usual published values.
MNIST_STATS = ((0.1307,), (0.3081,))
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
SVHN_STATS = ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

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


# --- torchvision: imported inside each loader (a second or more of start-up that the default digits run never
# needs), decoded lazily -----------------------------------------------------------------------------------------

class _Flatten:
    """(C, H, W) -> (C·H·W). A class, not a lambda, so that spawned DataLoader workers can pickle it."""

    def __call__(self, image: Tensor) -> Tensor:
        return image.flatten()


def _transform(stats: tuple[tuple[float, ...], tuple[float, ...]], *pre: object, flat: bool = False):
    from torchvision import transforms  # lazy: see the section comment
    steps = [*pre, transforms.ToTensor(), transforms.Normalize(*stats)]
    return transforms.Compose(steps + ([_Flatten()] if flat else []))


def _open(name: str, folder: Path, download: bool, build: Callable[[], tuple[Dataset, Dataset]],
          downloadable: bool = True) -> tuple[Dataset, Dataset]:
    """Run ``build``; turn torchvision's 'not found' errors into one message that says what to do."""
    try:
        return build()
    except (RuntimeError, OSError) as err:
        fetch = ("copy them from a machine with network access, where torchvision's loader downloads them, e.g. "
                 "torchvision.datasets.CIFAR10(root, download=True)" if downloadable else "nothing downloads it")
        raise FileNotFoundError(
            f"dataset '{name}' could not be read from {folder}: the files "
            f"are missing, unreadable or could not be downloaded. Put them there ({fetch}), or use "
            f"'digits' (bundled with scikit-learn) to work offline.") from err


def _mnist(name: str, root: Path, download: bool, transform) -> tuple[Dataset, Dataset]:
    from torchvision.datasets import MNIST  # lazy: see the section comment
    return _open(name, root / "MNIST" / "raw", download, lambda: (
        MNIST(root, train=True, transform=transform, download=download),
        MNIST(root, train=False, transform=transform, download=download)))


def _mnist_images():
    """28×28 grey -> 3×32×32: bilinear resize, channel repeated, normalised."""
    from torchvision import transforms  # lazy: see the section comment
    three = (MNIST_STATS[0] * 3, MNIST_STATS[1] * 3)
    return _transform(three, transforms.Resize(IMAGE_SIZE), transforms.Grayscale(num_output_channels=3))


def _load_mnist(root: Path, download: bool, seed: int) -> Split:
    return (*_mnist("mnist", root, download, _mnist_images()), 10)


def _load_mnist_flat(root: Path, download: bool, seed: int) -> Split:
    return (*_mnist("mnist_flat", root, download, _transform(MNIST_STATS, flat=True)), 10)


def _load_mini_mnist(root: Path, download: bool, seed: int) -> Split:
    train, test = _mnist("mini_mnist", root, download, _mnist_images())
    subset = stratified_subset(train.targets, min(MINI_MNIST_SIZE, len(train)), seed)
    # 5,000 images are 61 MB as float32: decode them once and keep them as tensors.
    return TensorDataset(*gather(train, subset, "cpu")), test, 10


def _load_cifar10(root: Path, download: bool, seed: int) -> Split:
    from torchvision.datasets import CIFAR10  # lazy: see the section comment
    transform = _transform(CIFAR10_STATS)
    return (*_open("cifar10", root / CIFAR10.base_folder, download, lambda: (
        CIFAR10(root, train=True, transform=transform, download=download),
        CIFAR10(root, train=False, transform=transform, download=download))), 10)


def _load_cifar100(root: Path, download: bool, seed: int) -> Split:
    from torchvision.datasets import CIFAR100  # lazy: see the section comment
    transform = _transform(CIFAR100_STATS)
    return (*_open("cifar100", root / CIFAR100.base_folder, download, lambda: (
        CIFAR100(root, train=True, transform=transform, download=download),
        CIFAR100(root, train=False, transform=transform, download=download))), 100)


def _load_svhn(root: Path, download: bool, seed: int) -> Split:
    from torchvision.datasets import SVHN  # lazy: see the section comment
    folder, transform = root / "svhn", _transform(SVHN_STATS)
    return (*_open("svhn", folder, download, lambda: (
        SVHN(folder, split="train", transform=transform, download=download),
        SVHN(folder, split="test", transform=transform, download=download))), 10)


def _load_imagenet(root: Path, download: bool, seed: int) -> Split:
    from torchvision import transforms  # lazy: see the section comment
    from torchvision.datasets import ImageFolder  # lazy: see the section comment
    folder = root / "imagenet"
    transform = _transform(IMAGENET_STATS, transforms.Resize(IMAGE_SIZE + 4), transforms.CenterCrop(IMAGE_SIZE))
    # ImageFolder cannot download; download=True changes nothing here.
    train, val = _open("imagenet", folder, download, lambda: (
        ImageFolder(folder / "train", transform=transform),
        ImageFolder(folder / "val", transform=transform)), downloadable=False)
    if train.classes != val.classes:
        raise ValueError(f"imagenet: {folder / 'train'} and {folder / 'val'} must hold the same class "
                         f"folders; got {len(train.classes)} and {len(val.classes)} classes "
                         f"(only in train: {sorted(set(train.classes) - set(val.classes))[:5]}, "
                         f"only in val: {sorted(set(val.classes) - set(train.classes))[:5]})")
    return train, val, len(train.classes)


IMAGE_DATASETS: dict[str, Callable[[Path, bool, int], Split]] = {
    "digits": _load_digits,
    "digits_flat": _load_digits_flat,
    "mnist": _load_mnist,
    "mini_mnist": _load_mini_mnist,
    "mnist_flat": _load_mnist_flat,
    "cifar10": _load_cifar10,
    "cifar100": _load_cifar100,
    "svhn": _load_svhn,
    "imagenet": _load_imagenet,
}


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
    return IMAGE_DATASETS[name](Path(root) if root is not None else DEFAULT_ROOT, download, seed)
