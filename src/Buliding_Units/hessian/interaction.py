"""Hessian numerics per parameter block: exact, finite-difference and all-pairs block norms.

Pure functions, no file I/O. The model must hold its blocks in an ``nn.ModuleList`` called ``blocks``. The flat
parameter vector (length N) concatenates ``block.parameters()`` block after block, in ``model.blocks`` order; parameters
outside the blocks are held fixed. The loss is ``criterion(model(inputs), targets)``.

Measurement mode is the caller's choice and is used as is: call ``model.eval()`` first to measure the eval-mode
Hessian. Nothing here changes the model's parameters, buffers or ``.grad``: the loss is evaluated with
``torch.func.functional_call`` on detached copies. A random forward pass (dropout in train mode) is refused: two
evaluations of the loss must agree. BatchNorm in train mode is measured with batch statistics through the slower
``torch.autograd`` path, because ``vmap(jvp(grad))`` cannot run a module that updates its running statistics
(see docs/notes.md, "Hessian-vector products", for the measured costs of each HVP path).
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .krylov import TYPICAL_STEPS, krylov_block_norms, krylov_hvp_cost
from .products import CURVATURES, BatchedHVP, FlatLoss, check_deterministic, make_batched_hvp  # noqa: F401

logger = logging.getLogger(__name__)

@dataclass
class InteractionInfo:
    """How ``block_interaction_norms`` got its answer.

    Attributes:
        hvps: Hessian-vector products spent; each vector of a batched call counts as one.
        steps: (B, B) int64, Krylov rounds per pair (block Golub-Kahan, 4 HVPs each) and per diagonal block
            (block Lanczos, 3 HVPs each); zeros for dense.
        converged: (B, B) bool, whether each entry passed its residual test before ``max_steps`` (all True for
            dense): a singular value (eigenvalue) of the block lies within ``residual`` × estimate of the estimate,
            and no larger value was seen. That it is the *largest* one is what the random starts make likely, not
            certain (no Krylov method can certify that); see ``hessian_krylov``.
        method: "dense" or "krylov".
        wall_time: seconds spent in the call.
        lower_bound: True when every entry is a certified lower bound (Krylov), False when exact (dense).
        pool: "one-sided", "two-sided" (output store over the memory budget) or "none" (dense).
        calls: batched HVP calls made.
        residual: (B, B) float64, relative residual bound δ/θ of each entry's own top Ritz value (0 for dense; inf
            where none was formed); ``converged`` means residual <= tol.
    """

    hvps: int
    steps: Tensor
    converged: Tensor
    method: str
    wall_time: float
    lower_bound: bool
    pool: str
    calls: int
    residual: Tensor


def block_sizes(model: nn.Module) -> list[int]:
    """Number of parameters of each block, in ``model.blocks`` order."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"expected a model with an nn.ModuleList attribute 'blocks', got {type(blocks).__name__}")
    return [sum(p.numel() for p in block.parameters()) for block in blocks]


def _dense_hessian(hvp: BatchedHVP) -> Tensor:
    n = hvp.numel
    rows = []
    for start in range(0, n, hvp.chunk_size):
        stop = min(n, start + hvp.chunk_size)
        basis = torch.zeros(stop - start, n, dtype=hvp.dtype, device=hvp.device)
        basis[torch.arange(stop - start), torch.arange(start, stop)] = 1
        rows.append(hvp(basis))
    hessian = torch.cat(rows)
    return (hessian + hessian.mT) / 2


def exact_hessian(model: nn.Module, criterion: nn.Module, inputs: Tensor, targets: Tensor,
                  memory_budget_mb: float = 256, curvature: str = "hessian") -> Tensor:
    """Dense Hessian of the loss w.r.t. the flat block parameters: N batched HVPs on the unit vectors.

    Forward-over-reverse (``vmap(jvp(grad))``, i.e. ``jacfwd(jacrev)``) in chunks sized by ``memory_budget_mb``,
    then symmetrised, (H + Hᵀ)/2. ``curvature="ggn"`` gives the dense Gauss-Newton matrix instead.

    Returns:
        (N, N) tensor in the parameters' dtype, on their device.
    """
    return _dense_hessian(make_batched_hvp(model, criterion, inputs, targets, memory_budget_mb, curvature))


def finite_difference_hessian(model: nn.Module, criterion: nn.Module, inputs: Tensor, targets: Tensor,
                              eps: float = 1e-5, max_params: int = 5000) -> Tensor:
    """Hessian by central differences of the gradient, in float64, symmetrised: a reference for small models.

    Costs 2·N gradient evaluations on a float64 copy of the model, criterion and floating inputs/targets.

    Returns:
        (N, N) float64 tensor.

    Raises:
        ValueError: N above ``max_params``, or a random forward pass.
    """
    n = sum(block_sizes(model))
    if n > max_params:
        raise ValueError(f"finite_difference_hessian needs 2*N gradients: the model has N = {n} block parameters, "
                         f"above the limit max_params = {max_params}")

    def to64(t: Tensor) -> Tensor:
        return t.to(torch.float64) if t.is_floating_point() else t

    flat = FlatLoss(copy.deepcopy(model).to(torch.float64), copy.deepcopy(criterion).to(torch.float64),
                     to64(inputs), to64(targets))
    check_deterministic(flat)

    def gradient(point: Tensor) -> Tensor:
        point = point.clone().requires_grad_(True)
        with torch.enable_grad():
            return torch.autograd.grad(flat(point), point)[0]

    step = torch.zeros_like(flat.p0)
    rows = []
    for k in range(n):
        step[k] = eps
        rows.append((gradient(flat.p0 + step) - gradient(flat.p0 - step)) / (2 * eps))
        step[k] = 0
    hessian = torch.stack(rows)
    return (hessian + hessian.mT) / 2


def block_spectral_norms(H: Tensor, block_sizes: list[int]) -> Tensor:  # noqa: N803 (the maths name)
    """Matrix 2-norms of the Hessian's blocks, exactly (SVD).

    Returns:
        (B, B) float64: entry (i, j) = σ_max(H_ij); the diagonal is max|λ|(H_ii). Empty blocks give 0.

    Raises:
        ValueError: ``hessian`` not square or ``block_sizes`` not summing to its size.
    """
    if H.ndim != 2 or H.shape[0] != H.shape[1] or sum(block_sizes) != H.shape[0]:
        raise ValueError(f"expected a square matrix of size sum(block_sizes) = {sum(block_sizes)}, "
                         f"got shape {tuple(H.shape)}")
    spans = [slice(start, start + n) for start, n in zip(_offsets(block_sizes), block_sizes)]
    count = len(block_sizes)
    norms = torch.zeros(count, count, dtype=torch.float64)
    for i in range(count):
        for j in range(i, count):
            block = H[spans[i], spans[j]]
            if block.numel():
                norms[i, j] = norms[j, i] = torch.linalg.matrix_norm(block.to(torch.float64), ord=2).item()
    return norms


def _offsets(sizes: list[int]) -> list[int]:
    return [sum(sizes[:b]) for b in range(len(sizes))]


def normalised_coupling(S: Tensor) -> Tensor:  # noqa: N803 (the maths name)
    """Scale-free coupling C_ij = S_ij / sqrt(S_ii · S_jj) of a (B, B) block-norm matrix S (S is not modified).

    C_ii = 1. Where S_ii · S_jj = 0 the coupling is undefined and set to NaN (e.g. the bias-free linear network at
    zero weights, whose diagonal blocks vanish; a parameter-free block).
    """
    if S.ndim != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"expected a square (B, B) matrix, got shape {tuple(S.shape)}")
    diagonal = S.diagonal()
    scale = torch.sqrt(diagonal[:, None] * diagonal[None, :])
    return torch.where(scale > 0, S / scale, torch.full_like(S, float("nan")))


def _dense_route(hvp: BatchedHVP, **_unused) -> tuple[Tensor, dict]:
    norms = block_spectral_norms(_dense_hessian(hvp), hvp.block_sizes)
    count = len(hvp.block_sizes)
    return norms, dict(hvps=hvp.numel, calls=-(-hvp.numel // hvp.chunk_size), pool="none", lower_bound=False,
                       steps=torch.zeros(count, count, dtype=torch.int64),
                       converged=torch.ones(count, count, dtype=torch.bool),
                       residual=torch.zeros(count, count, dtype=torch.float64))


def _krylov_route(hvp: BatchedHVP, tol: float, seed: int, max_steps: int, memory_budget_mb: float) -> tuple:
    result = krylov_block_norms(hvp, hvp.block_sizes, tol=tol, seed=seed, max_steps=max_steps,
                                store_budget_bytes=memory_budget_mb * 2**20)
    return result.norms, dict(hvps=result.hvps, calls=result.calls, pool=result.pool, lower_bound=True,
                              steps=result.steps, converged=result.converged, residual=result.residual)


_ROUTES = {"dense": _dense_route, "krylov": _krylov_route}


def plan_method(n_params: int, block_sizes: list[int]) -> str:
    """"dense" when the dense Hessian (N HVPs) is no dearer than the expected Krylov cost, else "krylov"."""
    return "dense" if n_params <= krylov_hvp_cost(block_sizes, TYPICAL_STEPS) else "krylov"


def block_interaction_norms(model: nn.Module, criterion: nn.Module, inputs: Tensor, targets: Tensor,
                            tol: float = 1e-2, seed: int = 0, max_steps: int = 50, memory_budget_mb: float = 256,
                            method: str = "auto", return_info: bool = False,
                            curvature: str = "hessian") -> Tensor | tuple[Tensor, InteractionInfo]:
    """Spectral norms of all Hessian blocks: S_ij = σ_max(H_ij), S_ii = max|λ|(H_ii).

    ``method="krylov"`` runs batched block Golub-Kahan per pair and block Lanczos per diagonal block with a pooled
    Rayleigh-Ritz bound (see ``hessian_krylov``): every entry is a lower bound that stops once its residual bound is
    at most ``tol`` (relative), i.e. a singular value of the block lies within ``tol`` of it (or after ``max_steps``,
    then not converged). ``"dense"`` builds the exact Hessian (N HVPs).
    ``"auto"`` picks the cheaper by HVP count (``plan_method``). Seeded and deterministic.

    Args:
        model, criterion, inputs, targets: the loss ``criterion(model(inputs), targets)``; see the module docstring.
        tol: relative residual tolerance per entry (see ``InteractionInfo.converged``).
        seed: seed of the random start vectors.
        max_steps: cap on Krylov steps per entry.
        memory_budget_mb: working memory of one batched HVP chunk, and separately of the pooled output store.
        method: "auto", "dense" or "krylov".
        return_info: also return an ``InteractionInfo``.
        curvature: "hessian" (default) or "ggn": the same norms of the Gauss-Newton matrix's blocks.

    Returns:
        (B, B) symmetric float64 tensor on the CPU, and the ``InteractionInfo`` if asked.

    Raises:
        ValueError: unknown method or curvature, non-positive tol/max_steps/budget, no ``blocks``, a random
            forward pass.
    """
    start = time.perf_counter()
    if method != "auto" and method not in _ROUTES:
        raise ValueError(f"unknown method {method!r}; valid: {sorted([*_ROUTES, 'auto'])}")
    if tol <= 0 or max_steps < 1:
        raise ValueError(f"need tol > 0 and max_steps >= 1, got tol={tol}, max_steps={max_steps}")
    hvp = make_batched_hvp(model, criterion, inputs, targets, memory_budget_mb, curvature)
    if method == "auto":
        method = plan_method(hvp.numel, hvp.block_sizes)
    norms, stats = _ROUTES[method](hvp, tol=tol, seed=seed, max_steps=max_steps, memory_budget_mb=memory_budget_mb)
    norms = norms.to(device="cpu", dtype=torch.float64)
    if not return_info:
        return norms
    return norms, InteractionInfo(method=method, wall_time=time.perf_counter() - start, **stats)
