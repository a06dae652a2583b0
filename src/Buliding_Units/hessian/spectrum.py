"""Global and per-block curvature spectrum: top-k eigenvalues by block Lanczos, traces by Hutchinson.

Pure functions, no file I/O. What PyHessian users look at (the top eigenvalue, "sharpness", and the trace), next to
the same per block (each diagonal block's λ_max and trace), from one batched HVP (``hessian_products``):

- Block Lanczos with full reorthogonalisation, in one batched call per round for every operator at once: the full
  matrix (width k + 1) and each diagonal block H_bb (width 2; a probe supported on block b, read on block b).
- Stopping: the residual test of ``hessian_krylov``. A Ritz pair (θ, x) with r = ‖H x - θ x‖ has an eigenvalue of H
  in [θ - r, θ + r] (Krylov-Weinstein); an operator converges when every wanted Ritz value has r <= tol·|θ|, after
  at least ``_MIN_STEPS`` rounds. Whether the k certified values are the k *largest* is what random starts make
  likely, not certain: no method that only sees products can certify that.
- Hutchinson: E[zᵀ H z] = tr H for Rademacher z (Hutchinson 1990, "A stochastic estimator of the trace of the
  influence matrix for Laplacian smoothing splines"). The same probes give every block's trace, E[z_bᵀ (H z)_b] =
  tr H_bb (the other blocks' entries of z are independent of z_b and average out), and the block traces sum to the
  trace exactly. The standard error is the probes' sample standard deviation over √m.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .pools import Rows, cgs2, padded, symmetric_ritz
from .products import CURVATURES, make_batched_hvp

_MIN_STEPS = 3  # rounds before an operator may stop on its residual test
_BLOCK_WIDTH = 2  # block Lanczos width per diagonal block
_BREAKDOWN = 1e3  # a Krylov residual below _BREAKDOWN * eps * (largest output norm) is a breakdown


@dataclass
class SpectrumResult:
    """Output of ``curvature_spectrum``.

    Attributes:
        eigenvalues: the k largest eigenvalues (algebraic) of the whole matrix, descending.
        residuals: each one's residual bound: an eigenvalue lies within it.
        converged: whether every one of them met ``tol`` (relative) before ``max_steps``.
        trace, trace_se: Hutchinson estimate of tr H and its standard error.
        block_lambda_max, block_residuals, block_converged: the same for each diagonal block's largest eigenvalue.
        block_trace, block_trace_se: Hutchinson estimates of tr H_bb and their standard errors.
        hvps: products spent (Lanczos and Hutchinson), calls: batched calls, steps: Lanczos rounds of the whole
            matrix, probes: Hutchinson probes.
    """

    eigenvalues: list[float]
    residuals: list[float]
    converged: bool
    trace: float
    trace_se: float
    block_lambda_max: list[float]
    block_residuals: list[float]
    block_converged: list[bool]
    block_trace: list[float]
    block_trace_se: list[float]
    hvps: int
    calls: int
    steps: int
    probes: int


@dataclass
class _Operator:
    """The matrix restricted to ``span`` (rows and columns), with its Lanczos state."""

    span: slice
    wanted: int
    basis: Rows
    columns: list[Tensor] = field(default_factory=list)  # H x_t in the basis
    applied: int = 0
    scale: float = 0.0
    steps: int = 0
    open: bool = True
    converged: bool = False
    values: list[float] = field(default_factory=list)
    residuals: list[float] = field(default_factory=list)

    def update(self, tol: float, max_steps: int) -> None:
        values, residuals = symmetric_ritz(padded(self.columns, self.basis.n))
        top = torch.argsort(values, descending=True)[:self.wanted]
        self.values, self.residuals = values[top].tolist(), residuals[top].tolist()
        self.steps += 1
        exhausted = self.basis.n == self.applied
        certified = all(r <= tol * abs(v) for v, r in zip(self.values, self.residuals))
        if certified and (self.steps >= _MIN_STEPS or exhausted):
            self.open, self.converged = False, True
        elif exhausted or self.steps >= max_steps:
            self.open = False


def _start(operators: list[_Operator], width: list[int], generator: torch.Generator) -> None:
    for op, count in zip(operators, width):
        size = op.span.stop - op.span.start
        for _ in range(min(count, size)):
            start = torch.randn(size, generator=generator, dtype=torch.float64)
            _, start, norm = cgs2(op.basis.view, start.to(op.basis.data))
            op.basis.extend((start / norm)[None])


def _lanczos(hvp: Callable[[Tensor], Tensor], operators: list[_Operator], numel: int, tol: float,
             max_steps: int) -> int:
    """Run every operator's block Lanczos to its stop, one batched call per round. Returns the calls made."""
    calls = 0
    while any(op.open for op in operators):
        live = [op for op in operators if op.open]
        requests = [(op, op.basis.view[a]) for op in live for a in range(op.applied, op.basis.n)]
        for op in live:
            op.applied = op.basis.n
        probes = torch.zeros(len(requests), numel, dtype=requests[0][1].dtype, device=requests[0][1].device)
        for row, (op, vector) in enumerate(requests):
            probes[row, op.span] = vector
        outputs = hvp(probes)
        calls += 1
        for (op, _), output in zip(requests, outputs):
            w = output[op.span]
            c, r, norm = cgs2(op.basis.view, w)
            op.scale = max(op.scale, float(w.norm()))
            if norm > _BREAKDOWN * torch.finfo(w.dtype).eps * op.scale:
                op.basis.extend((r / norm)[None])
                c = torch.cat([c, c.new_tensor([norm])])
            op.columns.append(c.double())
        for op in live:
            op.update(tol, max_steps)
    return calls


def _hutchinson(hvp: Callable[[Tensor], Tensor], spans: list[slice], numel: int, probes: int,
                generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Per-probe estimates of every block trace, (probes, B): z_bᵀ (H z)_b for Rademacher z."""
    z = (torch.randint(0, 2, (probes, numel), generator=generator) * 2 - 1).to(dtype=dtype, device=device)
    products = (z * hvp(z)).double()
    return torch.stack([products[:, span].sum(1) for span in spans], dim=1)


def _mean_and_se(samples: Tensor) -> tuple[float, float]:
    count = samples.shape[0]
    spread = float(samples.std(unbiased=True)) if count > 1 else math.inf
    return float(samples.mean()), spread / math.sqrt(count)


def spectrum_from_hvp(hvp: Callable[[Tensor], Tensor], block_sizes: list[int], k: int = 3, tol: float = 1e-3,
                      max_steps: int = 100, trace_probes: int = 64, seed: int = 0, dtype: torch.dtype | None = None,
                      device: torch.device | None = None) -> SpectrumResult:
    """Top-k eigenvalues and trace of a symmetric matrix, and each diagonal block's λ_max and trace, from products.

    Args:
        hvp: batched product, V (m, N) -> H V (m, N); a ``hessian_products.BatchedHVP`` supplies dtype and device.
        block_sizes: parameters per block (N = their sum).
        k: number of largest eigenvalues of the whole matrix.
        tol: relative residual tolerance of each wanted Ritz value.
        max_steps: cap on Lanczos rounds.
        trace_probes: Rademacher probes of the Hutchinson estimates (at least 2, for a standard error).
        seed: seed of the random starts and probes (CPU generator).

    Returns:
        A ``SpectrumResult``.
    """
    if k < 1 or tol <= 0 or max_steps < 1 or trace_probes < 2:
        raise ValueError(f"need k >= 1, tol > 0, max_steps >= 1 and trace_probes >= 2, got k={k}, tol={tol}, "
                         f"max_steps={max_steps}, trace_probes={trace_probes}")
    dtype = dtype or getattr(hvp, "dtype", torch.float64)
    device = device or getattr(hvp, "device", torch.device("cpu"))
    numel, starts = sum(block_sizes), [sum(block_sizes[:b]) for b in range(len(block_sizes))]
    spans = [slice(s, s + n) for s, n in zip(starts, block_sizes)]
    whole = _Operator(slice(0, numel), k, Rows(numel, dtype, device))
    blocks = {b: _Operator(span, 1, Rows(block_sizes[b], dtype, device)) for b, span in enumerate(spans)
              if block_sizes[b]}
    generator = torch.Generator().manual_seed(seed)
    _start([whole, *blocks.values()], [k + 1] + [_BLOCK_WIDTH] * len(blocks), generator)
    calls = _lanczos(hvp, [whole, *blocks.values()], numel, tol, max_steps)
    hvps = sum(op.applied for op in (whole, *blocks.values()))
    samples = _hutchinson(hvp, spans, numel, trace_probes, generator, dtype, device)
    trace, trace_se = _mean_and_se(samples.sum(1))
    per_block = [_mean_and_se(samples[:, b]) for b in range(len(spans))]
    empty = _Operator(slice(0, 0), 1, Rows(0, dtype, device), values=[0.0], residuals=[0.0], converged=True)
    block_ops = [blocks.get(b, empty) for b in range(len(block_sizes))]
    return SpectrumResult(
        eigenvalues=whole.values, residuals=whole.residuals, converged=whole.converged, trace=trace,
        trace_se=trace_se, block_lambda_max=[op.values[0] for op in block_ops],
        block_residuals=[op.residuals[0] for op in block_ops], block_converged=[op.converged for op in block_ops],
        block_trace=[mean for mean, _ in per_block], block_trace_se=[se for _, se in per_block],
        hvps=hvps + trace_probes, calls=calls + 1, steps=whole.steps, probes=trace_probes)


def curvature_spectrum(model: nn.Module, criterion: nn.Module, inputs: Tensor, targets: Tensor, k: int = 3,
                       tol: float = 1e-3, max_steps: int = 100, trace_probes: int = 64, seed: int = 0,
                       memory_budget_mb: float = 256, curvature: str = "hessian") -> SpectrumResult:
    """``spectrum_from_hvp`` of the loss's Hessian (or Gauss-Newton matrix) w.r.t. the flat block parameters.

    The model is used in its current mode and left unchanged (see ``hessian``'s module docstring).
    """
    hvp = make_batched_hvp(model, criterion, inputs, targets, memory_budget_mb, curvature)
    return spectrum_from_hvp(hvp, hvp.block_sizes, k=k, tol=tol, max_steps=max_steps, trace_probes=trace_probes,
                             seed=seed)


def check_curvature(curvature: str) -> None:
    """ValueError naming the valid curvatures unless ``curvature`` is one."""
    if curvature not in CURVATURES:
        raise ValueError(f"unknown curvature {curvature!r}; valid: {sorted(CURVATURES)}")


def positive_int(name: str, value: Any, least: int = 1) -> int:
    """``value`` as an int, or ValueError naming ``name`` unless it is an integer >= ``least``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    return int(value)
