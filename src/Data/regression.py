"""Regression data sets, held as tensors: inputs float32 (N, d_in), targets float32 (N, d_out).

=======================  ====================================================================
name                     content
=======================  ====================================================================
ones                     the seed's toy: inputs and targets all ones (degenerate: any model
                         with a bias fits it; kept for old configurations)
synthetic_regression     seeded Gaussian X (1,000 × 10), y = X·w* + b* + 0.01·noise; w*, b*
                         are attributes of both splits (``w_star`` (10, 1), ``b_star`` (1,))
diabetes                 scikit-learn's bundled diabetes set (442 × 10), X and y standardised
                         with the training split's statistics
=======================  ====================================================================

All are split 80/20 (seeded where the split is random).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

N_SAMPLES = 1_000  # ones and synthetic_regression
N_FEATURES = 10
TEST_FRACTION = 0.2
NOISE_STD = 0.01  # synthetic_regression

Split = tuple[Dataset, Dataset, int]  # (train, test, target dimension)


class LinearRegressionDataset(TensorDataset):
    """A ``TensorDataset`` that also carries the true parameters: y = X·w_star + b_star + noise."""

    def __init__(self, inputs: Tensor, targets: Tensor, w_star: Tensor, b_star: Tensor,
                 noise_std: float) -> None:
        super().__init__(inputs, targets)
        self.w_star = w_star  # (d_in, d_out)
        self.b_star = b_star  # (d_out,)
        self.noise_std = noise_std


def _split_at(n: int) -> int:
    return n - round(TEST_FRACTION * n)


def _ones(seed: int) -> Split:
    n_train = _split_at(N_SAMPLES)
    return (TensorDataset(torch.ones(n_train, N_FEATURES), torch.ones(n_train, 1)),
            TensorDataset(torch.ones(N_SAMPLES - n_train, N_FEATURES), torch.ones(N_SAMPLES - n_train, 1)),
            1)


def _synthetic_regression(seed: int) -> Split:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(N_SAMPLES, N_FEATURES, generator=generator)
    w_star = torch.randn(N_FEATURES, 1, generator=generator)
    b_star = torch.randn(1, generator=generator)
    y = x @ w_star + b_star + NOISE_STD * torch.randn(N_SAMPLES, 1, generator=generator)
    cut = _split_at(N_SAMPLES)  # the rows are i.i.d.: a fixed cut is a random split
    return (LinearRegressionDataset(x[:cut], y[:cut], w_star, b_star, NOISE_STD),
            LinearRegressionDataset(x[cut:], y[cut:], w_star, b_star, NOISE_STD), 1)


def _diabetes(seed: int) -> Split:
    from sklearn.datasets import load_diabetes  # lazy: scikit-learn costs ~1 s to import; one data set needs it
    features, target = load_diabetes(return_X_y=True, scaled=False)
    x = torch.as_tensor(features, dtype=torch.float32)
    y = torch.as_tensor(target, dtype=torch.float32).unsqueeze(1)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, test = order[:_split_at(len(x))], order[_split_at(len(x)):]
    x_mean, x_std = x[train].mean(0), x[train].std(0)
    y_mean, y_std = y[train].mean(0), y[train].std(0)

    def standardise(idx: Tensor) -> TensorDataset:
        return TensorDataset((x[idx] - x_mean) / x_std, (y[idx] - y_mean) / y_std)

    return standardise(train), standardise(test), 1


REGRESSION_DATASETS: dict[str, Callable[[int], Split]] = {
    "ones": _ones,
    "synthetic_regression": _synthetic_regression,
    "diabetes": _diabetes,
}


def generate_regressiondata(name: str, seed: int = 0) -> Split:
    """Load a regression data set by name (the seed's name for this function).

    Args:
        name: a key of ``REGRESSION_DATASETS``.
        seed: seed of the generated data / split.

    Returns:
        (train, test, target dimension); both splits are ``TensorDataset``s on the CPU.

    Raises:
        ValueError: unknown name.
    """
    if name not in REGRESSION_DATASETS:
        raise ValueError(f"unknown regression dataset {name!r}; valid: {sorted(REGRESSION_DATASETS)}")
    return REGRESSION_DATASETS[name](seed)
