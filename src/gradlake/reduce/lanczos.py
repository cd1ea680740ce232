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
orthogonal by two passes of classical Gram–Schmidt against every earlier vector (full
reorthogonalisation: without it Ritz values repeat and the quadrature is wrong), and a block
loses the directions the space already holds (deflation by SVD).
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
        s = (g * (1.0 / (theta + delta) - 1.0 / (theta + damping))) @ g.T
        s.diagonal().add_(damping - delta)
        chol = torch.linalg.cholesky(0.5 * (s + s.T))
        form = (torch.cholesky_solve(r, chol) * r).sum(0).clamp_min(0.0)
        return torch.minimum(torch.sqrt(damping * form), res)

    def residuals(self, damping: float) -> torch.Tensor:
        """‖ρ_j‖ [s]: residual norms of the Galerkin solutions of (A + λI) x = s_j."""
        if self.coupling.numel() == 0:
            return torch.zeros(self.coords.shape[1], dtype=self.coords.dtype, device=self.coords.device)
        return torch.linalg.vector_norm(self.coupling @ (self.coords / (self.theta + damping)[:, None]), dim=0)


def _orthonormal_rows(block: torch.Tensor, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q [r, n], C [r, m]) with block = Cᵀ Q and Q orthonormal rows; singular values ≤ floor are dropped."""
    u, s, vh = torch.linalg.svd(block.T, full_matrices=False)
    keep = s > floor
    return u[:, keep].T.contiguous(), s[keep, None] * vh[keep]


def block_lanczos(apply: Apply, start: torch.Tensor, converged: Callable[[Quadrature], bool], max_dim: int,
                  growth: float = 1.1, apply_dtype: torch.dtype | None = None, progress=None) -> Quadrature:
    """Grow K_m(A, start) until ``converged(quadrature)`` or the basis reaches ``max_dim`` rows.

    ``start`` [s, n] float64; the basis, T and the quadrature stay in its dtype, while
    ``apply`` may run in ``apply_dtype`` (e.g. float32 products; the error that adds is the
    caller's to measure). Convergence is checked (one eigendecomposition of T) whenever the
    space has grown by ``growth`` since the last check, and at the end. ``progress``
    (tqdm-like) counts products. Returns the last quadrature; its ``history`` lists the checks.
    """
    n, dtype = start.shape[1], start.dtype
    scale = float(torch.linalg.matrix_norm(start, 2))
    eps = float(torch.finfo(dtype).eps)
    block, coeff = _orthonormal_rows(start, eps * n * scale)
    basis = torch.empty((max(min(max_dim, n), block.shape[0]), n), dtype=dtype, device=start.device)
    proj = torch.zeros((basis.shape[0], basis.shape[0]), dtype=dtype, device=start.device)
    dim, products, checked, history = 0, 0, 0, []
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
        q = basis[:dim]
        column = q @ image.T  # [dim, r]: T's new columns
        rest = image - column.T @ q
        second = q @ rest.T  # the second Gram–Schmidt pass
        rest -= second.T @ q
        column += second
        proj[:dim, dim - r:dim] = column
        proj[dim - r:dim, :dim] = column.T
        nxt, couple = _orthonormal_rows(rest, eps * n * a_norm)
        full = dim + nxt.shape[0] > basis.shape[0] or nxt.shape[0] == 0
        if full or dim >= growth * checked:
            checked = dim
            t = 0.5 * (proj[:dim, :dim] + proj[:dim, :dim].T)
            theta, y = torch.linalg.eigh(t)
            weight = torch.zeros((couple.shape[0], dim), dtype=dtype, device=start.device)
            weight[:, dim - r:] = couple  # W = B E_mᵀ: only the last block couples outwards
            quad = Quadrature(theta.clamp_min(0.0), y[:coeff.shape[0]].T @ coeff, weight @ y, products,
                              roundoff=float(torch.finfo(apply_dtype or dtype).eps), n=n)
            history.append({"dimension": dim, "products": products})
            quad.history = history
            if full or converged(quad):
                return quad
        block = nxt
