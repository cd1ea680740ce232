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

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vjp, vmap

from gradlake.errors import GradlakeError, InputError
from gradlake.reduce.krylov import NystromPreconditioner, SolveInfo, cholesky_factor, nystrom, pcg


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

        self._model, self._buffers, self._independent = model, buffers, False

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

    def flat(self, tangents: dict[str, torch.Tensor]) -> torch.Tensor:
        """Parameter-space vectors as rows [m, p] (``named_parameters`` order); one dict entry
        without a leading axis is taken as one row."""
        return torch.cat([tangents[k].reshape(-1, self.params[k].numel()) for k in self.params], 1)

    def unflat(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows [m, p] back to a dict of [m, *shape] tangents."""
        parts = torch.split(v, [t.numel() for t in self.params.values()], dim=1)
        return {k: part.reshape(v.shape[0], *t.shape) for (k, t), part in zip(self.params.items(), parts)}

    def placed(self, residual: torch.Tensor) -> torch.Tensor:
        """Rows b_j [B, outputs]: sample j's residual r_j at sample j, zero elsewhere."""
        n = self.output.shape[0]
        b = torch.zeros((n, *self.output.shape), dtype=self.output.dtype, device=self.output.device)
        b[torch.arange(n), torch.arange(n)] = residual.to(b)
        return b.reshape(n, -1)

    def sample_jacobians(self, chunk: int = 256):
        """Yield J_i [d, p] (columns in ``named_parameters`` order) sample by sample.

        Each comes from reverse mode on that sample alone, N times cheaper than cotangents
        pushed through the whole batch. That needs a batch-independent model (no batch
        statistics), which is checked on the first call against one batch VJP.
        """
        def single(i):
            def f(params):
                return functional_call(self._model, (params, self._buffers), (self.inputs[i:i + 1],))[0]
            return self.flat(torch.func.jacrev(f, chunk_size=chunk)(self.params))

        if not self._independent:
            u = torch.randn(self.output.shape, dtype=self.output.dtype, generator=torch.Generator().manual_seed(0))
            u = u.to(self.output.device)
            batch = self.flat(self._vjp(u)[0])[0]  # Jᵀu through the batch, to be matched by Σ_i J_iᵀu_i
            left = batch.clone()
            for i in range(self.output.shape[0]):
                jac_i = single(i)
                left -= jac_i.T @ u[i].reshape(-1)
                yield jac_i
            if float(torch.linalg.vector_norm(left)) > 1e-6 * max(float(torch.linalg.vector_norm(batch)), 1e-300):
                raise GradlakeError("exact: the model's outputs depend on other samples of the batch (batch "
                                    "statistics?), so per-sample Jacobians do not apply; use method = \"pcg\"")
            self._independent = True
            return
        for i in range(self.output.shape[0]):
            yield single(i)


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


def blocked(apply, block: int):
    """``apply`` on at most ``block`` rows at a time (bounded memory for vmapped products)."""
    def run(v: torch.Tensor) -> torch.Tensor:
        return torch.cat([apply(v[i:i + block]) for i in range(0, v.shape[0], block)]) if len(v) else v
    return run


@dataclass(frozen=True)
class SolverSettings:
    """How the exact H is solved (see :func:`exact_influence`)."""

    method: str = "auto"  # auto | dense | pcg
    space: str = "auto"  # auto | output | parameter
    rtol: float = 1e-6
    max_iter: int = 2000
    block: int = 8  # vectors per vmapped JVP/VJP call (memory vs speed)
    dense_gb: float = 4.0  # auto: form and factor the Gram when it takes at most this much memory
    rank: int = 64  # first Nyström rank; doubled until λ̂_ℓ <= 10 λ or max_rank
    max_rank: int = 1024
    seed: int = 0


def dense_bytes(jac: BatchJacobian, space: str) -> int:
    """Memory of the dense path: J and K = JJᵀ (output space), or JᵀJ and one J_i (parameter space)."""
    n, p = jac.output.numel(), jac.n_params
    d = n // jac.output.shape[0]
    item = jac.output.element_size()
    return item * (n * p + n * n if space == "output" else p * p + d * p)


def _choose(jac: BatchJacobian, s: SolverSettings) -> tuple[str, str]:
    n, p = jac.output.numel(), jac.n_params
    space = s.space if s.space != "auto" else ("output" if n <= p else "parameter")
    method = s.method if s.method != "auto" else \
        ("dense" if dense_bytes(jac, space) <= s.dense_gb * 2**30 else "pcg")
    if space == "parameter" and method == "pcg" and s.space == "auto":
        space = "output"  # PCG's stopping rule is sharpest in output space (see exact_influence)
    return space, method


def _dense_gram(jac: BatchJacobian, space: str, bar=None) -> torch.Tensor:
    """K = J Jᵀ [n, n] (output space) or JᵀJ = Σ_i J_iᵀ J_i [p, p] (parameter space)."""
    if space == "output":
        rows = []
        for jac_i in jac.sample_jacobians():
            rows.append(jac_i)
            if bar is not None:
                bar.update(1)
        full = torch.cat(rows)
        del rows
        return full @ full.T
    gram = torch.zeros((jac.n_params, jac.n_params), dtype=jac.output.dtype, device=jac.output.device)
    for jac_i in jac.sample_jacobians():
        gram.addmm_(jac_i.T, jac_i)
        if bar is not None:
            bar.update(1)
    return gram


def exact_influence(jac: BatchJacobian, residuals: dict[str, torch.Tensor], pairs, damping: float,
                    solver: SolverSettings = SolverSettings(), progress=None):
    """H_AB [B, B] for each pair "AB" (response A, perturbation B) on the batch of ``jac``.

    Output space (n = outputs): Π b_j = b_j − λ (K + λI)⁻¹ b_j, H(i, j) = ⟨r_{A,i}, (Π b_j)_i⟩.
    Parameter space (p = parameters): H(i, j) = g_{A,i}ᵀ (JᵀJ + λI)⁻¹ g_{B,j}, g = Jᵀ b.
    ``dense`` factors the Gram of the chosen space (side n or p); ``pcg`` runs
    Nyström-preconditioned CG to a tolerance that bounds every entry by
    |Ĥ(i, j) − H(i, j)| ≤ rtol ‖r_{A,i}‖ ‖r_{B,j}‖ (in parameter space the residual target
    is scaled by 2√λ‖b_j‖/‖g_j‖, since ‖J(JᵀJ + λI)⁻¹‖ ≤ 1/(2√λ)).

    ``residuals``: {observable: r [B, *sample_shape]}. Returns ({pair: float64 numpy [B, B]},
    {perturbation observable: SolveInfo}). Raises GradlakeError if a solve does not reach
    rtol within max_iter iterations. ``progress(total, desc, unit)`` makes reporters.
    """
    if not damping > 0:
        raise InputError(f"exact damping: expected λ > 0, got {damping!r}")
    space, method = _choose(jac, solver)
    n_batch = jac.output.shape[0]
    dtype, device = jac.output.dtype, jac.output.device
    res = {o: r.to(device, dtype) for o, r in residuals.items()}
    for o, r in res.items():
        if r.shape != jac.output.shape:
            raise InputError(f"exact residual {o!r}: expected shape {list(jac.output.shape)}, got {list(r.shape)}")

    def placed(obs: str) -> torch.Tensor:
        return jac.placed(res[obs])

    pull = blocked(lambda u: jac.flat(jac.vjp(u.reshape(-1, *jac.output.shape))), solver.block)
    if space == "output":
        apply = blocked(lambda u: jac.gram(u.reshape(-1, *jac.output.shape)).reshape(u.shape[0], -1), solver.block)
        side = jac.output.numel()
    else:
        apply = blocked(lambda v: jac.flat(jac.vjp(jac.jvp(jac.unflat(v)))), solver.block)
        side = jac.n_params

    started = time.monotonic()
    factor, precondition, sketch = None, None, None
    if method == "dense":
        bar = progress(n_batch, f"exact: the {space}-space Gram from per-sample Jacobians", "sample") \
            if progress else None
        factor = cholesky_factor(_dense_gram(jac, space, bar), damping)
        if bar is not None:
            bar.close()
    else:
        bar = progress(None, "exact: Nyström sketch", "product") if progress else None
        sketch = nystrom(apply, side, damping, solver.rank, solver.max_rank, seed=solver.seed, dtype=dtype,
                         device=device, progress=bar)
        precondition = NystromPreconditioner(sketch, damping)
        if bar is not None:
            bar.close()
    setup_s = time.monotonic() - started

    responses = {o: (placed(o) if space == "output" else pull(placed(o))) for pair in pairs for o in pair}
    out, infos = {}, {}
    for obs_b in sorted({pair[1] for pair in pairs}):
        b = placed(obs_b)
        rhs = b if space == "output" else responses[obs_b]
        tol = solver.rtol
        if space == "parameter":
            tol = solver.rtol * 2 * np.sqrt(damping) * torch.linalg.vector_norm(b, dim=1) / \
                torch.clamp(torch.linalg.vector_norm(rhs, dim=1), min=torch.finfo(dtype).tiny)
        t0 = time.monotonic()
        if method == "dense":
            x = torch.cholesky_solve(rhs.T, factor).T
            true = rhs - apply(x) - damping * x  # checked with the matrix-free products
            rel = (torch.linalg.vector_norm(true, dim=1) / torch.linalg.vector_norm(rhs, dim=1).clamp_min(1e-300))
            info = SolveInfo(0, rel.cpu().numpy(), bool((rel <= 1.01 * torch.as_tensor(tol)).all()), "dense", 0,
                             rhs.shape[0])
        else:
            bar = progress(solver.max_iter, f"exact: PCG on {obs_b}", "iteration") if progress else None
            x, info = pcg(apply, rhs, damping, tol, solver.max_iter, precondition, bar)
            if bar is not None:
                bar.close()
            info.rank, info.products = sketch.rank, info.products + sketch.products
            if not info.converged:
                raise GradlakeError(
                    f"exact: PCG did not reach rtol={solver.rtol:g} in {solver.max_iter} iterations (worst relative "
                    f"residual {info.relative_residual.max():.3g}, Nyström rank {sketch.rank}, "
                    f"λ̂_ℓ/λ = {float(sketch.eigenvalues[-1]) / damping:.3g}); raise max_iter, max_rank or λ")
        info.seconds, info.space = round(setup_s + time.monotonic() - t0, 3), space
        solved = b - damping * x if space == "output" else x  # Π b_j, or (JᵀJ + λI)⁻¹ g_j
        for pair in pairs:
            if pair[1] == obs_b:
                out[pair] = (responses[pair[0]] @ solved.T).cpu().numpy()
        infos[obs_b] = info
    return out, infos


def influence_over_lambdas(jac: BatchJacobian, residuals: dict[str, torch.Tensor], pairs, lambdas,
                           space: str = "auto", progress=None) -> tuple[dict[float, dict[str, np.ndarray]], np.ndarray]:
    """The exact H_AB for every λ in ``lambdas`` from one eigendecomposition (dense path).

    Output space: K = QΛQᵀ, H(λ) = Rᵀ Q diag(μ/(μ+λ)) Qᵀ R; parameter space: JᵀJ = VΛVᵀ,
    H(λ) = Gᵀ V diag(1/(μ+λ)) Vᵀ G. Returns ({λ: {pair: [B, B]}}, eigenvalues, descending).
    """
    space, _ = _choose(jac, SolverSettings(method="dense", space=space))
    n_batch = jac.output.shape[0]
    bar = progress(n_batch, f"exact: the {space}-space Gram", "sample") if progress else None
    mu, q = torch.linalg.eigh(_dense_gram(jac, space, bar))
    if bar is not None:
        bar.close()
    mu = mu.clamp_min(0.0)
    coords = {}
    for o in {o for pair in pairs for o in pair}:
        b = jac.placed(residuals[o])
        if space == "parameter":  # g_i = J_iᵀ r_i
            b = jac.flat(jac.vjp(b.reshape(n_batch, *jac.output.shape)))
        coords[o] = b @ q  # [B, side]
    out = {}
    for lam in lambdas:
        weight = mu / (mu + lam) if space == "output" else 1.0 / (mu + lam)
        out[float(lam)] = {pair: ((coords[pair[0]] * weight) @ coords[pair[1]].T).cpu().numpy() for pair in pairs}
    return out, mu.flip(0).cpu().numpy()


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
