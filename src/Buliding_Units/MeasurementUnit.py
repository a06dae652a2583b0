"""Measurement plugins: classes listed in ``measurements/Units.txt`` and run every ``measurement_sampling_rate``
rounds and once at the end of a run.

Interface: ``measure(frame) -> dict`` computes a JSON-able record; ``log_measurement(frame, record)`` appends it to
the unit's own log ``measurements/<ClassName>_<run id>.jsonl`` (one JSON object per line), so parallel runs never
share or overwrite a file. A unit's constructor takes keyword arguments only; ``Units.txt`` passes them as
``key=value`` (``- HessianBlockInteractionMeasurement tol=1e-3 max_steps=30``).
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import nn


class MeasurementUnit(ABC):
    """Base class of measurement plugins.

    Subclasses implement :meth:`measure`; the base class owns the per-run log file. The log path is
    ``<frame.paths.measurements>/<ClassName>_<run id>.jsonl``; an existing log of the same run id is appended to
    only within one run (the first write of a run starts a new file, moving an older one aside).
    """

    def __init__(self) -> None:
        self.log_path: Path | None = None
        self.count = 0

    @abstractmethod
    def measure(self, frame: Any) -> dict[str, Any]:
        """Compute the measurement on ``frame`` (must not change the model) and return a JSON-able dict."""

    def config(self) -> dict[str, Any]:
        """The constructor arguments, for the report."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config().items())})"

    def _open(self, frame: Any) -> Path:
        from src.utils import _archive
        frame.paths.measurements.mkdir(parents=True, exist_ok=True)
        path = frame.paths.measurements / f"{type(self).__name__}_{frame.run_id}.jsonl"
        _archive(path)
        return path

    def log_measurement(self, frame: Any, record: dict[str, Any]) -> None:
        """Append ``record`` (with the round) as one JSON line to this unit's per-run log."""
        if self.log_path is None:
            self.log_path = self._open(frame)
        with open(self.log_path, "a") as f:
            f.write(json.dumps({"round": frame.round, **record}, default=float) + "\n")
        self.count += 1


def _tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def optimizer_state_bytes(optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes of every tensor in an optimiser's state dict (Adam: exp_avg, exp_avg_sq, step)."""
    if optimizer is None:
        return 0
    return sum(_tensor_bytes(state.values()) for state in optimizer.state.values())


def model_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of a model's parameters, buffers and gradients."""
    return {"parameters": _tensor_bytes(model.parameters()), "buffers": _tensor_bytes(model.buffers()),
            "gradients": _tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)}


class Working_memory_usage(MeasurementUnit):
    """Working memory of the run: parameters, buffers, gradients and optimiser state, in MB.

    Counts the centre model with its optimiser (entire mode) and every per-block copy with its block optimiser
    (block-wise modes), each tensor's ``numel × element_size``; on CUDA also the peak allocated memory. Cost:
    negligible (walks the tensors, no computation). Writes ``measurements/Working_memory_usage_<run id>.jsonl``.
    """

    def measure(self, frame: Any) -> dict[str, Any]:
        mb = 1024.0 ** 2
        centre = model_bytes(frame.center_model)
        centre["optimizer_state"] = optimizer_state_bytes(getattr(frame, "optimizer", None))
        copies = {"parameters": 0, "buffers": 0, "gradients": 0, "optimizer_state": 0}
        for b, replica in getattr(frame, "distributed_models", {}).items():
            for key, value in model_bytes(replica).items():
                copies[key] += value
            copies["optimizer_state"] += optimizer_state_bytes(frame.block_optimizers[b])
        record = {"center_MB": {k: v / mb for k, v in centre.items()},
                  "copies_MB": {k: v / mb for k, v in copies.items()},
                  "n_copies": len(getattr(frame, "distributed_models", {})),
                  "total_MB": (sum(centre.values()) + sum(copies.values())) / mb}
        if frame.device.type == "cuda":
            record["cuda_peak_allocated_MB"] = torch.cuda.max_memory_allocated(frame.device) / mb
        return record
