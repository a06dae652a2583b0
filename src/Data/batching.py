"""The training data order: one seeded sequence of mini-batches, random access by step.

The contract the engines rely on (their equivalence tests compare runs batch by batch):

* batch ``t`` is a pure function of (dataset, batch_size, seed, t);
* epoch ``e = t // batches_per_epoch`` uses ``epoch_permutation(n, seed, e)``, i.e.
  ``torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1_000_003 * e))`` on the CPU;
* batch ``t`` is the slice ``[k * batch_size, (k + 1) * batch_size)`` of that permutation with
  ``k = t % batches_per_epoch``; the incomplete last batch is dropped, so
  ``batches_per_epoch = max(1, n // batch_size)``, and a batch size above ``n`` is clamped to ``n``.

Two implementations deliver the same indices. ``TensorBatchStream`` indexes tensors that already
live on the device (small data sets); ``LoaderBatchStream`` decodes samples through a ``DataLoader``
whose batch sampler follows the permutation (large torchvision data sets).
"""

from __future__ import annotations

import operator
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

EPOCH_SEED_STRIDE = 1_000_003  # seed of epoch e is seed + EPOCH_SEED_STRIDE * e


def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """Return the sample order of one epoch.

    Args:
        n: number of samples.
        seed: seed of the batch sequence.
        epoch: epoch index (0-based).

    Returns:
        int64 CPU tensor, a permutation of ``range(n)``.
    """
    generator = torch.Generator().manual_seed(seed + EPOCH_SEED_STRIDE * epoch)
    return torch.randperm(n, generator=generator)


class BatchStream:
    """An endless, seeded sequence of mini-batches with random access: ``stream[t]``.

    Subclasses decide how the samples of ``indices(t)`` are fetched; the order itself is defined
    here, once. Attributes: ``n`` (samples), ``batch_size`` (after clamping to ``n``), ``seed``,
    ``batches_per_epoch``.
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if n < 1:
            raise ValueError(f"cannot batch an empty data set (n = {n})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        self.n = n
        self.batch_size = min(batch_size, n)
        self.seed = seed
        self.batches_per_epoch = max(1, n // self.batch_size)
        self._cached_epoch: int | None = None
        self._cached_perm: Tensor | None = None

    def permutation(self, epoch: int) -> Tensor:
        """Return (and cache) the CPU permutation of ``epoch``."""
        if epoch != self._cached_epoch:
            self._cached_perm = epoch_permutation(self.n, self.seed, epoch)
            self._cached_epoch = epoch
        return self._cached_perm

    def position(self, t: int) -> tuple[int, int]:
        """Return (epoch, batch index within the epoch) of step ``t``."""
        t = operator.index(t)
        if t < 0:
            raise IndexError(f"batch index must be >= 0, got {t}")
        return divmod(t, self.batches_per_epoch)

    def indices(self, t: int) -> Tensor:
        """Return the CPU int64 sample indices of batch ``t``, shape (batch_size,)."""
        epoch, k = self.position(t)
        return self.permutation(epoch)[k * self.batch_size:(k + 1) * self.batch_size]

    def __getitem__(self, t: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class TensorBatchStream(BatchStream):
    """Batches gathered by indexing tensors held on the device (no per-sample work)."""

    def __init__(self, inputs: Tensor, targets: Tensor, batch_size: int, seed: int) -> None:
        super().__init__(len(inputs), batch_size, seed)
        self.inputs, self.targets = inputs, targets
        self._device_perm: tuple[int, Tensor] | None = None  # (epoch, permutation on the device)

    def __getitem__(self, t: int) -> tuple[Tensor, Tensor]:
        epoch, k = self.position(t)
        if self._device_perm is None or self._device_perm[0] != epoch:
            self._device_perm = (epoch, self.permutation(epoch).to(self.inputs.device))
        idx = self._device_perm[1][k * self.batch_size:(k + 1) * self.batch_size]
        return self.inputs[idx], self.targets[idx]


class PoolBatchStream(BatchStream):
    """Batches drawn from a pool of samples (a curriculum's), held as tensors on the device.

    Batch ``t`` is slice ``k`` of ``epoch_permutation(len(pool), seed, e)`` mapped through ``pool``: a pure
    function of (pool, batch_size, seed, t), like every stream.
    """

    def __init__(self, inputs: Tensor, targets: Tensor, pool: Tensor, batch_size: int, seed: int) -> None:
        super().__init__(len(pool), batch_size, seed)
        self.inputs, self.targets = inputs, targets
        self.pool = pool.to(inputs.device)
        self._device_perm: tuple[int, Tensor] | None = None

    def __getitem__(self, t: int) -> tuple[Tensor, Tensor]:
        epoch, k = self.position(t)
        if self._device_perm is None or self._device_perm[0] != epoch:
            self._device_perm = (epoch, self.pool[self.permutation(epoch).to(self.inputs.device)])
        idx = self._device_perm[1][k * self.batch_size:(k + 1) * self.batch_size]
        return self.inputs[idx], self.targets[idx]


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
