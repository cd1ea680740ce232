"""The paper's exact minibatch influence, matrix-free (torch.func JVP/VJP + Krylov).

On a batch B with Jacobian J_B (outputs × p) and η_B = J_BᵀJ_B,

    Π = J_B (η_B + λI)⁻¹ J_Bᵀ = I − λ (K + λI)⁻¹,   K = J_B J_Bᵀ (output-space NTK),
    H_AB(i, j) = ⟨r_{A,i}, (Π b_j)_i⟩,   b_j = r_{B,j} placed at sample j (zero elsewhere),

which equals g_{A,i}ᵀ (η_B + λI)⁻¹ g_{B,j} with g = Jᵀr. (K + λI) y_j = b_j is solved by
conjugate gradients in output space (damped CGNE, CRAIG's iteration in exact arithmetic),
one JVP and one VJP per iteration, several right-hand sides at once. The solve stops when
‖b_j − (K + λI) y_j‖ ≤ rtol ‖b_j‖ for every column; then, since ‖λ(K + λI)⁻¹‖ ≤ 1,

    |Ĥ_AB(i, j) − H_AB(i, j)| ≤ rtol ‖r_{A,i}‖ ‖r_{B,j}‖        (the stated tolerance).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vjp, vmap

from gradlake.errors import GradlakeError, InputError


class BatchJacobian:
    """J_B of ``model`` at a fixed batch of inputs, as products (no Jacobian is formed).

    The model runs in eval mode in ``dtype`` (float64 by default, so the Krylov tolerance
    is not limited by float32 round-off).
    """

    def __init__(self, model: nn.Module, inputs: torch.Tensor, dtype=torch.float64):
        model = model.eval()
        device = next(model.parameters()).device
        self.params = {n: p.detach().to(device, dtype) for n, p in model.named_parameters()}
        buffers = {n: b.detach().to(device, dtype) if b.is_floating_point() else b
                   for n, b in model.named_buffers()}
        self.inputs = torch.as_tensor(inputs).to(device, dtype)

        def forward(params):
            return functional_call(model, (params, buffers), (self.inputs,))

        self._forward = forward
        self.output, self._vjp = vjp(forward, self.params)
        self.output = self.output.detach()
        # u -> Jᵀu is linear, so its VJP at any point is t -> J t: a JVP that reuses the
        # saved forward graph (much cheaper than forward-mode AD through the model).
        _, self._jvp = vjp(lambda u: self._vjp(u)[0], torch.zeros_like(self.output))

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def jvp(self, tangents: dict[str, torch.Tensor]) -> torch.Tensor:
        """J t for a batch of parameter-space tangents (leading axis: columns)."""
        return vmap(lambda t: self._jvp(t)[0])(tangents)

    def vjp(self, cotangents: torch.Tensor) -> dict[str, torch.Tensor]:
        """Jᵀ u for a batch of output-space cotangents [columns, *output]."""
        return vmap(lambda u: self._vjp(u)[0])(cotangents)

    def gram(self, u: torch.Tensor) -> torch.Tensor:
        """K u = J Jᵀ u for columns u [columns, *output]."""
        return self.jvp(self.vjp(u))


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).flatten(1).sum(1)


def _expand(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, *([1] * (like.dim() - 1)))


@dataclass
class SolveInfo:
    iterations: int
    relative_residual: np.ndarray  # per column, ‖b − (K+λI)y‖ / ‖b‖ at exit
    converged: bool


def conjugate_gradients(apply, b: torch.Tensor, damping: float, rtol: float, max_iter: int):
    """Solve (K + λI) y = b for every column of b [columns, ...]; ``apply(u)`` = K u.

    Each column stops updating once ‖residual‖ ≤ rtol ‖b‖. Returns (y, SolveInfo).
    """
    y = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    b_norm = _dot(b, b).sqrt()
    rr = _dot(r, r)
    target = (rtol * b_norm) ** 2
    it = 0
    for it in range(1, max_iter + 1):
        active = rr > target
        if not active.any():
            it -= 1
            break
        ap = apply(p) + damping * p
        alpha = torch.where(active, rr / _dot(p, ap), torch.zeros_like(rr))
        y = y + _expand(alpha, y) * p
        r = r - _expand(alpha, r) * ap
        rr_new = _dot(r, r)
        beta = torch.where(active, rr_new / rr, torch.zeros_like(rr))
        p = r + _expand(beta, p) * p
        rr = torch.where(active, rr_new, rr)
    # The recurrence residual drifts from the true one in finite precision: report the true one.
    true = b - apply(y) - damping * y
    rel = (_dot(true, true).sqrt() / torch.clamp(b_norm, min=torch.finfo(b.dtype).tiny)).cpu().numpy()
    return y, SolveInfo(it, rel, bool((rel <= rtol * 1.01).all()))


def lanczos_top(apply, shape, damping: float, steps: int = 40, seed: int = 0, dtype=torch.float64,
                device=None) -> dict[str, float]:
    """Largest eigenvalue of K + λI by Lanczos with full reorthogonalisation.

    Returns the top Ritz value and its residual bound |β_m s_m| (the distance of the Ritz
    value to an eigenvalue is at most this bound).
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(shape, generator=g, dtype=dtype).to(device)
    q = q / q.norm()
    basis, alphas, betas = [q], [], []
    for _ in range(steps):
        w = apply(basis[-1][None])[0] + damping * basis[-1]
        alpha = float((w * basis[-1]).sum())
        for v in basis:  # full reorthogonalisation (twice is enough)
            w = w - (w * v).sum() * v
        for v in basis:
            w = w - (w * v).sum() * v
        alphas.append(alpha)
        beta = float(w.norm())
        if beta < 1e-12 * max(abs(a) for a in alphas):
            betas.append(0.0)
            break
        betas.append(beta)
        basis.append(w / beta)
    m = len(alphas)
    tri = np.diag(alphas) + np.diag(betas[: m - 1], 1) + np.diag(betas[: m - 1], -1)
    values, vectors = np.linalg.eigh(tri)
    return {"top": float(values[-1]), "bound": float(abs(betas[m - 1] * vectors[-1, -1])),
            "steps": m}


def exact_influence(jac: BatchJacobian, residuals: dict[str, torch.Tensor], pairs, damping: float,
                    rtol: float = 1e-6, max_iter: int = 2000, block: int = 8, progress=None):
    """H_AB [B, B] for each pair "AB" (response A, perturbation B) on the batch of ``jac``.

    ``residuals``: {observable: r [B, *sample_shape]}. Returns ({pair: float64 numpy [B, B]},
    {perturbation observable: SolveInfo}). Raises GradlakeError if a solve does not reach
    rtol within max_iter iterations.
    """
    if not damping > 0:
        raise InputError(f"exact damping: expected λ > 0, got {damping!r}")
    n = jac.output.shape[0]
    dtype, device = jac.output.dtype, jac.output.device
    res = {o: r.to(device, dtype) for o, r in residuals.items()}
    for o, r in res.items():
        if r.shape != jac.output.shape:
            raise InputError(f"exact residual {o!r}: expected shape {list(jac.output.shape)}, got {list(r.shape)}")
    out = {pair: np.zeros((n, n)) for pair in pairs}
    infos = {}
    for obs_b in sorted({pair[1] for pair in pairs}):
        iters, rel = 0, []
        for start in range(0, n, block):
            cols = range(start, min(start + block, n))
            b = torch.zeros((len(cols), *jac.output.shape), dtype=dtype, device=device)
            for c, j in enumerate(cols):
                b[c, j] = res[obs_b][j]
            y, info = conjugate_gradients(jac.gram, b, damping, rtol, max_iter)
            if not info.converged:
                raise GradlakeError(
                    f"exact: CG did not reach rtol={rtol:g} in {max_iter} iterations "
                    f"(worst relative residual {info.relative_residual.max():.3g}); raise max_iter or λ")
            pi_b = b - damping * y  # Π b_j
            for pair in pairs:
                if pair[1] == obs_b:
                    h = torch.einsum("i...,ji...->ij", res[pair[0]], pi_b)
                    out[pair][:, list(cols)] = h.cpu().numpy()
            iters = max(iters, info.iterations)
            rel.append(info.relative_residual)
            if progress is not None:
                progress.update(len(cols))
        infos[obs_b] = SolveInfo(iters, np.concatenate(rel), True)
    return out, infos


# --------------------------------------------------------------------------- agreement
def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 with ties given their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    if (counts > 1).any():
        sums = np.bincount(inverse, weights=ranks)
        ranks = sums[inverse] / counts[inverse]
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of the finite entry pairs of two arrays."""
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 2:
        return float("nan")
    ra, rb = _ranks(a[ok]), _ranks(b[ok])
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def relative_frobenius(estimate: np.ndarray, exact: np.ndarray) -> float:
    """‖estimate − exact‖_F / ‖exact‖_F."""
    return float(np.linalg.norm(estimate - exact) / np.linalg.norm(exact))


def normalize_matrix(h: np.ndarray, norm: str, h_aa_diag=None, h_bb_diag=None) -> np.ndarray:
    """A dense H [B, B] under a normalisation; the reference set of row-std is the batch's
    columns, cosine needs the diagonals of H_AA and H_BB."""
    if norm == "none":
        return h
    if norm == "row-std":
        std = h.std(axis=1)
        return np.divide(h, std[:, None], out=np.zeros_like(h), where=std[:, None] > 0)
    if norm == "cosine":
        denom = np.sqrt(np.outer(h_aa_diag, h_bb_diag))
        return np.divide(h, denom, out=np.zeros_like(h), where=denom > 0)
    raise InputError(f"normalisation {norm!r}: expected none, row-std or cosine")
