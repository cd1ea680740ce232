"""Block Lanczos quadrature: Sᵀ f(A) S for every f of a family from one Krylov space.

A is symmetric positive semi-definite and only applied (``apply(V)`` maps rows V [m, n] to
rows of A V). For a start block S [s, n] (rows are vectors), the block Krylov space
K_m(A, S) = span{S, AS, …, A^{m−1}S} has an orthonormal basis Q [d, n] (rows) and A's
projection T = Q A Qᵀ [d, d] = Y diag(θ) Yᵀ (θ: the Ritz values). With S = Cᵀ Q₁ (C [d, s],
zero below the first block), block Gauss quadrature gives

    Sᵀ f(A) S ≈ Cᵀ Y diag(f(θ)) Yᵀ C = Zᵀ diag(f(θ)) Z,      Z = Yᵀ C,

exactly for polynomials of degree < 2m. Nothing in the space depends on a shift, so one run
answers every λ of a sweep (f(θ) = θ/(θ + λ) for the hat matrix, 1/(θ + λ) for solves).

Error bound. The Galerkin solution x̂_j = Qᵀ (T + λ)⁻¹ C e_j of (A + λI) x = s_j has the
residual ρ_j = s_j − (A + λI) x̂_j = −W y_j, where W [r, d] couples the space to its next
block (A Qᵀ = Qᵀ T + (next block)ᵀ W), and ρ_j ⟂ Q. For h(i, j) = s_iᵀ A (A + λI)⁻¹ s_j the
quadrature error is therefore quadratic in the residuals:

    ĥ(i, j) − h(i, j) = λ ρ_iᵀ (A + λI)⁻¹ ρ_j,      |ĥ(i, j) − h(i, j)| ≤ ‖ρ_i‖ ‖ρ_j‖,

and ĥ − h is positive semi-definite (the estimate converges from above). A is PSD, so the
Schur complement of A − aI (a ≤ λ_min(A)) on the space's complement is PSD too, which bounds
the next block's (A + λI)⁻¹ by S⁻¹ with S = (a + λ)I + G diag(1/(θ − a) − 1/(θ + λ)) Gᵀ
(the block Gauss–Radau rule with a node at a; G = W Y). With R = G (θ + λ)⁻¹ Z the residuals'
coordinates (ρ_j = −(next block)ᵀ R e_j):

    0 ⪯ ĥ − h ⪯ λ Rᵀ S⁻¹ R,      |ĥ(i, j) − h(i, j)| ≤ e_i e_j,  e_j² = λ (Rᵀ S⁻¹ R)_jj ≤ ‖ρ_j‖²

(:meth:`Quadrature.error_factors`): tight once the space holds A's eigenvalues below λ, where
‖ρ‖ alone overstates the error by orders of magnitude. Round-off in the
products (unit u) adds a floor of about u‖A‖/λ ‖s_i‖‖s_j‖ that no space removes
(:meth:`Quadrature.floor`): float32 products cannot resolve λ ≪ 1e-7‖A‖. The basis is kept
orthogonal by the recurrence's projection on the last two blocks, then Gram–Schmidt (by blocks of rows)
against every earlier vector, repeated where a pass removes much (full reorthogonalisation:
without it Ritz values repeat and the quadrature is wrong), and a block loses the directions
the space already holds (deflation by SVD). The stop is screened after every block without an
eigendecomposition (:class:`Screen`); T's eigendecomposition proves it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

Apply = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Quadrature:
    """Sᵀ f(A) S for any f from Ritz values θ [d] and coordinates Z [d, s]; ``coupling`` G = W Y [r, d]
    gives the Galerkin residuals (zero when the space is invariant, e.g. the dense spectrum)."""

    theta: torch.Tensor
    coords: torch.Tensor
    coupling: torch.Tensor
    products: int = 0
    history: list[dict] = field(default_factory=list)
    roundoff: float = 0.0  # unit round-off of the products A·v (their error is about roundoff · ‖A‖)
    n: int = 1  # the side of A

    def form(self, weights: torch.Tensor, left: slice | torch.Tensor = slice(None),
             right: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        """Z[:, left]ᵀ diag(weights) Z[:, right] [len(left), len(right)]."""
        return self.coords[:, left].T @ (weights[:, None] * self.coords[:, right])

    def hat(self, damping: float, left=slice(None), right=slice(None)) -> torch.Tensor:
        """Sᵀ A (A + λI)⁻¹ S on the chosen columns (the exact minibatch H in output space)."""
        return self.form(self.theta / (self.theta + damping), left, right)

    def floor(self, damping: float) -> torch.Tensor:
        """Per-column factor f_j with round-off floor f_i f_j: products carry errors of about
        u‖A‖, which move h(i, j) by up to u‖A‖/λ ‖s_i‖‖s_j‖ however large the space."""
        scale = self.roundoff * float(self.theta.max()) / damping if self.theta.numel() else 0.0
        return np.sqrt(scale) * torch.linalg.vector_norm(self.coords, dim=0)

    def error_factors(self, damping: float) -> torch.Tensor:
        """e [s] with |ĥ(i, j) − h(i, j)| ≤ e_i e_j (the Gauss–Radau bound of the module docstring).

        The node a = −δ sits below 0 by δ = √n u‖A‖, the size of the products' round-off, so the
        bound holds for the matrix the products apply (A to within that round-off; :meth:`floor`).
        Where δ is not small beside λ it falls back to ‖ρ_j‖."""
        res = self.residuals(damping)
        if self.coupling.numel() == 0:
            return res
        theta, g = self.theta, self.coupling
        delta = np.sqrt(self.n) * self.roundoff * float(theta.max())
        if not delta < 0.5 * damping:
            return res
        r = g @ (self.coords / (theta + damping)[:, None])
        return _radau(r, (g * (1.0 / (theta + delta) - 1.0 / (theta + damping))) @ g.T, res, damping, delta)

    @property
    def dimension(self) -> int:
        return int(self.theta.numel())

    def residuals(self, damping: float) -> torch.Tensor:
        """‖ρ_j‖ [s]: residual norms of the Galerkin solutions of (A + λI) x = s_j."""
        if self.coupling.numel() == 0:
            return torch.zeros(self.coords.shape[1], dtype=self.coords.dtype, device=self.coords.device)
        return torch.linalg.vector_norm(self.coupling @ (self.coords / (self.theta + damping)[:, None]), dim=0)


def _radau(r: torch.Tensor, inner: torch.Tensor, res: torch.Tensor, damping: float, delta: float) -> torch.Tensor:
    """min(√(λ diag(Rᵀ S⁻¹ R)), ‖ρ_j‖) with S = (λ − δ)I + ``inner``, inner = W((T + δ)⁻¹ − (T + λ)⁻¹)Wᵀ."""
    inner = 0.5 * (inner + inner.T)
    inner.diagonal().add_(damping - delta)
    chol = torch.linalg.cholesky(inner)
    form = (torch.cholesky_solve(r, chol) * r).sum(0).clamp_min(0.0)
    return torch.minimum(torch.sqrt(damping * form), res)


class Screen:
    """The quadrature at fixed shifts without an eigendecomposition: a block Cholesky of T + λI that
    grows with T by one block (O(r³) per block and shift), T taken block tridiagonal as it is in
    exact arithmetic. With y = L⁻¹E₁C (forward substitution), Sᵀ A (A + λI)⁻¹ S ≈ CᵀC − λ yᵀy,
    the residual coordinates R = W L_mm⁻ᵀ y_m and W(T + λ)⁻¹Wᵀ = (L_mm⁻¹Wᵀ)ᵀ(L_mm⁻¹Wᵀ) need only the
    last block, so :func:`block_lanczos` evaluates it after every block. A cheap estimate of
    :class:`Quadrature`'s answers (δ and ‖A‖ from below), never a proof: a shift whose factor fails
    reads as converged, to be judged by the eigendecomposition."""

    def __init__(self, coeff: torch.Tensor, shifts, n: int, roundoff: float):
        self.gram, self.norms = coeff.T @ coeff, torch.linalg.vector_norm(coeff, dim=0)
        self.coeff, self.n, self.roundoff = coeff, n, roundoff
        self.shifts, self.top, self.delta, self.dimension, self.products = tuple(shifts), 0.0, None, 0, 0
        self.state: dict = {}  # λ, or "node" for T + δI: (L_mm, y_m, yᵀy), None once its factor failed

    def extend(self, diag: torch.Tensor, sub: torch.Tensor | None, couple: torch.Tensor, products: int) -> None:
        """Append T's next diagonal block and the block left of it (None for the first), and W's ``couple``."""
        diag = 0.5 * (diag + diag.T)
        self.top = max(self.top, float(torch.linalg.eigvalsh(diag)[-1]))
        if self.delta is None:
            self.delta = np.sqrt(self.n) * self.roundoff * self.top
        for key, shift in (*((s, s) for s in self.shifts), ("node", self.delta)):
            old = self.state.get(key, ())
            if old is None:
                continue
            m = diag + shift * torch.eye(diag.shape[0], dtype=diag.dtype, device=diag.device)
            if old:
                left = torch.linalg.solve_triangular(old[0], sub.T, upper=False).T  # E L_prev⁻ᵀ
                m, rhs, acc = m - left @ left.T, -left @ old[1], old[2]
            else:
                rhs, acc = self.coeff, 0.0
            chol, info = torch.linalg.cholesky_ex(m)
            y = torch.linalg.solve_triangular(chol, rhs, upper=False)
            self.state[key] = None if int(info) else (chol, y, acc + y.T @ y)
        self.couple, self.dimension, self.products = couple, self.dimension + diag.shape[0], products

    def hat(self, damping: float, left=slice(None), right=slice(None)) -> torch.Tensor:
        state = self.state[damping]
        return (self.gram if state is None else self.gram - damping * state[2])[left][:, right]

    def floor(self, damping: float) -> torch.Tensor:
        return np.sqrt(self.roundoff * self.top / damping) * self.norms

    def error_factors(self, damping: float) -> torch.Tensor:
        state, node = self.state[damping], self.state["node"]
        if state is None:
            return torch.zeros_like(self.norms)
        r = self.couple @ torch.linalg.solve_triangular(state[0].T, state[1], upper=True)
        res = torch.linalg.vector_norm(r, dim=0)
        if node is None or not self.delta < 0.5 * damping:
            return res
        p, q = (torch.linalg.solve_triangular(c[0], self.couple.T, upper=False) for c in (node, state))
        return _radau(r, p.T @ p - q.T @ q, res, damping, self.delta)


def _orthonormal_rows(block: torch.Tensor, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q [r, n], C [r, m]) with block = Cᵀ Q and Q orthonormal rows; singular values ≤ floor are dropped."""
    u, s, vh = torch.linalg.svd(block.T, full_matrices=False)
    keep = s > floor
    return u[:, keep].T.contiguous(), s[keep, None] * vh[keep]


def block_lanczos(apply: Apply, start: torch.Tensor, converged: Callable, max_dim: int, shifts=None,
                  growth: float = 1.1, apply_dtype: torch.dtype | None = None, progress=None) -> Quadrature:
    """Grow K_m(A, start) until ``converged(quadrature)`` or the basis reaches ``max_dim`` rows.

    ``start`` [s, n] float64; the basis, T and the quadrature stay in its dtype, while
    ``apply`` may run in ``apply_dtype`` (e.g. float32 products; the error that adds is the
    caller's to measure). Convergence is checked (one eigendecomposition of T) whenever the
    space has grown by ``growth`` since the last check, and at the end; given ``shifts`` (the λ
    ``converged`` asks about), ``converged(screen)`` (:class:`Screen`) runs after every block
    instead and the check follows only where it passes. ``progress`` (tqdm-like) counts
    products. Returns the last quadrature; its ``history`` lists the checks.
    """
    n, dtype = start.shape[1], start.dtype
    scale = float(torch.linalg.matrix_norm(start, 2))
    eps = float(torch.finfo(dtype).eps)
    roundoff = float(torch.finfo(apply_dtype or dtype).eps)
    block, coeff = _orthonormal_rows(start, eps * n * scale)
    basis = torch.empty((max(min(max_dim, n), block.shape[0]), n), dtype=dtype, device=start.device)
    proj = torch.empty((basis.shape[0], basis.shape[0]), dtype=dtype, device=start.device)  # written as it grows
    screen = None if shifts is None else Screen(coeff, shifts, n, roundoff)
    dim, lo, products, checked, history = 0, 0, 0, 0, []
    a_norm = 0.0
    while True:
        r = block.shape[0]
        basis[dim:dim + r] = block
        dim += r
        image = apply(block.to(apply_dtype) if apply_dtype else block).to(dtype)
        products += r
        if progress is not None:
            progress.update(r)
        a_norm = max(a_norm, float(torch.linalg.matrix_norm(image, 2)))
        column = torch.zeros((dim, r), dtype=dtype, device=start.device)  # T's new columns
        column[lo:] = basis[lo:dim] @ image.T  # the three-term recurrence: the last two blocks
        rest = image - column[lo:].T @ basis[lo:dim]
        for _ in range(2):  # then against every vector, twice where a pass removes much (Daniel et al. 1976)
            before = torch.linalg.vector_norm(rest, dim=1)
            for i in range(0, dim, 32):  # by blocks of rows that stay in cache for both products
                again = basis[i:min(i + 32, dim)] @ rest.T
                rest -= again.T @ basis[i:min(i + 32, dim)]
                column[i:i + 32] += again
            if (torch.linalg.vector_norm(rest, dim=1) > 0.7 * before).all():
                break
        proj[:dim, dim - r:dim] = column
        proj[dim - r:dim, :dim] = column.T
        nxt, couple = _orthonormal_rows(rest, eps * n * a_norm)
        full = dim + nxt.shape[0] > basis.shape[0] or nxt.shape[0] == 0
        if screen is not None and not full:
            screen.extend(column[dim - r:], column[lo:dim - r].T if dim > r else None, couple, products)
        if full or (converged(screen) and dim >= growth * checked if screen else dim >= growth * checked):
            checked = dim
            t = 0.5 * (proj[:dim, :dim] + proj[:dim, :dim].T)
            theta, y = torch.linalg.eigh(t)
            weight = torch.zeros((couple.shape[0], dim), dtype=dtype, device=start.device)
            weight[:, dim - r:] = couple  # W = B E_mᵀ: only the last block couples outwards
            quad = Quadrature(theta.clamp_min(0.0), y[:coeff.shape[0]].T @ coeff, weight @ y, products,
                              roundoff=roundoff, n=n)
            history.append({"dimension": dim, "products": products})
            quad.history = history
            if full or converged(quad):
                return quad
        lo = dim - r
        block = nxt
