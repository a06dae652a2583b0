"""The training data order: one seeded sequence of mini-batches, random access by step.

The contract the engines rely on (their equivalence tests compare runs batch by batch):

* batch ``t`` is a pure function of (dataset, batch_size, seed, t);
* epoch ``e = t // batches_per_epoch`` uses ``epoch_permutation(n, seed, e)``, i.e.
  ``torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1_000_003 * e))`` on the CPU;
* batch ``t`` is the slice ``[k * batch_size, (k + 1) * batch_size)`` of that permutation with
  ``k = t % batches_per_epoch``; the incomplete last batch is dropped, so
  ``batches_per_epoch = max(1, n // batch_size)``, and a batch size above ``n`` is clamped to ``n``.

``TensorBatchStream`` indexes tensors that already live on the device (small data sets);
``decoded.LoaderBatchStream`` delivers the same indices through a ``DataLoader`` (torchvision sets).
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor

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
