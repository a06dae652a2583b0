"""All-pairs Hessian block norms from batched Krylov steps with a pooled Rayleigh-Ritz lower bound.

Only needs a batched HVP, V (m, N) -> H V (m, N). Algorithm (costs and measurements in docs/notes.md,
"All-pairs block norms"):

- A probe supported on block j returns H_ij v for every block i at once, and H_ji = H_ijᵀ, so only pairs i < j.
- Pair (i, j): block Golub-Kahan bidiagonalisation of A = H_ij, width 2, with full reorthogonalisation. Call A of a
  round applies the new V rows (block j) and reads A V -> new U rows; call B applies the new U rows (block i) and
  reads Aᵀ U -> new V rows: 4 HVPs per round. Width 1 stopped on the second singular value of a fresh MLP's pair
  whose top two were 4 % apart. (A Rayleigh quotient on the dilation [[0, A], [Aᵀ, 0]] does not converge
  to σ: its eigenvalues come in ±σ pairs.)
- Diagonal block b: block Lanczos on H_bb (3 vectors a step, full reorthogonalisation) in call A. Width 1 stalled
  for many steps on a block whose two top eigenvalues were 1 % apart (1.3 % error at tol 1e-2 in
  bench/bench_hessian.py); width 3 resolves such clusters for 3 HVPs per block and step, little next to the pairs.
- Round 1 shares the random starts per block: the first two Lanczos starts of block j are V_1 of every pair (., j).
- Every probe applied on block b joins b's pool (CGS2 basis Q_b, P_b = Q_b T_b; a probe less than 0.1 % new is left
  out to keep T_b well conditioned). The outputs give, for free: the one-sided bound
  σ_max(H_ij Q_j)² = λ_max(T_j⁻ᵀ G T_j⁻¹), G = (H_ij P_j)ᵀ(H_ij P_j), from the stored outputs, and the same with Q_i
  for H_ji; when the stored outputs would exceed the budget, the two-sided bound
  σ_max(Q_iᵀ H_ij Q_j) = σ_max(T_i⁻ᵀ K_ij T_j⁻¹), K = Pᵀ H P, which needs only the probes;
  diagonal bound max|λ(Q_bᵀ H_bb Q_b)|.
- The own Ritz value θ (σ_max(Uᵀ A V) from the reorthogonalisation coefficients; max|λ| of the diagonal block's
  Lanczos matrix) and its residual δ = ‖[A v - θ u; Aᵀ u - θ v]‖/√2 (‖H x - θ x‖): the dilation (H_ii) has an
  eigenvalue within δ of θ, so A has a singular value there. Each estimate is the running maximum of all the bounds:
  it never decreases and is at most the true value (up to rounding). An entry stops, converged, after at least
  _MIN_STEPS rounds once δ <= tol·θ and the estimate lies in [θ - δ, θ + δ] (else a larger value exists and the
  Krylov space has not found it): then the estimate is within tol of a singular value of its block. That this is
  the largest one is likely with random starts, not certain. It also stops at a Krylov breakdown (exact) and,
  unconverged, at max_steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .pools import Pools, Rows, cgs2, padded, singular_ritz, symmetric_ritz

TYPICAL_STEPS = 8  # Krylov rounds the planner expects per entry at the default tolerance
_MIN_STEPS = 3  # rounds before an entry may stop on its residual test (no stop on a lucky first Ritz value)
_PAIR_WIDTH = 2  # block Golub-Kahan width per pair: near-equal top singular values (0.2329 vs 0.2236 seen on an MLP)
_DIAGONAL_WIDTH = 3  # block Lanczos width on diagonal blocks: resolves near-equal top eigenvalues (clusters up to 3)
_BREAKDOWN = 1e3  # a Krylov residual below _BREAKDOWN * eps * (largest output norm) is a breakdown
_ROUNDING = 100  # slack, in units of the dtype's eps, when comparing the pooled estimate with the Ritz interval


def krylov_hvp_cost(block_sizes: list[int], steps: int) -> int:
    """HVPs of ``steps`` Krylov rounds over all pairs (2 × _PAIR_WIDTH each) and diagonal blocks."""
    blocks = sum(1 for n in block_sizes if n)
    return steps * (_PAIR_WIDTH * blocks * (blocks - 1) + _DIAGONAL_WIDTH * blocks)


@dataclass
class KrylovResult:
    """Output of ``krylov_block_norms``; see ``hessian.InteractionInfo`` for the fields."""

    norms: Tensor
    hvps: int
    calls: int
    steps: Tensor
    converged: Tensor
    pool: str
    residual: Tensor


@dataclass
class _Item:
    """One pair i < j (block Golub-Kahan on H_ij) or one diagonal block i == j (block Lanczos on H_ii)."""

    i: int
    j: int
    left: Rows  # U on block i (pair) or X on block i (diagonal), orthonormal rows
    right: Rows  # V on block j (pair); unused for a diagonal block
    forward: list[Tensor] = field(default_factory=list)  # pair: A v_t in the U basis; diagonal: H x_t in the X basis
    backward: list[Tensor] = field(default_factory=list)  # pair: Aᵀ u_t in the V basis
    applied_left: int = 0  # rows of U applied (call B) or of X applied (call A)
    applied_right: int = 0  # rows of V applied (call A)
    scale: float = 0.0  # largest Krylov input norm seen: the scale of the breakdown test
    estimate: float = 0.0
    residual: float = math.inf  # relative residual bound δ/θ of the item's own top Ritz value
    steps: int = 0
    open: bool = True
    converged: bool = False

    @property
    def diagonal(self) -> bool:
        return self.i == self.j

    def ritz(self) -> tuple[float, float]:
        """(θ, δ): the own top Ritz value (σ_max for a pair, max|λ| for a diagonal) and its residual bound."""
        if self.diagonal:
            values, residuals = symmetric_ritz(padded(self.forward, self.left.n))
            if not len(values):
                return 0.0, math.inf
            top = int(values.abs().argmax())
            return float(values[top].abs()), float(residuals[top])
        if not self.backward:  # no U: A V = 0 exactly, so 0 is a singular value (exact); else not formed yet
            return (0.0, 0.0) if self.forward and self.left.n == 0 else (0.0, math.inf)
        return singular_ritz(padded(self.forward, self.left.n), padded(self.backward, self.right.n))

    def exhausted(self) -> bool:
        """No new direction to apply: the Krylov spaces are invariant, the Ritz values exact."""
        return self.left.n == self.applied_left if self.diagonal else self.right.n == self.applied_right


class _Engine:
    """Runs the rounds: call A (V block of every pair, X block of every diagonal), call B (U block of every pair)."""

    def __init__(self, hvp: Callable[[Tensor], Tensor], sizes: list[int], dtype: torch.dtype,
                 device: torch.device, tol: float, max_steps: int, budget_bytes: float) -> None:
        self.hvp, self.sizes, self.tol, self.max_steps = hvp, sizes, tol, max_steps
        self.dtype, self.device = dtype, device
        self.numel = sum(sizes)
        self.pools = Pools(sizes, dtype, device, int(budget_bytes // (self.numel * torch.finfo(dtype).bits // 8)))
        self.spans = self.pools.spans
        self.breakdown = _BREAKDOWN * torch.finfo(dtype).eps
        self.rounding = _ROUNDING * torch.finfo(dtype).eps
        self.hvps = self.calls = 0

    def _extend(self, item: _Item, basis: Rows, w: Tensor) -> Tensor:
        """Orthogonalise w against the basis, append its new direction unless it has none (breakdown), and return
        w's coefficients on the (grown) basis.

        The breakdown test is relative to the item's own scale: block norms of one Hessian span many orders of
        magnitude.
        """
        c, r, norm = cgs2(basis.view, w)
        item.scale = max(item.scale, float(w.norm()))
        if norm <= self.breakdown * item.scale:
            return c.double()
        basis.extend((r / norm)[None])
        return torch.cat([c.double(), c.new_tensor([norm], dtype=torch.float64)])

    def _consume(self, item: _Item, phase: str, output: Tensor) -> None:
        if phase == "A":  # H_ij v (pair) or H_ii x (diagonal), in the left basis
            item.forward.append(self._extend(item, item.left, output[self.spans[item.i]]))
        else:  # H_ji u, in the right basis
            item.backward.append(self._extend(item, item.right, output[self.spans[item.j]]))

    def _call(self, requests: list[tuple[int, Tensor, list[tuple[_Item, str]]]]) -> None:
        """One batched HVP call; requests are (block, unit probe on it, [(item, phase) reading the output])."""
        probes = torch.zeros(len(requests), self.numel, dtype=self.dtype, device=self.device)
        for row, (b, vector, _) in enumerate(requests):
            probes[row, self.spans[b]] = vector
        outputs = self.hvp(probes)
        self.hvps += len(requests)
        self.calls += 1
        pooled: dict[int, list[int]] = {}
        for row, (b, vector, consumers) in enumerate(requests):
            if self.pools.add(b, vector):
                pooled.setdefault(b, []).append(row)
            for item, phase in consumers:
                self._consume(item, phase, output=outputs[row])
        for b, rows in pooled.items():
            self.pools.record(b, outputs[rows])

    def _update(self, items: list[_Item], final: bool = False) -> None:
        """Raise each estimate to its best lower bound; stop an item once its residual bound meets ``tol``.

        The own Ritz value θ has a singular value (eigenvalue) of its block within δ. That interval certifies the
        estimate only if the estimate lies inside it (else a larger value exists and the Krylov space has not
        found it yet): then |estimate - σ| <= δ <= tol·θ for that σ.
        """
        for item, pooled in zip(items, self.pools.bounds([(item.i, item.j) for item in items])):
            theta, delta = item.ritz()
            item.estimate = max(item.estimate, pooled, theta)
            if final:
                continue
            item.steps += 1
            item.residual = delta / theta if theta > 0 else (0.0 if delta == 0 else math.inf)
            certified = delta <= self.tol * theta and item.estimate <= theta + delta + self.rounding * theta
            if certified and (item.steps >= _MIN_STEPS or item.exhausted()):
                item.open, item.converged = False, True
            elif item.exhausted() or item.steps >= self.max_steps:
                item.open = False

    @staticmethod
    def _apply(item: _Item, basis: Rows, phase: str, block: int, skip: int = 0) -> list:
        """Requests for the rows of ``basis`` not applied yet (but the first ``skip`` of them)."""
        done = item.applied_left if basis is item.left else item.applied_right
        rows = [(block, basis.view[a], [(item, phase)]) for a in range(done + skip, basis.n)]
        if basis is item.left:
            item.applied_left = basis.n
        else:
            item.applied_right = basis.n
        return rows

    def _start(self, generator: torch.Generator) -> tuple[list[_Item], list]:
        """The items and round 1's call A: per block, random starts shared by the diagonal and the pairs (., b)."""
        blocks = [b for b, n in enumerate(self.sizes) if n]
        rows = lambda b: Rows(self.sizes[b], self.dtype, self.device)  # noqa: E731
        diagonals = {b: _Item(b, b, rows(b), rows(b)) for b in blocks}
        pairs = [_Item(i, j, rows(i), rows(j)) for i in blocks for j in blocks if i < j]
        requests = []
        for b, item in diagonals.items():
            for _ in range(min(_DIAGONAL_WIDTH, self.sizes[b])):
                start = torch.randn(self.sizes[b], generator=generator, dtype=torch.float64)
                _, start, norm = cgs2(item.left.view, start.to(dtype=self.dtype, device=self.device))
                item.left.extend((start / norm)[None])
            shared = min(_PAIR_WIDTH, item.left.n)
            users = [pair for pair in pairs if pair.j == b]
            for pair in users:
                pair.right.extend(item.left.view[:shared])
                pair.applied_right = shared
            requests += [(b, item.left.view[a], [(item, "A")] + [(pair, "A") for pair in users])
                         for a in range(shared)]
            requests += self._apply(item, item.left, "A", b, skip=shared)
            item.applied_left = item.left.n
        return list(diagonals.values()) + pairs, requests

    def run(self, generator: torch.Generator) -> list[_Item]:
        items, requests = self._start(generator)
        while True:
            self._call(requests)
            turn = [item for item in items if item.open and not item.diagonal]
            requests = [r for item in turn for r in self._apply(item, item.left, "B", item.i)]
            if requests:
                self._call(requests)
            self._update([item for item in items if item.open])
            live = [item for item in items if item.open]
            if not live:
                break
            requests = [r for item in live for r in (
                self._apply(item, item.left, "A", item.i) if item.diagonal
                else self._apply(item, item.right, "A", item.j))]
        self._update(items, final=True)
        return items


def krylov_block_norms(hvp: Callable[[Tensor], Tensor], block_sizes: list[int], tol: float = 1e-2, seed: int = 0,
                       max_steps: int = 50, store_budget_bytes: float = 256 * 2**20,
                       dtype: torch.dtype | None = None, device: torch.device | None = None) -> KrylovResult:
    """Lower bounds on σ_max(H_ij) for all pairs and max|λ|(H_ii) per block from batched HVPs.

    Args:
        hvp: batched HVP, V (m, N) -> H V (m, N); a ``hessian.BatchedHVP`` supplies dtype and device itself.
        block_sizes: parameters per block (N = their sum); empty blocks get 0.
        tol: relative residual tolerance per entry: an entry converges when a singular value (eigenvalue) of its
            block lies within tol × estimate of the estimate (and no larger value has been seen).
        seed: seed of the random starts (CPU generator, so the same on every device).
        max_steps: cap on Krylov rounds per entry.
        store_budget_bytes: memory for the stored outputs of the one-sided pooled bound.
        dtype, device: of the probes, when ``hvp`` does not carry them.

    Returns:
        A ``KrylovResult`` with (B, B) float64 norms and relative residual bounds.
    """
    dtype = dtype or getattr(hvp, "dtype", torch.float64)
    device = device or getattr(hvp, "device", torch.device("cpu"))
    engine = _Engine(hvp, list(block_sizes), dtype, device, tol, max_steps, store_budget_bytes)
    items = engine.run(torch.Generator().manual_seed(seed))
    count = len(block_sizes)
    norms = torch.zeros(count, count, dtype=torch.float64)
    residual = torch.zeros(count, count, dtype=torch.float64)
    steps = torch.zeros(count, count, dtype=torch.int64)
    converged = torch.tensor([[n == 0 or m == 0 for m in block_sizes] for n in block_sizes])
    for item in items:
        for i, j in ((item.i, item.j), (item.j, item.i)):
            norms[i, j], steps[i, j], converged[i, j] = item.estimate, item.steps, item.converged
            residual[i, j] = item.residual
    return KrylovResult(norms, engine.hvps, engine.calls, steps, converged,
                        "two-sided" if engine.pools.y is None else "one-sided", residual)
