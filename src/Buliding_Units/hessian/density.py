"""Per-block spectral densities by stochastic Lanczos quadrature (SLQ), every block at once, and the Jensen–Shannon
distances between them (block heterogeneity). Pure functions, no file I/O.

For each diagonal block H_bb (n_b parameters) and each of P unit starting vectors v (Rademacher signs / √n_b),
m_b = min(m, n_b) Lanczos steps give a tridiagonal T (m_b × m_b); its eigenvalues θ_i (Ritz values, the Gauss
quadrature nodes) and the squared first components of its eigenvectors w_i (the weights, summing to 1) make the
quadrature Σ_i w_i f(θ_i) ≈ vᵀ f(H_bb) v, exact for polynomials f of degree ≤ 2m_b − 1. Averaged over the probes it
estimates tr f(H_bb)/n_b, i.e. ∫ f dμ_b for the spectral measure μ_b = (1/n_b) Σ_j δ(λ_j) (Ubaru, Chen, Saad 2017).

* **Full reorthogonalisation** (classical Gram–Schmidt twice against every earlier Lanczos vector of the same probe):
  without it the three-term recurrence loses orthogonality once a Ritz value converges and produces spurious copies
  ("ghost" eigenvalues). With it, and m_b = n_b, the Ritz values are the eigenvalues of H_bb (to rounding).
  It costs P·m_b·n_b stored entries per block, i.e. P·m·N for the model.
* **Breakdown** (the Krylov space of v is invariant: v meets only k < m_b distinct eigenvalues, e.g. a repeated zero
  eigenvalue): the coupling β is set to exactly 0 and the recurrence continues from the coordinate vector least
  represented in the basis, orthogonalised. T splits into blocks; the nodes of the later blocks get weight 0
  (exactly, up to eigh rounding), so the quadrature is unchanged, and with m_b = n_b every eigenvalue, with its
  multiplicity, is still a Ritz value. The restart is deterministic, so batching never changes the answer.
* **All blocks at once**: step t applies one batched product to P·(blocks still running) rows, the row of (b, p)
  being probe p's current Lanczos vector on block b's coordinates and zero elsewhere; block b's coordinates of the
  product are H_bb q (the other coordinates, H_cb q, are discarded). A measurement spends P·Σ_b m_b products — the
  same as one block and one probe at a time — in max_b m_b batched calls instead of P·Σ_b m_b.
* **Densities**: each block's Ritz values are divided by a scale s_b (``JS_NORMALISATIONS``), broadened by a
  Gaussian of standard deviation σ (in those normalised units), averaged over probes, on one grid common to every
  block, and rescaled to integrate to 1 (trapezoid rule). JS distances compare those densities as discrete
  distributions on the grid: the square root of the Jensen–Shannon divergence with base-2 logarithms, in [0, 1].
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .spectrum import positive_int

# How Ritz values are scaled before densities and JS distances: every block by its own spectral radius (the shape of
# each block's spectrum, whatever its size), or every block by one common scale (shape and relative size).
JS_NORMALISATIONS = ("spectral_radius", "common")
_BREAKDOWN = 1e3  # a Lanczos residual below _BREAKDOWN · eps · (largest ‖H q‖ of the probe) is a breakdown
_TAIL = 5.0  # the density grid extends _TAIL · σ beyond the outermost normalised Ritz values


def positive_float(name: str, value: Any) -> float:
    """``value`` as a float, or ValueError naming ``name`` unless it is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_normalisation(normalisation: str) -> None:
    """ValueError naming the key and the valid values unless ``normalisation`` is one."""
    if normalisation not in JS_NORMALISATIONS:
        raise ValueError(f"unknown js_normalisation {normalisation!r}; valid: {list(JS_NORMALISATIONS)}")


def min_grid_points(sigma: float) -> int:
    """Fewest grid points whose spacing resolves σ (≤ σ/2) over the widest possible normalised span, 2 + 2·5σ."""
    return math.ceil((2 + 2 * _TAIL * sigma) / (sigma / 2)) + 1


def rademacher_starts(block_sizes: Sequence[int], probes: int, seed: int, dtype: torch.dtype = torch.float64,
                      device: torch.device | str | None = None) -> list[Tensor | None]:
    """Unit starting vectors per block, (probes, n_b) each (None for a block without parameters): Rademacher signs
    divided by √n_b, so E[v vᵀ] = I/n_b exactly. Drawn block after block from one CPU generator seeded ``seed``."""
    generator = torch.Generator().manual_seed(int(seed))
    starts: list[Tensor | None] = []
    for n in block_sizes:
        if n == 0:
            starts.append(None)
            continue
        signs = torch.randint(0, 2, (probes, n), generator=generator, dtype=torch.int64) * 2 - 1
        starts.append((signs.to(torch.float64) / math.sqrt(n)).to(dtype=dtype, device=device))
    return starts


@dataclass
class _Lanczos:
    """One block's Lanczos state, batched over its probes."""

    span: slice
    steps: int
    basis: Tensor  # (P, m_b, n_b) in the product's dtype
    alpha: Tensor  # (P, m_b) float64
    beta: Tensor  # (P, m_b - 1) float64
    scale: Tensor  # (P,) float64: the largest ‖H q‖ so far

    def advance(self, t: int, w: Tensor) -> None:
        """Take H q_t (rows of ``w``, (P, n_b)) into the recurrence: α_t, then β_t and q_{t+1}."""
        self.scale = torch.maximum(self.scale, w.norm(dim=1).double())
        previous = self.basis[:, :t + 1]
        w, coefficients = _cgs2(previous, w)
        self.alpha[:, t] = coefficients[:, t].double()
        if t + 1 == self.steps:
            return
        beta = w.norm(dim=1)
        broken = beta.double() <= _BREAKDOWN * torch.finfo(w.dtype).eps * self.scale
        following = w / torch.where(broken, torch.ones_like(beta), beta)[:, None]
        for p in broken.nonzero().flatten().tolist():
            following[p] = _restart(previous[p])
        self.beta[:, t] = torch.where(broken, torch.zeros_like(beta), beta).double()
        self.basis[:, t + 1] = following


def _cgs2(basis: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Classical Gram–Schmidt twice, batched: w minus its projection on the rows of ``basis`` (P, k, n).
    Returns (the residual (P, n), the coefficients (P, k))."""
    coefficients = torch.zeros(w.shape[0], basis.shape[1], dtype=w.dtype, device=w.device)
    for _ in range(2):
        c = torch.einsum("pkn,pn->pk", basis, w)
        w = w - torch.einsum("pk,pkn->pn", c, basis)
        coefficients = coefficients + c
    return w, coefficients


def _restart(basis: Tensor) -> Tensor:
    """A unit vector orthogonal to the orthonormal rows of ``basis`` (k, n), k < n: the coordinate vector with the
    largest component outside their span, orthogonalised (deterministic, well conditioned: that component is at least
    √((n − k)/n))."""
    outside = 1 - (basis * basis).sum(0)
    e = torch.zeros_like(basis[0])
    e[int(outside.argmax())] = 1
    r, _ = _cgs2(basis[None], e[None])
    return r[0] / r[0].norm()


@dataclass
class Tridiagonals:
    """Lanczos coefficients per block (None for a block not run): α (P_b, m_b) and β (P_b, m_b − 1), float64;
    ``hvps``: products spent (rows of the batched calls), ``calls``: batched calls."""

    alpha: list[Tensor | None]
    beta: list[Tensor | None]
    hvps: int
    calls: int


def lanczos_tridiagonals(hvp: Callable[[Tensor], Tensor], block_sizes: Sequence[int],
                         starts: Sequence[Tensor | None], steps: int) -> Tridiagonals:
    """Lanczos with full reorthogonalisation on every diagonal block with a start, all blocks in each batched call.

    Args:
        hvp: batched product V (R, N) -> H V (R, N) (a ``BatchedHVP``).
        block_sizes: parameters per block, N = their sum.
        starts: per block, (P_b, n_b) starting vectors (normalised here), or None to skip the block.
        steps: m; block b runs m_b = min(m, n_b) steps.

    Returns:
        ``Tridiagonals``; block b spends P_b·m_b products, in max_b m_b batched calls overall.
    """
    offsets = [sum(block_sizes[:b]) for b in range(len(block_sizes))]
    numel = sum(block_sizes)
    states: dict[int, _Lanczos] = {}
    for b, (n, start) in enumerate(zip(block_sizes, starts)):
        if start is None or n == 0:
            continue
        if start.ndim != 2 or start.shape[1] != n:
            raise ValueError(f"block {b}: expected starts of shape (P, {n}), got {tuple(start.shape)}")
        m, count = min(steps, n), start.shape[0]
        basis = start.new_zeros(count, m, n)
        basis[:, 0] = start / start.norm(dim=1, keepdim=True)
        states[b] = _Lanczos(slice(offsets[b], offsets[b] + n), m, basis,
                             torch.zeros(count, m, dtype=torch.float64, device=start.device),
                             torch.zeros(count, m - 1, dtype=torch.float64, device=start.device),
                             torch.zeros(count, dtype=torch.float64, device=start.device))
    hvps = calls = 0
    for t in range(max((s.steps for s in states.values()), default=0)):
        live = [s for s in states.values() if t < s.steps]
        first = live[0].basis
        probes = first.new_zeros(sum(s.basis.shape[0] for s in live), numel)
        row = 0
        for s in live:
            probes[row:row + s.basis.shape[0], s.span] = s.basis[:, t]
            row += s.basis.shape[0]
        products = hvp(probes).to(first.dtype)
        hvps, calls, row = hvps + probes.shape[0], calls + 1, 0
        for s in live:
            s.advance(t, products[row:row + s.basis.shape[0], s.span])
            row += s.basis.shape[0]
    return Tridiagonals([states[b].alpha if b in states else None for b in range(len(block_sizes))],
                        [states[b].beta if b in states else None for b in range(len(block_sizes))], hvps, calls)


def gauss_quadrature(alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """Nodes (Ritz values, ascending) and weights of each probe's tridiagonal, (P, m) each; weights sum to 1."""
    T = torch.diag_embed(alpha) + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)
    values, vectors = torch.linalg.eigh(T)
    return values, vectors[:, 0, :] ** 2


@dataclass
class BlockSLQ:
    """Output of ``block_slq``: per block (None where it has no parameters) the Ritz values and weights, (P, m_b)
    float64 each (row p: probe p's Gauss quadrature); ``steps``: m_b per block (0 without parameters)."""

    ritz_values: list[Tensor | None]
    ritz_weights: list[Tensor | None]
    block_sizes: list[int]
    steps: list[int]
    probes: int
    hvps: int
    calls: int


def block_slq(hvp: Callable[[Tensor], Tensor], block_sizes: Sequence[int], probes: int = 8, steps: int = 40,
              seed: int = 0, starts: Sequence[Tensor | None] | None = None) -> BlockSLQ:
    """Stochastic Lanczos quadrature of every diagonal block, all blocks in each batched call.

    Args:
        hvp: batched product (a ``BatchedHVP``: its ``dtype`` and ``device`` are used for the starts).
        block_sizes: parameters per block.
        probes: P, starting vectors per block.
        steps: m, Lanczos steps (capped by each block's size).
        seed: seed of the Rademacher starts (``rademacher_starts``).
        starts: explicit starting vectors instead (per block (P, n_b) or None), e.g. to compare with another run.

    Raises:
        ValueError: probes or steps not a positive integer.
    """
    probes, steps = positive_int("probes", probes), positive_int("lanczos_steps", steps)
    if starts is None:
        starts = rademacher_starts(block_sizes, probes, seed, getattr(hvp, "dtype", torch.float64),
                                   getattr(hvp, "device", None))
    tri = lanczos_tridiagonals(hvp, block_sizes, starts, steps)
    nodes = [gauss_quadrature(a, b) if a is not None else (None, None) for a, b in zip(tri.alpha, tri.beta)]
    return BlockSLQ([v for v, _ in nodes], [w for _, w in nodes], list(block_sizes),
                    [a.shape[1] if a is not None else 0 for a in tri.alpha], probes, tri.hvps, tri.calls)


def _mean_and_se(samples: Tensor) -> tuple[float, float]:
    spread = float(samples.std(unbiased=True)) if samples.numel() > 1 else math.inf
    return float(samples.mean()), spread / math.sqrt(samples.numel())


def quadrature_moments(result: BlockSLQ, k: int) -> list[tuple[float, float] | None]:
    """Per block, the estimate of ∫λ^k dμ_b = tr(H_bb^k)/n_b and its standard error (over probes)."""
    return [None if v is None else _mean_and_se((w * v ** k).sum(1))
            for v, w in zip(result.ritz_values, result.ritz_weights)]


def trace_estimates(result: BlockSLQ) -> list[tuple[float, float] | None]:
    """Per block, the estimate of tr H_bb and its standard error: n_b × the first moment (Hutchinson's estimator with
    the same Rademacher probes)."""
    moments = quadrature_moments(result, 1)
    return [None if m is None else (n * m[0], n * m[1]) for n, m in zip(result.block_sizes, moments)]


def lambda_extremes(result: BlockSLQ) -> list[tuple[float, float] | None]:
    """Per block (λ_min, λ_max) estimates: the extreme Ritz values over probes (an interval inside the spectrum)."""
    return [None if v is None else (float(v.min()), float(v.max())) for v in result.ritz_values]


def normalisation_scales(result: BlockSLQ, normalisation: str = "spectral_radius") -> list[float | None]:
    """Per block the scale s_b its Ritz values are divided by: its spectral-radius estimate max|θ|
    (``"spectral_radius"``) or the largest of them over all blocks (``"common"``). A zero scale becomes 1."""
    check_normalisation(normalisation)
    radius = [None if v is None else float(v.abs().max()) for v in result.ritz_values]
    if normalisation == "common":
        top = max((r for r in radius if r is not None), default=0.0)
        radius = [None if r is None else top for r in radius]
    return [None if r is None else (r if r > 0 else 1.0) for r in radius]


def smoothed_density(values: Tensor, weights: Tensor, grid: Tensor, sigma: float) -> Tensor:
    """(1/P) Σ_p Σ_i w_pi N(x; θ_pi, σ²) on ``grid`` (uniform), rescaled to integrate to 1 (trapezoid rule)."""
    nodes, mass = values.reshape(-1), weights.reshape(-1) / values.shape[0]
    density = torch.zeros_like(grid)
    for chunk in range(0, nodes.numel(), 256):  # bounded memory: (chunk, G) at a time
        z = (grid[None, :] - nodes[chunk:chunk + 256, None]) / sigma
        density += (mass[chunk:chunk + 256, None] * torch.exp(-0.5 * z * z)).sum(0)
    density /= sigma * math.sqrt(2 * math.pi)
    return density / torch.trapezoid(density, grid)


def js_distance(p: Tensor, q: Tensor) -> float:
    """Jensen–Shannon distance between two non-negative vectors taken as discrete distributions (each normalised to
    sum 1): √(½ KL(p‖m) + ½ KL(q‖m)), m = (p + q)/2, base-2 logarithms, so it lies in [0, 1]."""
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: Tensor) -> Tensor:
        return torch.where(a > 0, a * torch.log2(torch.where(a > 0, a, 1.0) / torch.where(a > 0, m, 1.0)), 0.0).sum()

    return math.sqrt(min(max(float(kl(p) + kl(q)) / 2, 0.0), 1.0))


def js_matrix(densities: Sequence[Tensor | None]) -> Tensor:
    """Pairwise JS distances (B, B) float64, NaN for a block without a density, 0 on the diagonal of the others."""
    count = len(densities)
    out = torch.full((count, count), math.nan, dtype=torch.float64)
    for i in range(count):
        if densities[i] is None:
            continue
        out[i, i] = 0.0
        for j in range(i + 1, count):
            if densities[j] is not None:
                out[i, j] = out[j, i] = js_distance(densities[i], densities[j])
    return out


def mean_pairwise(matrix: Tensor) -> float | None:
    """The mean of the finite entries above the diagonal (JS₀); None without any pair."""
    upper = matrix[tuple(torch.triu_indices(*matrix.shape, offset=1))]
    upper = upper[torch.isfinite(upper)]
    return float(upper.mean()) if upper.numel() else None


@dataclass
class Densities:
    """Output of ``spectral_densities``.

    Attributes:
        grid: (G,) float64, the common grid in normalised units x = λ / s_b.
        densities: per block (G,) float64 (None without parameters), each integrating to 1 on ``grid``.
        scales: per block s_b.
        js: (B, B) pairwise Jensen–Shannon distances (NaN for blocks without parameters).
        js0: their mean over pairs i < j (None for fewer than two blocks with parameters).
        normalisation, sigma: as given.
    """

    grid: Tensor
    densities: list[Tensor | None]
    scales: list[float | None]
    js: Tensor
    js0: float | None
    normalisation: str
    sigma: float
    js_floor: float | None = None


def spectral_densities(result: BlockSLQ, sigma: float = 0.01, grid_points: int = 1000,
                       normalisation: str = "spectral_radius") -> Densities:
    """Each block's smoothed density on one common grid, and the JS distances between them.

    The grid spans every block's normalised Ritz values (|x| ≤ 1 for both normalisations) plus 5σ each side, with
    ``grid_points`` points. Raises ValueError for σ not finite and positive, an unknown normalisation, or a grid too
    coarse to resolve σ (``min_grid_points``).
    """
    sigma = positive_float("sigma", sigma)
    check_normalisation(normalisation)
    grid_points = positive_int("grid_points", grid_points)
    if grid_points < min_grid_points(sigma):
        raise ValueError(f"grid_points={grid_points} cannot resolve sigma={sigma:g}: need grid_points >= "
                         f"{min_grid_points(sigma)} (spacing at most sigma/2 over the normalised span 2 + 10·sigma)")
    scales = normalisation_scales(result, normalisation)
    normalised = [None if v is None else v / s for v, s in zip(result.ritz_values, scales)]
    present = [x for x in normalised if x is not None]
    low = min((float(x.min()) for x in present), default=-1.0) - _TAIL * sigma
    high = max((float(x.max()) for x in present), default=1.0) + _TAIL * sigma
    grid = torch.linspace(low, high, grid_points, dtype=torch.float64)
    densities = [None if x is None else smoothed_density(x.cpu(), w.cpu(), grid, sigma)
                 for x, w in zip(normalised, result.ritz_weights)]
    js = js_matrix(densities)
    return Densities(grid, densities, scales, js, mean_pairwise(js), normalisation, sigma,
                     probe_noise(normalised, result.ritz_weights, grid, sigma))


def probe_noise(normalised: Sequence[Tensor | None], weights: Sequence[Tensor | None], grid: Tensor,
                sigma: float) -> float | None:
    """The JS distance between two estimates of one and the same spectrum: per block, the density from the first
    half of its probes against the density from the second half, averaged over blocks. An estimate from P/2 probes
    is noisier than one from P, so this bounds the estimator's noise floor from above: JS₀ below it says nothing.
    None with fewer than two probes."""
    floors = [js_distance(smoothed_density(x[:len(x) // 2].cpu(), w[:len(x) // 2].cpu(), grid, sigma),
                          smoothed_density(x[len(x) // 2:].cpu(), w[len(x) // 2:].cpu(), grid, sigma))
              for x, w in zip(normalised, weights) if x is not None and len(x) >= 2]
    return sum(floors) / len(floors) if floors else None
