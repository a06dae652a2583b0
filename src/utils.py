"""Seeds and determinism, free memory, and the seed README's utility names in one place.

The utilities live in one module per concern on the ground floor: the command line in :mod:`src.cli`, block copies
in :mod:`src.blocks`, the batch-size probe in :mod:`src.batch_probe`, the Reporter in :mod:`src.reporting`. Their
seed names are importable from here (``from src.utils import Reporter, copy_block``), each module loaded on first use.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import random
from typing import Any, Iterator

import numpy as np
import torch

_SEED_NAMES = {  # the seed README's utils table: name -> the module that holds it
    "Reporter": "src.reporting", "get_max_batch_size": "src.batch_probe", "copy_block": "src.blocks",
    "copy_model": "src.blocks", "parse_arguments": "src.cli", "ConfigError": "src.cli",
    "generate_data": "src.Data.images", "parse_measurement_units": "src.Buliding_Units.plugins"}


def __getattr__(name: str) -> Any:
    if name in _SEED_NAMES:
        return getattr(importlib.import_module(_SEED_NAMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def set_seed(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (CUDA included)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def set_deterministic() -> None:
    """PyTorch's deterministic algorithms (an error where none exists) and cuDNN's deterministic mode."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for deterministic matmuls
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False


@contextlib.contextmanager
def deterministic_kept() -> Iterator[None]:
    """Restore the process's deterministic settings (:func:`set_deterministic`'s, ``CUBLAS_WORKSPACE_CONFIG``
    included) on leaving the block: a run in a notebook must not change how the notebook's next run computes."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2:]
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = workspace


def available_host_bytes() -> int:
    """Memory the OS can give this process now (Linux: MemAvailable), in bytes."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
