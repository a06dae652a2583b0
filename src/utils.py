"""Seeds, plus the seed README's utility names in one place.

The utilities live in one module per concern, all on the ground floor (they import nothing of the project above
them): the command line in :mod:`src.cli`, block copies in :mod:`src.blocks`, the batch-size probe in
:mod:`src.batch_probe`, the Reporter and run files in :mod:`src.reporting`. The ``Units.txt`` parser lives next to
the plugins it builds, a floor up: :func:`src.Buliding_Units.plugins.parse_measurement_units`.
"""
from __future__ import annotations

import contextlib
import os
import random
from typing import Iterator

import numpy as np
import torch

from src.batch_probe import get_max_batch_size
from src.blocks import block_tensors, copy_block, copy_model
from src.cli import ConfigError, key_comments, parse_arguments
from src.reporting import PROJECT_ROOT, Reporter, archive_existing, git_commit, read_report, run_id

__all__ = ["PROJECT_ROOT", "ConfigError", "Reporter", "archive_existing", "block_tensors", "copy_block", "copy_model",
           "get_max_batch_size", "git_commit", "key_comments", "parse_arguments", "read_report", "run_id",
           "deterministic_kept", "set_deterministic", "set_seed"]


def set_deterministic() -> None:
    """PyTorch's deterministic algorithms (an error where none exists) and cuDNN's deterministic mode."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for deterministic matmuls
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False


@contextlib.contextmanager
def deterministic_kept() -> Iterator[None]:
    """Restore the process's deterministic settings (:func:`set_deterministic`'s) on leaving the block: a run in a
    notebook's process must not change how the notebook's next run computes."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2:]


def set_seed(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (CUDA included)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
