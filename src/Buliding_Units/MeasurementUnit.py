"""Measurement plugins: classes listed in ``measurements/Units.txt`` and run on the measurement schedule (every
``measurement_sampling_rate`` rounds, at the ``measurement_rounds``, and once at the end of a run).

Interface: ``measure(frame) -> dict`` computes a JSON-able record; ``log_measurement(frame, record)`` appends it to
the unit's own log ``measurements/<ClassName>_<run id>.jsonl`` (one JSON object per line, with the round; the Hessian
units add the training samples so far), so parallel runs never share or overwrite a file; ``finish(frame)`` runs once
after the last measurement of a run. A unit's constructor takes keyword arguments only; ``Units.txt`` passes them as
``key=value`` (``- HessianBlockInteractionMeasurement tol=1e-3 max_steps=30``).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import nn

from src.Buliding_Units import hessian
from src.Buliding_Units.hessian_spectrum import check_curvature, curvature_spectrum, positive_int
from src.Buliding_Units import hessian_figures as hfig
from src.Buliding_Units import memory
from src.Buliding_Units.memory import model_bytes, optimizer_state_bytes  # noqa: F401 - public here since the seed
from src.plots import heatmap
from src.reporting import archive_existing, json_line


class MeasurementUnit(ABC):
    """Base class of measurement plugins.

    Subclasses implement :meth:`measure`; the base class owns the per-run log file. The log path is
    ``<frame.paths.measurements>/<ClassName>_<run id>.jsonl``; an existing log of the same run id is appended to
    only within one run (the first write of a run starts a new file, moving an older one aside).
    """

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
        remote = getattr(frame, "remote_memory", None)  # a multi-process engine: every rank's figures
        ranks = remote() if remote is not None else [memory.process_memory(frame)]
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


MEASUREMENT_MODES = ("eval", "train")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


class _HessianUnit(MeasurementUnit):
    """Shared plumbing of the Hessian units: one fixed batch, an explicit mode, a private copy of the model.

    The measurement runs on a deep copy of the centre model (cast to ``dtype``), so the model, its buffers and its
    gradients are exactly the same afterwards. ``mode="eval"`` (default) uses BatchNorm running statistics and
    disables dropout; ``"train"`` measures the batch-statistics Hessian (dropout is refused by the numerics).
    """

    norm_titles = hfig.NORM_TITLES  # the norm heat-maps' stems; titles by hfig.norm_title (curvature-aware)

    def __init__(self, batch_size: int = 256, mode: str = "eval", dtype: str = "float64", seed: int = 0) -> None:
        super().__init__()
        if mode not in MEASUREMENT_MODES:
            raise ValueError(f"unknown mode {mode!r}; valid: {list(MEASUREMENT_MODES)}")
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; valid: {sorted(DTYPES)}")
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size, self.mode, self.dtype, self.seed = int(batch_size), mode, dtype, seed

    def config(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "mode": self.mode, "dtype": self.dtype, "seed": self.seed}

    def _problem(self, frame: Any) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
        """A private model copy in the measurement mode and dtype, and the fixed batch (the same at every call)."""
        model = copy.deepcopy(frame.center_model).to(DTYPES[self.dtype])
        model.train(self.mode == "train")
        inputs, targets = frame.data.sample_batch("train", self.batch_size, self.seed)
        if inputs.is_floating_point():
            inputs = inputs.to(DTYPES[self.dtype])
        if targets.is_floating_point():
            targets = targets.to(DTYPES[self.dtype])
        return model, inputs, targets

    norm_range: list[float] | None = None  # the log-scale range of this run's norm heat-maps so far

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "norm_range": self.norm_range}

    def load_state_dict(self, state: dict[str, Any], frame: Any) -> None:
        super().load_state_dict(state, frame)
        self.norm_range = state.get("norm_range")

    def _figures(self, frame: Any, matrices: dict[str, Any], bound: dict[str, Any] | None = None,
                 index: int | None = None) -> list[str]:
        """Heat-maps of ``matrices`` (stem -> (matrix, title, colour-bar label)): a stem with "coupling" on the fixed
        [0, 1] scale with the diagonal masked, the others (norms) on the run's shared log range. ``bound``: the
        record's ``method``/``lower_bound``, for the subtitle."""
        folder = self.figure_folder(frame)
        labels = [f"{b}:{type(block).__name__}" for b, block in enumerate(frame.center_model.blocks)]
        subtitle = hfig.conditions(bound or {}, self.config(), frame.round)
        written = []
        for stem, (matrix, title, bar) in matrices.items():
            coupling = "coupling" in stem
            if not coupling:
                self.norm_range = hfig.grow_range(self.norm_range, matrix.tolist())
            try:
                paths = heatmap(matrix.numpy(), folder / f"{stem}_{self.count if index is None else index:03d}",
                                labels=labels, title=f"{title} ({frame.run_id})", colorbar_label=bar,
                                scale="coupling" if coupling else "log", mask_diagonal=coupling,
                                value_range=None if coupling else self.norm_range, subtitle=subtitle)
            except OSError as err:  # a figure that cannot be written is a warning, the numbers are still logged
                frame.log(f"Warning: {type(self).__name__} could not write {stem}: {err}")
                continue
            written += [str(p) for p in paths]
        return written

    @staticmethod
    def figure_folder(frame: Any) -> Path:
        """``figures/Measurements/Hessian_Measurement/<run id>/``."""
        return frame.paths.figures / "Measurements" / "Hessian_Measurement" / frame.run_id

    def log_measurement(self, frame: Any, record: Any) -> None:
        """Log the record with the training samples so far and its coupling summary (max, mean, top pairs), then
        redraw ``coupling_over_training``."""
        if not isinstance(record, dict):
            super().log_measurement(frame, record)
            return
        fields = {"samples": None if record.get("measure_only") else frame.samples, **record}
        if record.get("norms") is not None:
            fields["norm_range"] = self.norm_range  # the log range its heat-map was drawn on
        if record.get("coupling") is None:
            super().log_measurement(frame, fields)
            return
        super().log_measurement(frame, {**fields, **hfig.coupling_summary(record["coupling"])})
        records = [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]
        data = hfig.coupling_over_training(records, frame.history)
        try:
            hfig.draw_coupling_over_training(data, self.figure_folder(frame) / "coupling_over_training",
                                             title=f"block coupling over training ({frame.run_id})")
        except OSError as err:
            frame.log(f"Warning: {type(self).__name__} could not write coupling_over_training: {err}")

    def finish(self, frame: Any) -> None:
        """Redraw this run's norm heat-maps on the final shared range (earlier ones were drawn on the range then)."""
        if self.log_path is None or not self.log_path.exists() or self.norm_range is None:
            return
        for record in (json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()):
            drawn = [Path(f).stem.rsplit("_", 1) for f in record.get("figures", []) if f.endswith(".png")]
            drawn = [(stem, int(number)) for stem, number in drawn if stem in self.norm_titles]
            if record.get("norms") is None or record.get("norm_range") == self.norm_range:
                continue  # drawn on the final range already
            round_now, frame.round = frame.round, record["round"]
            try:
                for stem, index in drawn:
                    self._figures(frame, {stem: (torch.tensor(record["norms"], dtype=torch.float64),
                                                 *hfig.norm_title(stem, getattr(self, "curvature", "hessian")))},
                                   record, index)
            finally:
                frame.round = round_now


class Hessian_measurement(_HessianUnit):
    """Brute-force Hessian: central finite differences of the gradient in float64, then exact block norms.

    Measures S_ij = sigma_max(H_ij) and S_ii = max|lambda|(H_ii) from the full N x N matrix. Cost: 2N gradient
    evaluations and N^2 memory, so it refuses models above ``max_params`` (checked before training). Float32 finite
    differences are only good to ~1e-5, hence float64. Writes ``measurements/Hessian_measurement_<run id>.jsonl`` and
    ``figures/Measurements/Hessian_Measurement/<run id>/fd_block_norms_heatmap_NNN.{pdf,png}``.
    """

    def __init__(self, max_params: int = 5000, eps: float = 1e-5, batch_size: int = 256, mode: str = "eval",
                 seed: int = 0) -> None:
        super().__init__(batch_size=batch_size, mode=mode, dtype="float64", seed=seed)
        self.max_params, self.eps = int(max_params), float(eps)

    def config(self) -> dict[str, Any]:
        return {"max_params": self.max_params, "eps": self.eps, **super().config()}

    def prepare(self, frame: Any) -> None:
        n = sum(p.numel() for p in frame.center_model.parameters())
        if n > self.max_params:
            raise ValueError(f"Hessian_measurement forms the full Hessian and refuses models above "
                             f"max_params={self.max_params}; this model has {n} parameters (use "
                             f"HessianBlockInteractionMeasurement, or raise max_params)")

    def measure(self, frame: Any) -> dict[str, Any]:
        start = time.perf_counter()
        model, inputs, targets = self._problem(frame)
        H = hessian.finite_difference_hessian(model, frame.criterion, inputs, targets, eps=self.eps,
                                              max_params=self.max_params)
        sizes = hessian.block_sizes(model)
        norms = hessian.block_spectral_norms(H, sizes)
        figures = self._figures(frame, {"fd_block_norms_heatmap": (norms, *hfig.norm_title("fd_block_norms_heatmap"))},
                                {"method": "finite_difference"})
        return {"method": "finite_difference", "n_params": sum(sizes), "block_sizes": sizes,
                "norms": norms.tolist(), "wall_time": time.perf_counter() - start, "figures": figures}


class HessianBlockInteractionMeasurement(_HessianUnit):
    """Interaction of every pair of blocks through the loss Hessian, without forming the Hessian.

    Off the diagonal S_ij = sigma_max(H_ij); on it S_ii = max|lambda|(H_ii); also the scale-free coupling
    C_ij = S_ij / sqrt(S_ii S_jj). Batched Golub-Kahan / Lanczos with pooled Rayleigh-Ritz: every Krylov entry is a
    certified lower bound, stopping at relative tolerance ``tol`` (``max_steps`` cap); tiny models get the exact
    dense Hessian instead when that costs fewer products (``method="auto"``). ``converged`` per entry: a singular value
    of the block lies within ``tol`` (relative) of the estimate (residual bound, logged as ``residual``).
    ``curvature="ggn"`` measures the Gauss-Newton matrix instead of the Hessian. Cost: about 4 x rounds
    Hessian-vector products per pair, batched; see the README benchmark. Writes the raw matrix in full, the
    coupling, the products spent and per-pair convergence to
    ``measurements/HessianBlockInteractionMeasurement_<run id>.jsonl`` and heat-maps
    ``block_offdiag_eig_heatmap_NNN`` (raw) and ``block_coupling_heatmap_NNN`` under
    ``figures/Measurements/Hessian_Measurement/<run id>/`` (PDF and PNG).
    """

    def __init__(self, tol: float = 1e-2, max_steps: int = 50, method: str = "auto", memory_budget_mb: float = 256,
                 batch_size: int = 256, mode: str = "eval", dtype: str = "float64", seed: int = 0,
                 curvature: str = "hessian") -> None:
        super().__init__(batch_size=batch_size, mode=mode, dtype=dtype, seed=seed)
        if not 0 < tol < float("inf") or int(max_steps) != max_steps or max_steps < 1:
            raise ValueError(f"need a finite tol > 0 and an integer max_steps >= 1, got tol={tol}, max_steps={max_steps}")
        if method not in ("auto", "dense", "krylov"):
            raise ValueError(f"unknown method {method!r}; valid: ['auto', 'dense', 'krylov']")
        check_curvature(curvature)
        self.tol, self.max_steps, self.method, self.memory_budget_mb = float(tol), int(max_steps), method, \
            float(memory_budget_mb)
        self.curvature = curvature

    def config(self) -> dict[str, Any]:
        return {"tol": self.tol, "max_steps": self.max_steps, "method": self.method,
                "memory_budget_mb": self.memory_budget_mb, **super().config(), "curvature": self.curvature}

    def measure(self, frame: Any) -> dict[str, Any]:
        model, inputs, targets = self._problem(frame)
        norms, info = hessian.block_interaction_norms(
            model, frame.criterion, inputs, targets, tol=self.tol, seed=self.seed, max_steps=self.max_steps,
            memory_budget_mb=self.memory_budget_mb, method=self.method, return_info=True, curvature=self.curvature)
        coupling = hessian.normalised_coupling(norms)
        figures = self._figures(frame, {
            "block_offdiag_eig_heatmap": (norms, *hfig.norm_title("block_offdiag_eig_heatmap", self.curvature)),
            "block_coupling_heatmap": (coupling, "coupling $S_{ij}/\\sqrt{S_{ii}S_{jj}}$", "coupling")},
            {"method": info.method, "lower_bound": info.lower_bound})
        return {"method": info.method, "curvature": self.curvature, "hvps": info.hvps, "batched_calls": info.calls,
                "wall_time": info.wall_time, "lower_bound": info.lower_bound,
                "block_sizes": hessian.block_sizes(model), "norms": norms.tolist(),
                "coupling": [[None if v != v else v for v in row] for row in coupling.tolist()],
                "steps": info.steps.tolist(), "converged": info.converged.tolist(), "tol": self.tol,
                "residual": info.residual.tolist(),
                "figures": figures}


class HessianSpectrumMeasurement(_HessianUnit):
    """Global curvature beside the block picture: the top-k eigenvalues and the trace of the whole Hessian, and
    each diagonal block's largest eigenvalue and trace, in one record.

    Block Lanczos on batched Hessian-vector products (residual test at relative ``tol``, ``max_steps`` cap) and
    Hutchinson's trace estimate with ``trace_probes`` Rademacher probes and its standard error; see
    ``hessian_spectrum``. ``curvature="ggn"`` measures the Gauss-Newton matrix. Cost: (k + 1 + 2B) products per
    Lanczos round plus ``trace_probes``, batched. Writes ``measurements/HessianSpectrumMeasurement_<run id>.jsonl``.
    """

    def __init__(self, k: int = 3, tol: float = 1e-3, max_steps: int = 100, trace_probes: int = 64,
                 curvature: str = "hessian", memory_budget_mb: float = 256, batch_size: int = 256,
                 mode: str = "eval", dtype: str = "float64", seed: int = 0) -> None:
        super().__init__(batch_size=batch_size, mode=mode, dtype=dtype, seed=seed)
        if not 0 < tol < float("inf") or memory_budget_mb <= 0:
            raise ValueError(f"need a finite tol > 0 and memory_budget_mb > 0, got tol={tol}, "
                             f"memory_budget_mb={memory_budget_mb}")
        check_curvature(curvature)
        self.k, self.max_steps = positive_int("k", k), positive_int("max_steps", max_steps)
        self.trace_probes = positive_int("trace_probes", trace_probes, least=2)
        self.tol, self.curvature, self.memory_budget_mb = float(tol), curvature, float(memory_budget_mb)

    def config(self) -> dict[str, Any]:
        return {"k": self.k, "tol": self.tol, "max_steps": self.max_steps, "trace_probes": self.trace_probes,
                "curvature": self.curvature, "memory_budget_mb": self.memory_budget_mb, **super().config()}

    def measure(self, frame: Any) -> dict[str, Any]:
        start = time.perf_counter()
        model, inputs, targets = self._problem(frame)
        result = curvature_spectrum(model, frame.criterion, inputs, targets, k=self.k, tol=self.tol,
                                    max_steps=self.max_steps, trace_probes=self.trace_probes, seed=self.seed,
                                    memory_budget_mb=self.memory_budget_mb, curvature=self.curvature)
        record = {"curvature": self.curvature, "dtype": self.dtype, "mode": self.mode, "batch_samples": len(inputs),
                  "tol": self.tol, "block_sizes": hessian.block_sizes(model), **dataclasses.asdict(result)}
        record["batched_calls"] = record.pop("calls")
        return {**record, "wall_time": time.perf_counter() - start}
