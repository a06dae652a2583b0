"""One entry point for every data set: ``load_data(name)`` -> ``TaskData``.

``TaskData`` says what the task is (shapes, classes) and hands out data in three ways that do not
disturb one another: ``batches`` (the seeded training sequence, see ``batching``), ``eval_batches``
(a fixed seeded subset of a split, for loss/accuracy) and ``sample_batch`` (one fixed batch, for
measurements). Small data sets live on the device as tensors; the large torchvision ones are
decoded by ``DataLoader`` workers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from .batching import BatchStream, TensorBatchStream
from .images import IMAGE_DATASETS, generate_imagedata

EVAL_SEED_OFFSET = 4_242  # the eval subset of a split is seeded with load_data's seed + this
EVAL_CACHE_BYTES = 256 * 2**20  # decoded eval subsets up to this size are kept on the device
DEFAULT_CONTEXT = 64  # characters per sample of a text data set (text.py's DEFAULT_CONTEXT, dol1.py's --context)


@dataclass(frozen=True)
class DatasetEntry:
    """A ``DATASETS`` value: the task and a loader ``(root, download, seed, **options) -> (train, test, dim)``;
    ``options`` names the settings of ``load_data`` the loader takes as keywords (``python_docs``: ``context``)."""

    task: str  # "classification", "regression" or "language_model"
    load: Callable[..., tuple[Dataset, Dataset, int]]
    options: tuple[str, ...] = ()

    def __call__(self, root: str | Path | None = None, download: bool = False,
                 seed: int = 0, **options: Any) -> tuple[Dataset, Dataset, int]:
        return self.load(root, download, seed, **{k: v for k, v in options.items() if k in self.options})


def _load_regression(name: str, root: str | Path | None, download: bool, seed: int):
    from .regression import generate_regressiondata  # generated or bundled: no files, no download
    return generate_regressiondata(name, seed)


def _load_python_docs(root: str | Path | None, download: bool, seed: int, context: int = DEFAULT_CONTEXT):
    from .text import load_python_docs  # Python's own help texts: local, character windows of ``context``
    return load_python_docs(root, download, seed, context=context)


REGRESSION_NAMES = ("ones", "synthetic_regression", "diabetes")  # regression.py's REGRESSION_DATASETS
DATASETS: dict[str, DatasetEntry] = {
    **{name: DatasetEntry("classification", partial(generate_imagedata, name)) for name in IMAGE_DATASETS},
    **{name: DatasetEntry("regression", partial(_load_regression, name)) for name in REGRESSION_NAMES},
    "python_docs": DatasetEntry("language_model", _load_python_docs, options=("context",)),
}


@dataclass(eq=False)
class TaskData:
    """A loaded data set: its task, shapes and the three ways of reading it.

    Splits that are ``TensorDataset``s hold their tensors on ``device``; other splits are decoded
    by ``DataLoader``s with ``num_workers`` workers and moved to ``device`` batch by batch.
    """

    name: str
    task: str  # "classification" (targets int64 (N,)), "regression" (float32 (N, d)), "language_model" (int64 (N, T))
    input_shape: tuple[int, ...]  # one sample, without the batch dimension
    output_dim: int  # number of classes, the regression target dimension, or the vocabulary size
    train: Dataset
    test: Dataset
    device: torch.device
    seed: int = 0  # the data seed (split, subsets, eval subsets); batch order has its own seed
    num_workers: int = 0
    _eval_cache: dict[str, TensorDataset] = field(default_factory=dict, init=False, repr=False)

    def _split(self, split: str) -> Dataset:
        splits = {"train": self.train, "test": self.test}
        if split not in splits:
            raise ValueError(f"unknown split {split!r}; valid: {sorted(splits)}")
        return splits[split]

    def batches(self, batch_size: int, seed: int) -> BatchStream:
        """Return the training sequence: ``stream[t]`` is batch t of the order seeded by ``seed``."""
        if isinstance(self.train, TensorDataset):
            return TensorBatchStream(*self.train.tensors, batch_size, seed)
        from .decoded import LoaderBatchStream  # a torchvision set, decoded by DataLoader workers
        return LoaderBatchStream(self.train, batch_size, seed, self.device, self.num_workers)

    def eval_indices(self, split: str, max_samples: int | None = None) -> Tensor:
        """Return the CPU indices that ``eval_batches`` reads: a prefix of one fixed permutation."""
        n = len(self._split(split))
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples must be positive or None, got {max_samples}")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + EVAL_SEED_OFFSET))
        return order[:max_samples]

    def eval_batches(self, split: str, max_samples: int | None = None,
                     batch_size: int = 1024) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield the first ``max_samples`` samples of a fixed seeded order of a split, in chunks.

        The same call always yields the same batches, on ``device``; the training stream is not
        touched. Decoded (torchvision) subsets up to ``EVAL_CACHE_BYTES`` are decoded once and
        cached on the device; bigger ones are decoded again on every call.

        Args:
            split: "train" or "test".
            max_samples: how many samples (None: the whole split; clamped to its size).
            batch_size: chunk size.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        dataset, indices = self._split(split), self.eval_indices(split, max_samples)
        if not isinstance(dataset, TensorDataset):
            from .decoded import iterate_subset
            if len(indices) * dataset[0][0].nbytes > EVAL_CACHE_BYTES:
                return iterate_subset(dataset, indices, batch_size, self.device, self.num_workers)
            dataset, indices = self._cached_eval_subset(split, dataset, indices), torch.arange(len(indices))
        return _chunks(dataset.tensors, indices.to(self.device), batch_size)

    def _cached_eval_subset(self, split: str, dataset: Dataset, indices: Tensor) -> TensorDataset:
        # Every eval subset of a split is a prefix of the same order: keep the longest one read.
        from .decoded import gather
        cached = self._eval_cache.get(split)
        if cached is None or len(cached) < len(indices):
            cached = self._eval_cache[split] = TensorDataset(
                *gather(dataset, indices, self.device, self.num_workers))
        return cached

    def sample_batch(self, split: str, n: int, seed: int) -> tuple[Tensor, Tensor]:
        """Return one fixed batch: ``n`` samples of a split drawn by ``seed`` (clamped), on ``device``."""
        if n < 1:
            raise ValueError(f"n must be positive, got {n}")
        dataset = self._split(split)
        indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
        if isinstance(dataset, TensorDataset):
            inputs, targets = dataset.tensors
            indices = indices.to(self.device)
            return inputs[indices], targets[indices]
        from .decoded import gather
        return gather(dataset, indices, self.device, self.num_workers)


def _chunks(tensors: tuple[Tensor, ...], indices: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    inputs, targets = tensors
    for chunk in indices.split(batch_size):
        yield inputs[chunk], targets[chunk]


def _on_device(dataset: Dataset, device: torch.device) -> Dataset:
    """A tensor data set with its tensors moved to ``device`` (attributes such as w_star kept)."""
    if not isinstance(dataset, TensorDataset):
        return dataset
    moved = copy.copy(dataset)
    moved.tensors = tuple(t.to(device) for t in dataset.tensors)
    return moved


def load_data(name: str, *, root: str | Path | None = None, device: str | torch.device = "cpu",
              seed: int = 0, download: bool = False, num_workers: int = 2,
              context: int = DEFAULT_CONTEXT) -> TaskData:
    """Load a data set by name and describe its task.

    Args:
        name: a key of ``DATASETS``; ``digits`` works offline.
        root: folder of the torchvision files; default ``<project root>/data``.
        device: where batches are delivered (tensor data sets are moved there once).
        seed: data seed: splits, subsets, synthetic data and eval subsets (not the batch order).
        download: let torchvision download missing files.
        num_workers: ``DataLoader`` workers for the decoded (torchvision) data sets.
        context: characters per sample of a text data set (``python_docs``); the other sets ignore it.

    Raises:
        ValueError: unknown name.
        FileNotFoundError: a torchvision set whose files are missing and could not be downloaded.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {sorted(DATASETS)}")
    entry, device = DATASETS[name], torch.device(device)
    train, test, output_dim = entry(root, download, seed, context=context)
    train, test = _on_device(train, device), _on_device(test, device)
    return TaskData(name=name, task=entry.task, input_shape=tuple(train[0][0].shape), output_dim=output_dim,
                    train=train, test=test, device=device, seed=seed, num_workers=num_workers)
