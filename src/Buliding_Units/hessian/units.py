"""The Hessian measurement units: the brute-force Hessian, all-pairs block interactions, the curvature spectrum and
the per-block spectral densities.

Each runs on a private float64 copy of the centre model on one fixed batch, in an explicit mode (eval by default),
and writes its records to ``measurements/<Unit>_<run id>.jsonl`` and its heat-maps under
``figures/Measurements/Hessian_Measurement/<run id>/``. The numerics are the pure functions of this package.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from src.Buliding_Units.MeasurementUnit import MeasurementUnit
from src.Buliding_Units.hessian import figures as hfig
from src.Buliding_Units.hessian import interaction as hessian
from src.Buliding_Units.hessian.density import (block_slq, check_normalisation, lambda_extremes,
                                                min_grid_points, positive_float, spectral_densities, trace_estimates)
from src.Buliding_Units.hessian.figures import heatmap
from src.Buliding_Units.hessian.products import FlatLoss, check_deterministic, make_batched_hvp
from src.Buliding_Units.hessian.spectrum import check_curvature, curvature_spectrum, positive_int


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
        """A private model copy in the measurement mode and dtype, and the fixed batch (the same at every call).

        ``batch_size`` counts predictions: for a language model (a sequence of targets per sample) the batch holds
        ``batch_size // context`` whole sequences (at least one), so a measurement costs about the same per
        prediction on every task."""
        model = copy.deepcopy(frame.center_model).to(DTYPES[self.dtype])
        model.train(self.mode == "train")
        one = frame.data.sample_batch("train", 1, self.seed)[1][0]
        per_sample = one.numel() if not one.is_floating_point() else 1  # class labels: one per position
        inputs, targets = frame.data.sample_batch("train", max(1, self.batch_size // per_sample), self.seed)
        if inputs.is_floating_point():
            inputs = inputs.to(DTYPES[self.dtype])
        if targets.is_floating_point():
            targets = targets.to(DTYPES[self.dtype])
        return model, inputs, targets

    norm_range: list[float] | None = None  # the log-scale range of this run's norm heat-maps so far
    figure_suffix = ""  # "_measure_only" for a --measure_only measurement: it never replaces a training one's figures

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
                name = f"{stem}_{frame.round if index is None else index:03d}{self.figure_suffix}"
                paths = heatmap(matrix.numpy(), folder / name,
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


class BlockSpectrumDensity(_HessianUnit):
    """Each block's Hessian spectrum, and how different the blocks' spectra are (block heterogeneity, JS₀).

    For every block b the spectral density of the diagonal block H_bb (G_bb with ``curvature="ggn"``) by stochastic
    Lanczos quadrature (``hessian.density``): ``probes`` Rademacher starts per block (seeded by ``seed``),
    m = ``lanczos_steps`` Lanczos steps with full reorthogonalisation (capped by the block's size m_b = min(m, n_b)),
    Gauss quadrature nodes (Ritz values) and weights per probe. Every block's probes go through one batched HVP per
    step: a measurement spends P·Σ_b m_b products in max_b m_b batched calls (one block and probe at a time would make
    P·Σ_b m_b calls). Memory: the Lanczos bases hold P·Σ_b m_b·n_b ≤ P·m·N numbers; ``prepare`` refuses a model
    whose bases exceed ``max_basis_mb`` before training starts.

    Design choices:

    * **Normalisation** (``js_normalisation``, recorded in each record): the default ``"spectral_radius"`` divides
      each block's Ritz values by that block's spectral-radius estimate max|θ| before broadening, so densities and
      JS distances compare the *shapes* of the spectra (x = λ/s_b ∈ [−1, 1]); block scales differ by orders of
      magnitude (the head against the first layer) and would otherwise dominate the distance. ``"common"`` divides
      every block by one scale (the largest spectral radius), keeping relative sizes. The paper's plots divide by the
      10th largest eigenvalue; that value is not offered: SLQ gives it only through an interior Ritz value that
      m steps need not converge, a block with fewer than 10 parameters has none, and it can be ≤ 0. The spectral
      radius is the extremal Ritz value, the one Lanczos converges first, defined for every block. A block with a
      zero spectrum keeps scale 1 (a point mass at 0).
    * **Grid**: one grid per measurement, common to every block, spanning all blocks' normalised Ritz values plus
      5σ each side, ``grid_points`` points; σ (``sigma``) is in normalised units, and ``grid_points`` must resolve
      it (spacing ≤ σ/2 over the widest possible span; checked when the unit is built).
    * **Weights**: each probe's weights sum to 1 (they are squared first components of an orthogonal matrix);
      the density averages the probes and is rescaled to integrate to 1 on the grid (trapezoid rule).
    * **JS₀** (``js0``): the mean over pairs i < j of the Jensen–Shannon distance between blocks' densities as
      discrete distributions on the grid, √JSD with base-2 logarithms, so in [0, 1]: 0 for identical spectra, 1 for
      disjoint ones. ``js_matrix`` holds all pairs. Blocks without parameters are left out (None).
    * Mode and model: a private float64 copy in eval mode by default (BatchNorm running statistics, no dropout); a
      random forward pass (dropout in ``mode="train"``) is refused in ``prepare`` (``check_deterministic``).

    Writes ``measurements/BlockSpectrumDensity_<run id>.jsonl`` and, under
    ``figures/Measurements/Hessian_Measurement/<run id>/``, ``block_density_RRR`` (all blocks' densities,
    log density axis) and ``block_js_heatmap_RRR`` (the JS distance matrix) per measurement, named by the
    round measured (a second measurement of the same round redraws them), and ``js0_over_training`` redrawn after
    each measurement. See docs/block_spectra.md.
    """

    def __init__(self, *, probes: int = 8, lanczos_steps: int = 40, sigma: float = 0.01, grid_points: int = 1000,
                 js_normalisation: str = "spectral_radius", curvature: str = "hessian", memory_budget_mb: float = 256,
                 max_basis_mb: float = 2048, batch_size: int = 256, mode: str = "eval", dtype: str = "float64",
                 seed: int = 0) -> None:
        super().__init__(batch_size=batch_size, mode=mode, dtype=dtype, seed=seed)
        self.probes, self.lanczos_steps = positive_int("probes", probes), positive_int("lanczos_steps", lanczos_steps)
        self.sigma = positive_float("sigma", sigma)
        self.grid_points = positive_int("grid_points", grid_points)
        if self.grid_points < min_grid_points(self.sigma):
            raise ValueError(f"grid_points={grid_points} cannot resolve sigma={sigma:g}: need grid_points >= "
                             f"{min_grid_points(self.sigma)}, or a larger sigma")
        check_normalisation(js_normalisation)
        check_curvature(curvature)
        self.memory_budget_mb = positive_float("memory_budget_mb", memory_budget_mb)
        self.max_basis_mb = positive_float("max_basis_mb", max_basis_mb)
        self.js_normalisation, self.curvature = js_normalisation, curvature

    def config(self) -> dict[str, Any]:
        return {"probes": self.probes, "lanczos_steps": self.lanczos_steps, "sigma": self.sigma,
                "grid_points": self.grid_points, "js_normalisation": self.js_normalisation,
                "curvature": self.curvature, "memory_budget_mb": self.memory_budget_mb,
                "max_basis_mb": self.max_basis_mb, **super().config()}

    def prepare(self, frame: Any) -> None:
        """Refuse, before training, bases over ``max_basis_mb`` and a random forward pass."""
        sizes = hessian.block_sizes(frame.center_model)
        numbers = self.probes * sum(min(self.lanczos_steps, n) * n for n in sizes)
        mb = numbers * torch.finfo(DTYPES[self.dtype]).bits / 8 / 2**20
        if mb > self.max_basis_mb:
            raise ValueError(f"BlockSpectrumDensity keeps every Lanczos vector (full reorthogonalisation): "
                             f"probes x steps x block sizes = {numbers} numbers, {mb:.0f} MB in {self.dtype}, above "
                             f"max_basis_mb={self.max_basis_mb:g}; lower probes or lanczos_steps, or raise "
                             "max_basis_mb")
        model, inputs, targets = self._problem(frame)
        check_deterministic(FlatLoss(model, frame.criterion, inputs, targets))

    def measure(self, frame: Any) -> dict[str, Any]:
        start = time.perf_counter()
        model, inputs, targets = self._problem(frame)
        hvp = make_batched_hvp(model, frame.criterion, inputs, targets, self.memory_budget_mb, self.curvature)
        slq = block_slq(hvp, hvp.block_sizes, probes=self.probes, steps=self.lanczos_steps, seed=self.seed)
        dens = spectral_densities(slq, sigma=self.sigma, grid_points=self.grid_points,
                                  normalisation=self.js_normalisation)
        labels = [f"{b}:{type(block).__name__}" for b, block in enumerate(frame.center_model.blocks)]
        traces, extremes = trace_estimates(slq), lambda_extremes(slq)
        record = {
            "curvature": self.curvature, "dtype": self.dtype, "mode": self.mode, "batch_samples": len(inputs),
            "probes": self.probes, "lanczos_steps": self.lanczos_steps, "steps": slq.steps,
            "block_sizes": slq.block_sizes, "block_labels": labels,
            "hvps": slq.hvps, "batched_calls": slq.calls,
            "ritz_values": [None if v is None else v.tolist() for v in slq.ritz_values],
            "ritz_weights": [None if w is None else w.tolist() for w in slq.ritz_weights],
            "lambda_max": [None if e is None else e[1] for e in extremes],
            "lambda_min": [None if e is None else e[0] for e in extremes],
            "trace": [None if t is None else t[0] for t in traces],
            "trace_se": [None if t is None else t[1] for t in traces],
            "sigma": self.sigma, "js_normalisation": self.js_normalisation,
            "js_definition": "Jensen-Shannon distance sqrt(JSD), base-2 logarithms, in [0, 1], between the blocks' "
                             "densities as discrete distributions on density_grid",
            "scale": dens.scales, "density_grid": dens.grid.tolist(),
            "density": [None if d is None else d.tolist() for d in dens.densities],
            "js_matrix": [[None if v != v else v for v in row] for row in dens.js.tolist()], "js0": dens.js0,
            "js0_floor": dens.js_floor}  # two halves of the probes of one block apart: JS0 below it is noise
        record["figures"] = self._density_figures(frame, record)
        return {**record, "wall_time": time.perf_counter() - start}

    def _density_figures(self, frame: Any, record: dict[str, Any]) -> list[str]:
        folder = self.figure_folder(frame)
        xlabel = ("$\\lambda / \\rho(H_{bb})$ (each block by its spectral radius)"
                  if self.js_normalisation == "spectral_radius"
                  else "$\\lambda / \\max_b \\rho(H_{bb})$ (one common scale)")
        if self.curvature == "ggn":
            xlabel = xlabel.replace("H_{bb}", "G_{bb}")
        js0 = "n/a" if record["js0"] is None else f"{record['js0']:.3f}"
        subtitle = (f"{self.curvature}, {self.probes} probes, {self.lanczos_steps} steps, sigma {self.sigma:g}, "
                    f"{record['batch_samples']} samples, {self.mode} mode, {self.dtype}, round {frame.round}")
        stem = f"{frame.round:03d}{self.figure_suffix}"
        written = []
        try:
            written += hfig.draw_block_densities(
                record["density_grid"], record["density"], record["block_labels"],
                folder / f"block_density_{stem}", title=f"block spectral densities, JS$_0$ = {js0} ({frame.run_id})",
                subtitle=subtitle, xlabel=xlabel)
            js = [[math.nan if v is None else v for v in row] for row in record["js_matrix"]]
            written += heatmap(torch.tensor(js, dtype=torch.float64).numpy(),
                               folder / f"block_js_heatmap_{stem}", labels=record["block_labels"],
                               title=f"JS distance between block spectra ({frame.run_id})",
                               colorbar_label="JS distance (base 2)", scale="coupling", mask_diagonal=True,
                               subtitle=f"{self.js_normalisation} normalisation, sigma {self.sigma:g}, "
                                        f"{self.curvature}, round {frame.round}")
        except OSError as err:  # a figure that cannot be written is a warning, the numbers are still logged
            frame.log(f"Warning: BlockSpectrumDensity could not write its figures: {err}")
        return [str(p) for p in written]

    def log_measurement(self, frame: Any, record: Any) -> None:
        """Log the record (with the training samples so far), then redraw ``js0_over_training``."""
        super().log_measurement(frame, record)
        if not isinstance(record, dict) or self.log_path is None:
            return
        records = [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]
        data = hfig.js0_over_training(records, frame.history)
        if not data["rounds"]:
            return
        try:
            hfig.draw_js0_over_training(data, self.figure_folder(frame) / "js0_over_training",
                                        title=f"block heterogeneity JS$_0$ over training ({frame.run_id})")
        except OSError as err:
            frame.log(f"Warning: BlockSpectrumDensity could not write js0_over_training: {err}")
