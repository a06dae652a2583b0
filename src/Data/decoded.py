"""Data sets decoded from files by torchvision, and the ``DataLoader`` stream that delivers their batches in the
seeded order of ``batching.py``. Imported only when a run uses one of these sets (the bundled digits need none of it):
torchvision itself is imported inside each loader.

name         files read under ``root`` (default ``<project>/data``)   one sample
-----------  ----------------------------------------------------  --------------------------------
mnist        MNIST/raw/{train,t10k}-{images,labels}-*ubyte           3×32×32, 28→32 bilinear
mini_mnist   as mnist; seeded stratified 5,000 train images          3×32×32, held as tensors
mnist_flat   as mnist                                                784 = 28×28 (not resized)
cifar10      cifar-10-batches-py/                                    3×32×32
cifar100     cifar-100-python/                                       3×32×32, 100 fine labels
svhn         svhn/{train,test}_32x32.mat                             3×32×32
imagenet     imagenet/{train,val}/<class>/<image>                    Resize(36) + CenterCrop(32)

Each is normalised with its usual per-channel training-set constants; ``imagenet`` is any small local ``ImageFolder``
subset whose train and val folders hold the same classes, and nothing downloads it.
"""
from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .batching import BatchStream
from .images import IMAGE_SIZE, Split, stratified_subset

MINI_MNIST_SIZE = 5_000
MNIST_STATS = ((0.1307,), (0.3081,))  # per-channel (mean, std) of each training set, the usual published values
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
SVHN_STATS = ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class _Flatten:
    """(C, H, W) -> (C·H·W). A class, not a lambda, so that spawned DataLoader workers can pickle it."""

    def __call__(self, image: Tensor) -> Tensor:
        return image.flatten()


def _transform(stats: tuple[tuple[float, ...], tuple[float, ...]], *pre: object, flat: bool = False):
    from torchvision import transforms  # lazy: a second of start-up
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
    from torchvision.datasets import MNIST  # lazy: a second of start-up
    return _open(name, root / "MNIST" / "raw", download, lambda: (
        MNIST(root, train=True, transform=transform, download=download),
        MNIST(root, train=False, transform=transform, download=download)))


def _mnist_images():
    """28×28 grey -> 3×32×32: bilinear resize, channel repeated, normalised."""
    from torchvision import transforms  # lazy: a second of start-up
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
    from torchvision.datasets import CIFAR10  # lazy: a second of start-up
    transform = _transform(CIFAR10_STATS)
    return (*_open("cifar10", root / CIFAR10.base_folder, download, lambda: (
        CIFAR10(root, train=True, transform=transform, download=download),
        CIFAR10(root, train=False, transform=transform, download=download))), 10)


def _load_cifar100(root: Path, download: bool, seed: int) -> Split:
    from torchvision.datasets import CIFAR100  # lazy: a second of start-up
    transform = _transform(CIFAR100_STATS)
    return (*_open("cifar100", root / CIFAR100.base_folder, download, lambda: (
        CIFAR100(root, train=True, transform=transform, download=download),
        CIFAR100(root, train=False, transform=transform, download=download))), 100)


def _load_svhn(root: Path, download: bool, seed: int) -> Split:
    from torchvision.datasets import SVHN  # lazy: a second of start-up
    folder, transform = root / "svhn", _transform(SVHN_STATS)
    return (*_open("svhn", folder, download, lambda: (
        SVHN(folder, split="train", transform=transform, download=download),
        SVHN(folder, split="test", transform=transform, download=download))), 10)


def _load_imagenet(root: Path, download: bool, seed: int) -> Split:
    from torchvision import transforms  # lazy: a second of start-up
    from torchvision.datasets import ImageFolder  # lazy: a second of start-up
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


LOADERS: dict[str, Callable[[Path, bool, int], Split]] = {
    "mnist": _load_mnist, "mini_mnist": _load_mini_mnist, "mnist_flat": _load_mnist_flat, "cifar10": _load_cifar10,
    "cifar100": _load_cifar100, "svhn": _load_svhn, "imagenet": _load_imagenet}


class _EpochBatchSampler:
    """Batch sampler yielding the batches ``start..end`` of one epoch's permutation.

    The stream changes ``perm``/``start`` and then restarts the loader's iterator; ``__iter__``
    copies them first, so an iterator already handed out is not affected.
    """

    def __init__(self, batch_size: int, batches_per_epoch: int) -> None:
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.perm = torch.arange(0)
        self.start = 0

    def __iter__(self) -> Iterator[list[int]]:
        perm, start, size = self.perm, self.start, self.batch_size
        for k in range(start, self.batches_per_epoch):
            yield perm[k * size:(k + 1) * size].tolist()

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start


class LoaderBatchStream(BatchStream):
    """Batches decoded by a ``DataLoader`` whose sampler follows the permutation rule.

    Reading ``t, t + 1, ...`` in order keeps one loader iterator per epoch (workers persist across
    epochs); asking for any other ``t`` restarts the iterator at that batch, which costs one
    prefetch but gives the same batch as sequential reading. The loader is rebuilt lazily after
    unpickling (the iterator and workers are not pickled).
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, device: torch.device,
                 num_workers: int = 0) -> None:
        super().__init__(len(dataset), batch_size, seed)
        self.dataset = dataset
        self.device = torch.device(device)
        self.num_workers = num_workers
        self._reset_loader()

    def _reset_loader(self) -> None:
        self._sampler = _EpochBatchSampler(self.batch_size, self.batches_per_epoch)
        self._loader: DataLoader | None = None
        self._iterator: Iterator | None = None
        self._next_t: int | None = None  # the t that the live iterator yields next

    def _seek(self, t: int) -> None:
        epoch, k = self.position(t)
        self._sampler.perm, self._sampler.start = self.permutation(epoch), k
        if self._loader is None:
            self._loader = DataLoader(
                self.dataset, batch_sampler=self._sampler, num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0, pin_memory=self.device.type == "cuda")
        self._iterator = iter(self._loader)
        self._next_t = t

    def __getitem__(self, t: int) -> tuple[Tensor, Tensor]:
        t = operator.index(t)
        if t != self._next_t:
            self._seek(t)
        inputs, targets = next(self._iterator)
        # The iterator ends with the epoch; the next epoch needs a new permutation (a seek).
        self._next_t = t + 1 if (t + 1) % self.batches_per_epoch else None
        return _to_device(inputs, targets, self.device)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in ("_sampler", "_loader", "_iterator", "_next_t"):
            state.pop(key)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_loader()


def _to_device(inputs: Tensor, targets: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    non_blocking = device.type == "cuda"
    return inputs.to(device, non_blocking=non_blocking), targets.to(device, non_blocking=non_blocking)


def iterate_subset(dataset: Dataset, indices: Tensor, batch_size: int, device: torch.device,
                   num_workers: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield the samples ``indices`` of a decoded data set in order, in chunks, on ``device``."""
    device = torch.device(device)
    loader = DataLoader(Subset(dataset, indices.tolist()), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, pin_memory=device.type == "cuda")
    for inputs, targets in loader:
        yield _to_device(inputs, targets, device)


def gather(dataset: Dataset, indices: Tensor, device: torch.device,
           num_workers: int = 0) -> tuple[Tensor, Tensor]:
    """Return the samples ``indices`` of any map-style data set as two stacked tensors on ``device``."""
    chunks = list(iterate_subset(dataset, indices, 1024, device, num_workers))
    return torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])
