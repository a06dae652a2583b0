"""Building blocks of the Krylov block-norm estimators: growable row stores, CGS2, Ritz values with residual
bounds, and the per-block pools of applied probes that give free Rayleigh-Ritz lower bounds.

Pure tensor code, no HVPs: ``hessian_krylov`` (all-pairs block norms) and ``hessian_spectrum`` (top eigenvalues)
drive it. Pools: see ``hessian_krylov``'s module docstring for the algorithm.
"""
from __future__ import annotations

import torch
from torch import Tensor

POOL_DELTA = 1e-3  # a probe joins its block's pool only if this fraction of it is outside the pool


class Rows:
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


class Grid:
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


def cgs2(basis: Tensor, w: Tensor) -> tuple[Tensor, Tensor, float]:
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


def padded(columns: list[Tensor], rows: int) -> Tensor:
    """Columns of different lengths (coefficients on a growing basis) as a zero-padded (rows, len) float64 matrix."""
    device = columns[0].device if columns else None
    matrix = torch.zeros(rows, len(columns), dtype=torch.float64, device=device)
    for t, column in enumerate(columns):
        matrix[:len(column), t] = column
    return matrix


def symmetric_ritz(coefficients: Tensor) -> tuple[Tensor, Tensor]:
    """Ritz values of a symmetric operator and the residual norm of each Ritz pair, from Lanczos coefficients.

    Args:
        coefficients: C, (rows, a) with H X_a = X C for orthonormal rows X (its first a rows X_a applied).

    Returns:
        (values, residuals), ascending values of T = C[:a] (symmetrised) and ‖H x - θ x‖ of each Ritz vector x.
        Each interval [θ - r, θ + r] holds an eigenvalue of H (Krylov-Weinstein bound).
    """
    applied = coefficients.shape[1]
    if applied == 0:
        return coefficients.new_zeros(0), coefficients.new_zeros(0)
    square = coefficients[:applied]
    values, vectors = torch.linalg.eigh((square + square.mT) / 2)
    lifted = torch.cat([vectors, vectors.new_zeros(coefficients.shape[0] - applied, applied)])
    return values, (coefficients @ vectors - lifted * values).norm(dim=0)


def singular_ritz(forward: Tensor, backward: Tensor) -> tuple[float, float]:
    """Top Ritz singular value of A from Golub-Kahan coefficients, and its residual bound.

    Args:
        forward: M, (|U|, a) with A V_a = U M (U orthonormal, every row applied by Aᵀ).
        backward: N, (|V|, |U|) with Aᵀ U = V N (V orthonormal, its first a rows V_a).

    Returns:
        (θ, δ): θ = σ_max(M) and δ = ‖[A v - θ u; Aᵀ u - θ v]‖/√2 for its Ritz vectors, so that the dilation
        [[0, A], [Aᵀ, 0]] has an eigenvalue, i.e. A a singular value, within δ of θ.
    """
    if forward.numel() == 0:
        return 0.0, 0.0
    left, values, right_h = torch.linalg.svd(forward, full_matrices=False)
    theta, u, v = values[0], left[:, 0], right_h[0]
    lifted = torch.cat([v, v.new_zeros(backward.shape[0] - len(v))])
    r_forward = forward @ v - theta * u
    r_backward = backward[:, :len(u)] @ u - theta * lifted
    return float(theta), float(torch.sqrt((r_forward.square().sum() + r_backward.square().sum()) / 2))


class Pools:
    """Every probe applied on each block, and the products that give pooled Rayleigh-Ritz lower bounds.

    Block b's pooled probes P_b = Q_b T_b (Q_b orthonormal rows, T_b upper triangular). K_ij = P_iᵀ H_ij P_j always;
    while the outputs fit in ``room`` rows of N entries, also the outputs Y_b = H P_b and the Grams
    G_b[i] = (H_ib P_b)ᵀ (H_ib P_b).
    """

    def __init__(self, sizes: list[int], dtype: torch.dtype, device: torch.device, room: int) -> None:
        self.sizes, self.device, self.room = sizes, device, room
        numel, count = sum(sizes), len(sizes)
        self.spans = [slice(sum(sizes[:b]), sum(sizes[:b + 1])) for b in range(count)]
        self.q = [Rows(n, dtype, device) for n in sizes]
        self.t = [Grid((), device) for _ in sizes]
        self.k = {(i, j): Grid((), device) for i in range(count) for j in range(i, count)}
        one_sided = room >= count
        self.y = [Rows(numel, dtype, device) for _ in sizes] if one_sided else None
        self.g = [Grid((count,), device) for _ in sizes] if one_sided else None

    def add(self, b: int, probe: Tensor) -> bool:
        """Orthonormalise a unit probe into block b's pool; False when less than POOL_DELTA of it is new."""
        c, r, rho = cgs2(self.q[b].view, probe)
        if rho <= POOL_DELTA:
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
