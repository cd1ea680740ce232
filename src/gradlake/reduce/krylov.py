"""Solvers for (A + μI) X = B with A symmetric positive semi-definite, given as products.

A is only ever applied: ``apply(V)`` maps a block of vectors V [m, n] (rows are vectors)
to A V. Three pieces, all pure functions of tensors:

- :func:`nystrom` — a randomized Nyström approximation A ≈ U diag(λ̂) Uᵀ of rank ℓ from
  ℓ products (Tropp, Yurtsever, Udell & Cevher 2017, the numerically stable variant with a
  small shift), growing ℓ by doubling until λ̂_ℓ ≤ ``target`` · μ or ``max_rank`` is reached;
- :class:`NystromPreconditioner` — P⁻¹ = (λ̂_ℓ + μ) U (Λ̂ + μI)⁻¹ Uᵀ + (I − UUᵀ)
  (Frangella, Tropp & Udell, SIAM J. Matrix Anal. Appl. 44, 2023): it maps the top ℓ
  eigenvalues of A + μI onto λ̂_ℓ + μ, so the preconditioned condition number is about
  (λ_{ℓ+1} + μ)/μ instead of (λ_1 + μ)/μ;
- :func:`pcg` — preconditioned conjugate gradients on all columns at once, each column
  stopping when its true residual ‖b − (A + μI)x‖ ≤ tol ‖b‖.

:func:`minres_stacked` is the paper's own solve (see reduce.exact, method "paper"), kept to
measure how far it is from converged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

Apply = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Nystrom:
    """A ≈ U diag(eigenvalues) Uᵀ; U [n, ℓ] orthonormal, eigenvalues descending, ≥ 0."""

    u: torch.Tensor
    eigenvalues: torch.Tensor
    products: int  # applications of A spent on the sketch

    @property
    def rank(self) -> int:
        return int(self.eigenvalues.numel())


def nystrom(apply: Apply, n: int, damping: float, rank: int, max_rank: int, target: float = 10.0,
            seed: int = 0, dtype=torch.float64, device=None, progress=None) -> Nystrom:
    """Randomized Nyström approximation of A, doubling the rank from ``rank`` until
    λ̂_ℓ ≤ ``target`` · μ (the preconditioned system then has κ ≲ target + 1) or ℓ = ``max_rank``.

    Each doubling keeps the products already made: the test matrix grows by new Gaussian
    columns orthogonalised against the old ones. ``progress`` (tqdm-like) counts products.
    """
    rank, max_rank = min(rank, n), min(max_rank, n)
    g = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.empty((0, n), dtype=dtype, device=device)  # rows: orthonormal test vectors
    y = torch.empty((0, n), dtype=dtype, device=device)  # rows: A ω
    while True:
        new = torch.randn((rank - omega.shape[0], n), generator=g, dtype=dtype).to(device)
        if omega.shape[0]:
            new = new - (new @ omega.T) @ omega
        new = torch.linalg.qr(new.T).Q.T
        if omega.shape[0]:  # a second pass keeps the basis orthonormal to working precision
            new = torch.linalg.qr((new - (new @ omega.T) @ omega).T).Q.T
        y_new = apply(new)
        if progress is not None:
            progress.update(new.shape[0])
        omega, y = torch.cat([omega, new]), torch.cat([y, y_new])
        approx = _nystrom_factor(omega, y)
        done = approx.eigenvalues[-1] <= target * damping or omega.shape[0] >= max_rank
        if done:
            approx.products = omega.shape[0]
            return approx
        rank = min(2 * omega.shape[0], max_rank)


def _nystrom_factor(omega: torch.Tensor, y: torch.Tensor) -> Nystrom:
    """The stable Nyström factorisation from Ω (rows orthonormal) and Y = A Ω (as rows)."""
    shift = float(torch.finfo(y.dtype).eps * np.sqrt(y.shape[1]) * torch.linalg.matrix_norm(y, 2))
    y_shift = y + shift * omega
    core = omega @ y_shift.T  # Ωᵀ(AΩ + νΩ), symmetric positive definite up to round-off
    core = 0.5 * (core + core.T)
    chol = torch.linalg.cholesky(core)
    b = torch.linalg.solve_triangular(chol, y_shift, upper=False)  # rows of (Y_ν C⁻ᵀ)ᵀ
    u, s, _ = torch.linalg.svd(b.T, full_matrices=False)
    return Nystrom(u, torch.clamp(s * s - shift, min=0.0), 0)


@dataclass
class NystromPreconditioner:
    """P⁻¹ for A + μI from a Nyström approximation of A (see the module docstring)."""

    approx: Nystrom
    damping: float

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        u, lam = self.approx.u, self.approx.eigenvalues
        coeff = r @ u  # [m, ℓ]
        scale = (lam[-1] + self.damping) / (lam + self.damping) - 1.0
        return r + (coeff * scale) @ u.T


@dataclass
class SolveInfo:
    """How a solve ended: iterations, per-column true relative residuals, the sketch used."""

    iterations: int
    relative_residual: np.ndarray
    converged: bool
    method: str = "pcg"
    rank: int = 0
    products: int = 0  # applications of A (one per column per iteration, plus the sketch)
    history: list[float] = field(default_factory=list)  # worst relative residual per iteration
    seconds: float = 0.0
    space: str = "output"
    bound: float = float("nan")  # lanczos: bound on H's error at the run's λ (units of the normalisations)
    sweep: dict = field(default_factory=dict)  # lanczos: {λ: {bound, converged}}


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(1)


def pcg(apply: Apply, b: torch.Tensor, damping: float, tol: float | torch.Tensor, max_iter: int,
        precondition: Callable[[torch.Tensor], torch.Tensor] | None = None, progress=None) -> tuple[torch.Tensor, SolveInfo]:
    """Solve (A + μI) x = b for every row of b [m, n] by (preconditioned) CG; ``tol``: one or per row.

    Only the columns still above tolerance are applied each iteration; a column whose
    recurrence residual meets the tolerance is checked against its true residual and
    restarted from there if it does not (residual replacement). Returns (x, info);
    info.relative_residual is the true ‖b − (A + μI)x‖ / ‖b‖ per column, recomputed at exit.
    ``progress`` gets one update per iteration with the worst current residual as postfix.
    """
    precondition = precondition or (lambda r: r)
    tol = torch.as_tensor(tol, dtype=b.dtype, device=b.device).expand(b.shape[0])
    b_norm = torch.linalg.vector_norm(b, dim=1)
    x = torch.zeros_like(b)
    r = b.clone()
    z = precondition(r)
    p = z.clone()
    rz = _dot(r, z)
    active = b_norm > 0
    history, products, it = [], 0, 0
    for it in range(1, max_iter + 1):
        idx = active.nonzero().squeeze(1)
        if idx.numel() == 0:
            it -= 1
            break
        ap = apply(p[idx]) + damping * p[idx]
        products += idx.numel()
        alpha = rz[idx] / _dot(p[idx], ap)
        x[idx] += alpha[:, None] * p[idx]
        r[idx] -= alpha[:, None] * ap
        z_idx = precondition(r[idx])
        rz_new = _dot(r[idx], z_idx)
        p[idx] = z_idx + (rz_new / rz[idx])[:, None] * p[idx]
        rz[idx] = rz_new
        rel = torch.linalg.vector_norm(r, dim=1) / b_norm.clamp_min(torch.finfo(b.dtype).tiny)
        done = (rel <= tol) & active
        if done.any():  # residual replacement: the recurrence drifts from the true residual
            d = done.nonzero().squeeze(1)
            r[d] = b[d] - apply(x[d]) - damping * x[d]
            products += d.numel()
            z_d = precondition(r[d])
            p[d], rz[d] = z_d, _dot(r[d], z_d)
            rel[d] = torch.linalg.vector_norm(r[d], dim=1) / b_norm[d].clamp_min(torch.finfo(b.dtype).tiny)
        active = rel > tol
        worst = float(rel.max())
        history.append(worst)
        if progress is not None:
            progress.set_postfix(iteration=it, residual=f"{worst:.2e}", active=int(active.sum()))
            progress.update(1)
    # The recurrence residual drifts from the true one in finite precision: report the true one.
    true = b - apply(x) - damping * x
    products += b.shape[0]
    rel = (torch.linalg.vector_norm(true, dim=1) / torch.clamp(b_norm, min=torch.finfo(b.dtype).tiny)).cpu().numpy()
    return x, SolveInfo(it, rel, bool((rel <= tol.cpu().numpy() * 1.01).all()), "pcg", 0, products, history)


def minres_stacked(apply: Apply, b: torch.Tensor, damping: float, rtol: float, restart: int, max_iter: int,
                   progress=None) -> tuple[torch.Tensor, SolveInfo]:
    """MINRES on (A + μI) X = B with every row of B [m, n] stacked into one vector, restarted every
    ``restart`` iterations from the current X, stopped when ‖B − (A + μI)X‖_F ≤ rtol ‖B‖_F.

    The PDEHats solve (its CRAIG-MR on J is MINRES on JJᵀ + λI): the scalars of the recurrence
    are shared by all rows, so one stacked norm decides for every right-hand side. Runs in
    ``b``'s dtype. Returns (X, info); info.converged says whether the stop was reached.
    """
    x, products, history, it = torch.zeros_like(b), 0, [], 0
    b_norm = float(torch.linalg.vector_norm(b))
    while True:
        r = b - apply(x) - damping * x
        products += b.shape[0]
        rel = float(torch.linalg.vector_norm(r)) / max(b_norm, 1e-300)
        if rel <= rtol or it >= max_iter:
            break
        beta = float(torch.linalg.vector_norm(r))
        y, r1, r2 = r, r, r
        old_beta, dbar, eps_ln, phibar, cs, sn = 0.0, 0.0, 0.0, beta, -1.0, 0.0
        w, w2 = torch.zeros_like(b), torch.zeros_like(b)
        for k in range(min(restart, max_iter - it)):  # Paige & Saunders' recurrences
            v = y / beta
            y = apply(v) + damping * v
            products += b.shape[0]
            if k:
                y = y - (beta / old_beta) * r1
            alpha = float((v * y).sum())
            y = y - (alpha / beta) * r2
            r1, r2 = r2, y
            old_beta, beta = beta, float(torch.linalg.vector_norm(y))
            old_eps = eps_ln
            delta = cs * dbar + sn * alpha
            gbar = sn * dbar - cs * alpha
            eps_ln, dbar = sn * beta, -cs * beta
            gamma = max(float(np.hypot(gbar, beta)), 1e-300)
            cs, sn = gbar / gamma, beta / gamma
            phi, phibar = cs * phibar, sn * phibar
            w1, w2 = w2, w
            w = (v - old_eps * w1 - delta * w2) / gamma
            x = x + phi * w
            it += 1
            history.append(phibar / max(b_norm, 1e-300))
            if progress is not None:
                progress.set_postfix(residual=f"{history[-1]:.2e}")
                progress.update(1)
            if history[-1] <= rtol or beta <= 1e-300:
                break
    per_row = (torch.linalg.vector_norm(r, dim=1) / torch.linalg.vector_norm(b, dim=1).clamp_min(1e-300)).cpu()
    return x, SolveInfo(it, per_row.double().numpy(), rel <= rtol, "paper", 0, products, history)
