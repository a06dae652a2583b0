"""Measurement plugins: classes listed in ``measurements/Units.txt`` and run on the measurement schedule (every
``measurement_sampling_rate`` rounds, at the ``measurement_rounds``, and once at the end of a run).

Interface: ``measure(frame) -> dict`` computes a JSON-able record; ``log_measurement(frame, record)`` appends it to
the unit's own log ``measurements/<ClassName>_<run id>.jsonl`` (one JSON object per line, with the round; the Hessian
units add the training samples so far), so parallel runs never share or overwrite a file; ``finish(frame)`` runs once
after the last measurement of a run. A unit's constructor takes keyword arguments only; ``Units.txt`` passes them as
``key=value`` (``- HessianBlockInteractionMeasurement tol=1e-3 max_steps=30``).
"""
from __future__ import annotations

import importlib
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

from src.Buliding_Units import memory
from src.Buliding_Units.memory import model_bytes, optimizer_state_bytes  # noqa: F401 - public here
from src.reporting import archive_existing, json_line


class MeasurementUnit(ABC):
    """Base class of measurement plugins.

    Subclasses implement :meth:`measure`; the base class owns the per-run log file. The log path is
    ``<frame.paths.measurements>/<ClassName>_<run id>.jsonl``; an existing log of the same run id is appended to
    only within one run (the first write of a run starts a new file, moving an older one aside).
    """

    plugin_kind = "measure"  # how the frame factory files it: measure_units, stopper_units or schedule_units

    # class-level defaults, so a subclass whose __init__ does not call super().__init__() still works
    log_path: Path | None = None
    count: int = 0

    @abstractmethod
    def measure(self, frame: Any) -> dict[str, Any]:
        """Compute the measurement on ``frame`` (must not change the model) and return a JSON-able dict."""

    def prepare(self, frame: Any) -> None:
        """Check, before training starts, that the unit can measure this frame; raise ValueError if not."""

    def finish(self, frame: Any) -> None:
        """Run once after the last measurement of a run (e.g. redraw figures on a run-wide scale)."""

    def config(self) -> dict[str, Any]:
        """The constructor arguments, for the report."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: the number of measurements so far and the log's file name."""
        return {"count": self.count, "log_name": self.log_path.name if self.log_path is not None else None}

    def load_state_dict(self, state: dict[str, Any], frame: Any) -> None:
        """Continue after a resume: the same numbering, appending to the same log without the records of rounds
        after the checkpoint (an interrupted attempt may have written some)."""
        self.count = state["count"]
        if state["log_name"] is None:
            return
        self.log_path = frame.paths.measurements / state["log_name"]
        if self.log_path.exists():
            kept = [line for line in self.log_path.read_text().splitlines(keepends=True)
                    if line.strip() and json.loads(line).get("round", 0) <= frame.round]
            self.log_path.write_text("".join(kept))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config().items())})"

    def _open(self, frame: Any) -> Path:
        frame.paths.measurements.mkdir(parents=True, exist_ok=True)
        path = frame.paths.measurements / f"{type(self).__name__}_{frame.run_id}.jsonl"
        archive_existing(path)
        return path

    def log_measurement(self, frame: Any, record: Any) -> None:
        """Append ``record`` (with the round) as one JSON line to this unit's per-run log.

        A dict is logged as its keys; any other value (a number, a list) under ``"value"``.
        """
        if self.log_path is None:
            self.log_path = self._open(frame)
        fields = record if isinstance(record, dict) else {} if record is None else {"value": record}
        with open(self.log_path, "a") as f:
            f.write(json_line({"round": frame.round, **fields}))
        self.count += 1


MB = 1024.0 ** 2


class Working_memory_usage(MeasurementUnit):
    """Working memory of the run, in MB: parameters, buffers, gradients, optimiser state, and the activations autograd
    saves — the part block-local steps reduce.

    Counts the centre model with its optimiser (entire mode) and every per-block copy with its block optimiser
    (block-wise modes), each tensor's ``numel × element_size``. In the multi-process engine every rank answers
    for itself (its centre, its copies, its scratch blocks), the record's totals sum the ranks and ``per_rank``
    lists them. ``autograd_saved_MB``: the bytes autograd saves for backward in one full step and in each
    block-local step (only that block trainable) on a training batch of the run's batch size, without parameters,
    buffers and the batch itself (``autograd=False`` skips it). ``cpu_peak_rss_MB``: the peak resident memory of
    each process so far (``getrusage``; it never resets). On CUDA ``cuda_peak_allocated_MB`` and
    ``cuda_peak_reserved_MB`` are the peaks since the previous measurement (reset after each). Cost: B + 1 forward
    passes for the activations; the rest walks the tensors. Writes ``measurements/Working_memory_usage_<run id>.jsonl``.
    """

    def __init__(self, autograd: bool = True) -> None:
        super().__init__()
        self.autograd = bool(autograd)

    def config(self) -> dict[str, Any]:
        return {"autograd": self.autograd}

    def measure(self, frame: Any) -> dict[str, Any]:
        remote = frame.engine.ranks_memory() if frame.engine is not None else None  # a multi-process engine's ranks
        ranks = remote if remote is not None else [memory.process_memory(frame)]
        centre = {k: sum(r["center"][k] for r in ranks) for k in ranks[0]["center"]}
        copies = {k: sum(r["copies"][k] for r in ranks) for k in ranks[0]["copies"]}
        scratch = sum(r["scratch"] for r in ranks)
        record = {"center_MB": {k: v / MB for k, v in centre.items()},
                  "copies_MB": {k: v / MB for k, v in copies.items()},
                  "n_copies": sum(r["n_copies"] for r in ranks), "scratch_MB": scratch / MB,
                  "total_MB": (sum(centre.values()) + sum(copies.values()) + scratch) / MB,
                  "cpu_peak_rss_MB": sum(r["cpu_peak_rss"] for r in ranks) / MB}
        for key in ("cuda_peak_allocated", "cuda_peak_reserved"):
            if key in ranks[0]:
                record[f"{key}_MB"] = sum(r[key] for r in ranks) / MB
        if remote is not None:
            record["per_rank"] = [memory.rank_record(rank, r) for rank, r in enumerate(ranks)]
        if self.autograd:
            record["autograd_saved_MB"] = self._activations(frame)
        return record

    @staticmethod
    def _activations(frame: Any) -> dict[str, Any]:
        batch = getattr(getattr(frame, "train_batches", None), "batch_size", None) or frame.H["batch_size"] or 1
        inputs, targets = frame.data.sample_batch("train", batch, 0)
        saved = memory.step_activation_bytes(frame.center_model, frame.criterion, inputs, targets)
        if frame.device.type == "cuda":  # the probe's own peak belongs to no training interval
            torch.cuda.reset_peak_memory_stats(frame.device)
        return {"batch_size": len(targets), "full_step": saved["full_step"] / MB,
                "block_steps": [b / MB for b in saved["block_steps"]], "block_step_max": max(saved["block_steps"]) / MB}


# Units of the Hessian wing (``src/Buliding_Units/hessian/units.py``): known here by name, imported on first use.
WING_UNITS = {name: "src.Buliding_Units.hessian.units" for name in (
    "Hessian_measurement", "HessianBlockInteractionMeasurement", "HessianSpectrumMeasurement",
    "BlockSpectrumDensity")}


def __getattr__(name: str) -> Any:
    """``from src.Buliding_Units.MeasurementUnit import HessianBlockInteractionMeasurement`` loads the Hessian wing."""
    if name in WING_UNITS:
        return getattr(importlib.import_module(WING_UNITS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
