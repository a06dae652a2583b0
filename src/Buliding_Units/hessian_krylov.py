"""All-pairs Hessian block norms from batched Krylov steps with a pooled Rayleigh-Ritz lower bound.

Only needs a batched HVP, V (m, N) -> H V (m, N). Algorithm (costs and measurements in docs/notes.md,
"All-pairs block norms"):

- A probe supported on block j returns H_ij v for every block i at once, and H_ji = H_ijᵀ, so only pairs i < j.
- Pair (i, j): Golub-Kahan bidiagonalisation of A = H_ij with full reorthogonalisation. Call A of a round applies
  v_t (block j) and reads A v_t -> u_t; call B applies u_t (block i) and reads Aᵀ u_t -> v_{t+1}: 2 HVPs per step.
  (A Rayleigh quotient on the dilation [[0, A], [Aᵀ, 0]] does not converge to σ: its eigenvalues come in ±σ pairs.)
- Diagonal block b: block Lanczos on H_bb (3 vectors a step, full reorthogonalisation) in call A. Width 1 stalled
  for many steps on a block whose two top eigenvalues were 1 % apart (1.3 % error at tol 1e-2 in
  bench/bench_hessian.py); width 3 resolves such clusters for 3 HVPs per block and step, little next to the pairs.
- Round 1 shares one random start per block: the start on block j is v_1 of every pair (., j) and the first Lanczos
  start of block j.
- Every probe applied on block b joins b's pool (CGS2 basis Q_b, P_b = Q_b T_b; a probe less than 0.1 % new is left
  out to keep T_b well conditioned). The outputs give, for free: the one-sided bound
  σ_max(H_ij Q_j)² = λ_max(T_j⁻ᵀ G T_j⁻¹), G = (H_ij P_j)ᵀ(H_ij P_j), from the stored outputs, and the same with Q_i
  for H_ji; when the stored outputs would exceed the budget, the two-sided bound
  σ_max(Q_iᵀ H_ij Q_j) = σ_max(T_i⁻ᵀ K_ij T_j⁻¹), K = Pᵀ H P, which needs only the probes;
  diagonal bound max|λ(Q_bᵀ H_bb Q_b)|.
- The pair's own Krylov bound σ_max(Uᵀ A V) comes from the reorthogonalisation coefficients (a diagonal block's
  Lanczos space is in its pool). Each estimate is the running maximum of these bounds: it never decreases and is at
  most the true value (up to rounding). It stops when it changed by at most tol (relative) in two consecutive steps,
  at a Krylov breakdown (then exact) or at max_steps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

TYPICAL_STEPS = 15  # Krylov steps the planner expects per pair at the default tolerance
_PATIENCE = 2  # consecutive steps with relative change <= tol before an entry stops
_POOL_DELTA = 1e-3  # a probe joins its block's pool only if this fraction of it is outside the pool
_DIAGONAL_WIDTH = 3  # block Lanczos width on diagonal blocks: resolves near-equal top eigenvalues (clusters up to 3)
_BREAKDOWN = 1e3  # a Krylov residual below _BREAKDOWN * eps * (largest output norm) is a breakdown


def krylov_hvp_cost(block_sizes: list[int], steps: int) -> int:
    """HVPs of ``steps`` Krylov rounds over all pairs (2 each) and diagonal blocks (_DIAGONAL_WIDTH each)."""
    blocks = sum(1 for n in block_sizes if n)
    return steps * (blocks * (blocks - 1) + _DIAGONAL_WIDTH * blocks)


@dataclass
class KrylovResult:
    """Output of ``krylov_block_norms``; see ``hessian.InteractionInfo`` for the fields."""

    norms: Tensor
    hvps: int
    calls: int
    steps: Tensor
    converged: Tensor
    pool: str


class _Rows:
    """A (rows, width) tensor grown by doubling; ``view`` is the filled part."""

    def __init__(self, width: int, dtype: torch.dtype, device: torch.device) -> None:
        self.data = torch.empty(0, width, dtype=dtype, device=device)
        self.n = 0

    def extend(self, rows: Tensor, room: float = float("inf")) -> bool:
        """Append rows, growing by at most ``room`` rows; False (nothing added) when they do not fit."""
        needed = self.n + rows.shape[0]
        if needed > self.data.shape[0]:
            capacity = int(min(max(needed, 4, 2 * self.data.shape[0]), self.data.shape[0] + room))
            if capacity < needed:
                return False
            grown = self.data.new_empty(capacity, self.data.shape[1])
            grown[:self.n] = self.data[:self.n]
            self.data = grown
        self.data[self.n:needed] = rows
        self.n = needed
        return True

    @property
    def view(self) -> Tensor:
        return self.data[:self.n]


class _Grid:
    """A (*batch, rows, cols) float64 tensor grown by doubling; entries never written are zero."""

    def __init__(self, batch: tuple[int, ...], device: torch.device) -> None:
        self.data = torch.zeros(*batch, 0, 0, dtype=torch.float64, device=device)

    def ensure(self, rows: int, cols: int) -> Tensor:
        *batch, old_rows, old_cols = self.data.shape
        if rows > old_rows or cols > old_cols:
            grown = self.data.new_zeros(*batch, max(rows, 2 * old_rows) if rows > old_rows else old_rows,
                                        max(cols, 2 * old_cols) if cols > old_cols else old_cols)
            grown[..., :old_rows, :old_cols] = self.data
            self.data = grown
        return self.data


def _cgs2(basis: Tensor, w: Tensor) -> tuple[Tensor, Tensor, float]:
    """Classical Gram-Schmidt twice against orthonormal rows: w = basisᵀ c + r. Returns (c, r, ‖r‖)."""
    c = basis @ w
    r = w - c @ basis
    c2 = basis @ r
    r = r - c2 @ basis
    return c + c2, r, float(r.norm())


def _max_abs_eig(matrix: Tensor) -> float:
    """max|λ| of the symmetric part of a square matrix (0 for an empty one)."""
    if matrix.numel() == 0:
        return 0.0
    return float(torch.linalg.eigvalsh((matrix + matrix.mT) / 2).abs().max())


class _Pools:
    """Every probe applied on each block, and the products that give pooled Rayleigh-Ritz lower bounds.

    Block b's pooled probes P_b = Q_b T_b (Q_b orthonormal rows, T_b upper triangular). K_ij = P_iᵀ H_ij P_j always;
    while the outputs fit in ``room`` rows of N entries, also the outputs Y_b = H P_b and the Grams
    G_b[i] = (H_ib P_b)ᵀ (H_ib P_b).
    """

    def __init__(self, sizes: list[int], dtype: torch.dtype, device: torch.device, room: int) -> None:
        self.sizes, self.device, self.room = sizes, device, room
        numel, count = sum(sizes), len(sizes)
        self.spans = [slice(sum(sizes[:b]), sum(sizes[:b + 1])) for b in range(count)]
        self.q = [_Rows(n, dtype, device) for n in sizes]
        self.t = [_Grid((), device) for _ in sizes]
        self.k = {(i, j): _Grid((), device) for i in range(count) for j in range(i, count)}
        one_sided = room >= count
        self.y = [_Rows(numel, dtype, device) for _ in sizes] if one_sided else None
        self.g = [_Grid((count,), device) for _ in sizes] if one_sided else None

    def add(self, b: int, probe: Tensor) -> bool:
        """Orthonormalise a unit probe into block b's pool; False when less than _POOL_DELTA of it is new."""
        c, r, rho = _cgs2(self.q[b].view, probe)
        if rho <= _POOL_DELTA:
            return False
        self.q[b].extend((r / rho)[None])
        size = self.q[b].n
        t = self.t[b].ensure(size, size)
        t[:size - 1, size - 1] = c.double()
        t[size - 1, size - 1] = rho
        return True

    def record(self, b: int, outputs: Tensor) -> None:
        """Products of the last ``len(outputs)`` probes pooled on block b, whose outputs H p are ``outputs``."""
        size = self.q[b].n
        new = slice(size - outputs.shape[0], size)
        for i, span in enumerate(self.spans):  # P_iᵀ (H p)_i = T_iᵀ Q_iᵀ (H p)_i, for every pooled probe on i
            rows = self.q[i].n
            if rows == 0:
                continue
            values = self.t[i].data[:rows, :rows].mT @ (self.q[i].view @ outputs[:, span].mT).double()
            if i <= b:
                self.k[i, b].ensure(rows, size)[:rows, new] = values
            if i >= b:
                self.k[b, i].ensure(size, rows)[new, :rows] = values.mT
        if self.y is None:
            return
        if not self.y[b].extend(outputs, self.room - sum(y.data.shape[0] for y in self.y)):
            self.y = self.g = None  # over budget: keep the probes only, bounds become two-sided
            return
        stored = self.y[b].view
        g = self.g[b].ensure(size, size)
        for i, span in enumerate(self.spans):
            values = (stored[:, span] @ outputs[:, span].mT).double()
            g[i, :size, new] = values
            g[i, new, :size] = values.mT

    def _inverse_triangles(self, blocks: set[int]) -> dict[int, Tensor]:
        inverses = {}
        for b in blocks:
            t = self.t[b].data[:self.q[b].n, :self.q[b].n]
            inverses[b] = torch.linalg.solve_triangular(t, torch.eye(len(t), dtype=t.dtype, device=t.device),
                                                        upper=True)
        return inverses

    def bounds(self, pairs: list[tuple[int, int]]) -> list[float]:
        """Pooled lower bound for each (i, j): σ_max(H_ij) for i < j, max|λ|(H_ii) for i == j."""
        partners: dict[int, set[int]] = {}
        for i, j in pairs:
            partners.setdefault(i, set()).add(j)
            partners.setdefault(j, set()).add(i)
        inv = self._inverse_triangles(set(partners))
        sigma = {}  # (i, j) -> σ_max(H_ij Q_j), from block j's pool
        if self.y is not None:
            for j, others in partners.items():
                others = sorted(others - {j})
                if others:
                    size = self.q[j].n
                    gram = inv[j].mT @ self.g[j].data[others, :size, :size] @ inv[j]
                    top = torch.linalg.eigvalsh((gram + gram.mT) / 2)[:, -1].clamp_min(0).sqrt().tolist()
                    sigma.update({(i, j): s for i, s in zip(others, top)})
        result = []
        for i, j in pairs:
            if i != j and sigma:
                result.append(max(sigma[i, j], sigma[j, i]))
                continue
            middle = inv[i].mT @ self.k[i, j].data[:self.q[i].n, :self.q[j].n] @ inv[j]  # Q_iᵀ H_ij Q_j
            result.append(_max_abs_eig(middle) if i == j else float(torch.linalg.svdvals(middle)[0]))
        return result


@dataclass
class _Item:
    """One pair i < j (Golub-Kahan on H_ij) or one diagonal block i == j (block Lanczos on H_ii)."""

    i: int
    j: int
    left: _Rows  # U on block i (pair) or X on block i (diagonal), orthonormal rows
    right: _Rows  # V on block j (pair); unused for a diagonal block
    cols: list[Tensor] = field(default_factory=list)  # pair: columns of Uᵀ H_ij V
    applied: int = 0  # diagonal: rows of X already applied
    scale: float = 0.0  # largest Krylov input norm seen: the scale of the breakdown test
    estimate: float = 0.0
    steps: int = 0
    streak: int = 0
    open: bool = True
    converged: bool = False
    broken: bool = False  # the Krylov space is invariant: the estimate is exact

    @property
    def diagonal(self) -> bool:
        return self.i == self.j

    def own_bound(self) -> float:
        """σ_max(Uᵀ H_ij V) of the pair's own Krylov spaces (a diagonal block's space is in its pool)."""
        if self.diagonal or not self.cols or not self.left.n:
            return 0.0
        matrix = torch.zeros(self.left.n, len(self.cols), dtype=torch.float64, device=self.cols[0].device)
        for t, column in enumerate(self.cols):
            matrix[:len(column), t] = column
        return float(torch.linalg.svdvals(matrix)[0])


class _Engine:
    """Runs the rounds: call A (v_t of every pair, the X block of every diagonal), call B (u_t of every pair)."""

    def __init__(self, hvp: Callable[[Tensor], Tensor], sizes: list[int], dtype: torch.dtype,
                 device: torch.device, tol: float, max_steps: int, budget_bytes: float) -> None:
        self.hvp, self.sizes, self.tol, self.max_steps = hvp, sizes, tol, max_steps
        self.dtype, self.device = dtype, device
        self.numel = sum(sizes)
        self.pools = _Pools(sizes, dtype, device, int(budget_bytes // (self.numel * torch.finfo(dtype).bits // 8)))
        self.spans = self.pools.spans
        self.breakdown = _BREAKDOWN * torch.finfo(dtype).eps
        self.hvps = self.calls = 0
        self.one_sided = self.pools.y is not None

    def _extend(self, item: _Item, basis: _Rows, w: Tensor) -> tuple[Tensor, float | None]:
        """Orthogonalise w against the basis and append its new direction; None when it has none (breakdown).

        The test is relative to the item's own scale: block norms of one Hessian span many orders of magnitude.
        """
        c, r, norm = _cgs2(basis.view, w)
        item.scale = max(item.scale, float(w.norm()))
        if norm <= self.breakdown * item.scale:
            return c.double(), None
        basis.extend((r / norm)[None])
        return c.double(), norm

    def _consume(self, item: _Item, phase: str, output: Tensor) -> None:
        if item.diagonal:  # block Lanczos: H x = X c + (new direction)
            self._extend(item, item.left, output[self.spans[item.i]])
        elif phase == "A":  # H_ij v_t = U c + β u_t: column t of Uᵀ H_ij V is (c, β)
            c, beta = self._extend(item, item.left, output[self.spans[item.i]])
            item.broken = beta is None
            item.cols.append(c if beta is None else torch.cat([c, c.new_tensor([beta])]))
        else:  # H_ji u_t = V c + α v_{t+1}
            item.broken = self._extend(item, item.right, output[self.spans[item.j]])[1] is None

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
        if self.one_sided and self.pools.y is None:  # the weaker two-sided bounds lag behind: restart the streaks
            self.one_sided = False
            for item in items:
                item.streak = -1
        for item, pooled in zip(items, self.pools.bounds([(item.i, item.j) for item in items])):
            new = max(item.estimate, pooled, item.own_bound())
            if not final:
                item.broken = item.broken or (item.diagonal and item.left.n == item.applied)
                item.streak = item.streak + 1 if new - item.estimate <= self.tol * new else 0
                item.steps += 1
                if item.broken or item.streak >= _PATIENCE:
                    item.open, item.converged = False, True
                elif item.steps >= self.max_steps:
                    item.open = False
            item.estimate = new

    def _diagonal_requests(self, item: _Item, skip: int = 0) -> list[tuple[int, Tensor, list[tuple[_Item, str]]]]:
        """Apply the rows of X not applied yet (the last Lanczos block), but the first ``skip`` of them."""
        rows = range(item.applied + skip, item.left.n)
        item.applied = item.left.n
        return [(item.i, item.left.view[a], [(item, "A")]) for a in rows]

    def run(self, generator: torch.Generator) -> list[_Item]:
        blocks = [b for b, n in enumerate(self.sizes) if n]
        rows = lambda b: _Rows(self.sizes[b], self.dtype, self.device)  # noqa: E731
        items = [_Item(b, b, rows(b), rows(b)) for b in blocks]
        items += [_Item(i, j, rows(i), rows(j)) for i in blocks for j in blocks if i < j]
        starts = {}
        for item in items[:len(blocks)]:  # random starts of X, the first one shared with the pairs (., b)
            b = item.i
            for _ in range(min(_DIAGONAL_WIDTH, self.sizes[b])):
                start = torch.randn(self.sizes[b], generator=generator, dtype=torch.float64)
                _, start, norm = _cgs2(item.left.view, start.to(dtype=self.dtype, device=self.device))
                item.left.extend((start / norm)[None])
            starts[b] = item.left.view[0]
            for pair in items[len(blocks):]:
                if pair.j == b:
                    pair.right.extend(starts[b][None])
        first = True
        while any(item.open for item in items):
            live = [item for item in items if item.open]
            if first:  # the shared starts serve every item on their block
                requests = [(b, starts[b], [(item, "A") for item in live if item.j == b]) for b in blocks]
                for item in items[:len(blocks)]:
                    requests += self._diagonal_requests(item, skip=1)
                first = False
            else:
                requests = [(item.j, item.right.view[-1], [(item, "A")]) for item in live if not item.diagonal]
                for item in live:
                    if item.diagonal:
                        requests += self._diagonal_requests(item)
            self._call(requests)
            turn = [item for item in live if not item.diagonal and not item.broken]
            if turn:
                self._call([(item.i, item.left.view[-1], [(item, "B")]) for item in turn])
            self._update(live)
        self._update(items, final=True)
        return items


def krylov_block_norms(hvp: Callable[[Tensor], Tensor], block_sizes: list[int], tol: float = 1e-2, seed: int = 0,
                       max_steps: int = 50, store_budget_bytes: float = 256 * 2**20,
                       dtype: torch.dtype | None = None, device: torch.device | None = None) -> KrylovResult:
    """Lower bounds on σ_max(H_ij) for all pairs and max|λ|(H_ii) per block from batched HVPs.

    Args:
        hvp: batched HVP, V (m, N) -> H V (m, N); a ``hessian.BatchedHVP`` supplies dtype and device itself.
        block_sizes: parameters per block (N = their sum); empty blocks get 0.
        tol: relative-change tolerance per entry (two consecutive steps).
        seed: seed of the random starts (CPU generator, so the same on every device).
        max_steps: cap on Krylov steps per entry.
        store_budget_bytes: memory for the stored outputs of the one-sided pooled bound.
        dtype, device: of the probes, when ``hvp`` does not carry them.

    Returns:
        A ``KrylovResult`` with (B, B) float64 norms.
    """
    dtype = dtype or getattr(hvp, "dtype", torch.float64)
    device = device or getattr(hvp, "device", torch.device("cpu"))
    engine = _Engine(hvp, list(block_sizes), dtype, device, tol, max_steps, store_budget_bytes)
    items = engine.run(torch.Generator().manual_seed(seed))
    count = len(block_sizes)
    norms = torch.zeros(count, count, dtype=torch.float64)
    steps = torch.zeros(count, count, dtype=torch.int64)
    converged = torch.tensor([[n == 0 or m == 0 for m in block_sizes] for n in block_sizes])
    for item in items:
        for i, j in ((item.i, item.j), (item.j, item.i)):
            norms[i, j], steps[i, j], converged[i, j] = item.estimate, item.steps, item.converged
    return KrylovResult(norms, engine.hvps, engine.calls, steps, converged,
                        "two-sided" if engine.pools.y is None else "one-sided")
