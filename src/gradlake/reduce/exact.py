"""The paper's exact minibatch influence H on one batch, for one λ or a whole sweep.

On a batch B with Jacobian J_B (outputs × p) and η_B = J_BᵀJ_B,

    Π = J_B (η_B + λI)⁻¹ J_Bᵀ = K (K + λI)⁻¹,   K = J_B J_Bᵀ (output-space NTK),
    H_AB(i, j) = ⟨r_{A,i}, (Π b_j)_i⟩ = a_iᵀ K (K + λI)⁻¹ b_j,

with a_i, b_j the residuals r_{A,i}, r_{B,j} placed at their sample (zero elsewhere); this
equals g_{A,i}ᵀ (η_B + λI)⁻¹ g_{B,j} with g = Jᵀr. Methods (:class:`SolverSettings`):

- ``dense``: K (or JᵀJ in parameter space) from per-sample Jacobians, eigendecomposed: H at
  every λ, the exact spectrum and d_eff(λ) = Σ μ/(μ + λ).
- ``lanczos``: block Lanczos in output space on every residual of the batch at once
  (reduce.lanczos): one Krylov space answers every λ (it is shift-invariant); stops when the
  proven bound |Ĥ(i, j) − H(i, j)| ≤ e_i e_j ≤ ‖ρ_i‖‖ρ_j‖ (block Gauss–Radau on the Galerkin
  residuals ρ), in the units of each
  asked normalisation, is ≤ ``htol`` at every λ — a bound on H itself, never H's change
  between iterations (which stalls where convergence does). The bound is screened after
  every block and proven (T's eigendecomposition) only where the screen passes. Random ±1 probes in the same
  block estimate d_eff(λ) (stochastic Lanczos quadrature).
- ``pcg``: Nyström-preconditioned CG per right-hand side to ``rtol`` (one λ).
- ``paper``: the PDEHats solve (MINRES on K + λI, i.e. CRAIG-MR; float32; the batch's
  right-hand sides stacked into one vector; restarted every 15 iterations; stopped at a
  stacked relative residual of 1.5e-2), to measure how far the paper's own H is from converged.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from gradlake.errors import GradlakeError, InputError
from gradlake.reduce.agreement import normalize_matrix, relative_frobenius, spearman  # noqa: F401 (re-export)
from gradlake.reduce.jacobian import BatchJacobian, blocked
from gradlake.reduce.krylov import NystromPreconditioner, SolveInfo, minres_stacked, nystrom, pcg
from gradlake.reduce.lanczos import Quadrature, block_lanczos

METHODS = ("auto", "dense", "lanczos", "pcg", "paper")
PAPER = {"rtol": 1.5e-2, "restart": 15, "dtype": torch.float32}  # lanl/PDEHats chi_J_ket.jl (UNet)


@dataclass(frozen=True)
class SolverSettings:
    """How the exact H is solved (see the module docstring)."""

    method: str = "auto"  # auto: dense when it fits in dense_gb and dense_side, else lanczos
    space: str = "auto"  # auto | output | parameter (dense and pcg; lanczos is output space)
    htol: float = 1e-3  # lanczos: bound on H's error in the units of every asked normalisation
    rtol: float = 1e-6  # pcg: relative residual per right-hand side
    max_iter: int = 2000  # pcg and paper iterations; lanczos block steps
    block: int = 8  # vectors per vmapped JVP/VJP call (memory vs speed)
    dense_gb: float = 4.0  # auto: the dense path when J and the Gram take at most this much memory
    dense_side: int = 4096  # auto: ... and the Gram's side is at most this (its eigendecomposition costs ~n³)
    krylov_gb: float = 4.0  # lanczos: memory of the Krylov basis (float64)
    rank: int = 64  # pcg: first Nyström rank; doubled until λ̂_ℓ <= 10 λ or max_rank
    max_rank: int = 1024
    probes: int = 8  # lanczos: ±1 probes of d_eff(λ)
    seed: int = 0


def dense_bytes(jac: BatchJacobian, space: str) -> int:
    """Memory of the dense path: J and K = JJᵀ (output space), or JᵀJ and one J_i (parameter space)."""
    n, p = jac.output.numel(), jac.n_params
    d = n // jac.output.shape[0]
    return 8 * (n * p + n * n if space == "output" else p * p + d * p)


def _choose(jac: BatchJacobian, s: SolverSettings) -> tuple[str, str]:
    if s.method not in METHODS:
        raise InputError(f"exact method {s.method!r}: expected one of {', '.join(METHODS)}")
    n, p = jac.output.numel(), jac.n_params
    space = s.space if s.space != "auto" else ("output" if n <= p else "parameter")
    fits = dense_bytes(jac, space) <= s.dense_gb * 2**30 and (n if space == "output" else p) <= s.dense_side
    method = s.method if s.method != "auto" else ("dense" if fits else "lanczos")
    if method in ("lanczos", "paper"):
        if s.space == "parameter":
            raise InputError(f"exact method {method!r} works in output space; set space = \"output\" or \"auto\"")
        space = "output"
    if method == "pcg" and s.space == "auto":
        space = "output"  # PCG's stopping rule is sharpest in output space
    return space, method


def _dense_gram(jac: BatchJacobian, space: str, bar=None) -> torch.Tensor:
    """K = J Jᵀ [n, n] (output space) or JᵀJ = Σ_i J_iᵀ J_i [p, p] (parameter space), float64."""
    if space == "output":
        rows = []
        for jac_i in jac.sample_jacobians():
            rows.append(jac_i)
            if bar is not None:
                bar.update(1)
        full = torch.cat(rows)
        del rows
        return (full @ full.T).double()
    gram = torch.zeros((jac.n_params, jac.n_params), dtype=jac.output.dtype, device=jac.output.device)
    for jac_i in jac.sample_jacobians():
        gram.addmm_(jac_i.T, jac_i)
        if bar is not None:
            bar.update(1)
    return gram.double()


@dataclass
class HatSolve:
    """H of one minibatch at every λ its solve answers for.

    Spectral methods (dense, lanczos) keep a :class:`Quadrature` over the columns
    ``columns[obs]`` (the batch's residuals of each observable) and ``probes`` (±1 probes);
    pcg and paper keep H at their one λ in ``fixed``.
    """

    method: str
    space: str
    info: SolveInfo
    damping: float
    quad: Quadrature | None = None
    columns: dict[str, slice] | None = None
    probes: slice | None = None
    fixed: dict[str, np.ndarray] | None = None
    n_outputs: int = 0

    def _matrix(self, lam: float, left, right) -> torch.Tensor:
        if self.space == "output":
            return self.quad.hat(lam, left, right)
        return self.quad.form(1.0 / (self.quad.theta + lam), left, right)

    def at(self, lam: float, pairs) -> dict[str, np.ndarray]:
        """{pair: H_AB [B, B]} at λ (float64)."""
        if self.quad is None:
            if not math.isclose(lam, self.damping, rel_tol=1e-12):
                raise InputError(f"exact method {self.method!r} solves one λ ({self.damping:g}); use "
                                 f"method = \"dense\" or \"lanczos\" for λ = {lam:g}")
            return {p: self.fixed[p] for p in pairs}
        return {p: self._matrix(lam, self.columns[p[0]], self.columns[p[1]]).cpu().numpy() for p in pairs}

    def bound(self, lam: float, pair: str, parts: tuple[str, ...] = ("krylov", "floor")) -> np.ndarray:
        """Entrywise bound on |Ĥ_AB − H_AB| at λ, the sum of its ``parts``: "krylov", e_i e_j (Gauss–Radau,
        ≤ ‖ρ_i‖‖ρ_j‖; zero for the dense spectrum), and "floor", the round-off floor of the products
        (reduce.lanczos)."""
        a, b = self.columns[pair[0]], self.columns[pair[1]]
        total = torch.zeros((a.stop - a.start, b.stop - b.start), dtype=torch.float64)
        for factors in ([self.quad.error_factors(lam)] if "krylov" in parts else []) + \
                ([self.quad.floor(lam)] if "floor" in parts else []):
            total += torch.outer(factors[a], factors[b]).cpu()
        return total.numpy()

    def d_eff(self, lam: float) -> float | None:
        """d_eff(λ) = tr K (K + λI)⁻¹: exact from the dense spectrum, estimated from the probes by lanczos."""
        if self.quad is None:
            return None
        theta = self.quad.theta
        if self.method == "dense":
            return float((theta / (theta + lam)).sum())
        if self.probes is None:
            return None
        return float(torch.diagonal(self.quad.hat(lam, self.probes, self.probes)).mean())

    @property
    def eigenvalues(self) -> np.ndarray:
        """K's eigenvalues (dense) or Ritz values (lanczos), descending; empty for pcg and paper."""
        return np.zeros(0) if self.quad is None else self.quad.theta.flip(0).cpu().numpy()


def error_in_units(h: dict[str, np.ndarray], bound: dict[str, np.ndarray], pair: str, norm: str) -> float:
    """A first-order bound on the error of H_AB under a normalisation, from entrywise bounds."""
    hp, b = h[pair], bound[pair]
    if norm == "none":
        return float(b.max() / max(np.abs(hp).max(), 1e-300))
    if norm == "row-std":
        # z = h/σ moves by Δz_ij = Σ_k Δh_ik ∂z_ij/∂h_ik with ∂σ_i/∂h_ik = c_ik/(Bσ_i): the worst Δ in the box
        centred = hp - hp.mean(axis=1, keepdims=True)
        std = np.maximum(np.sqrt((centred * centred).mean(1, keepdims=True)), 1e-300)
        z, via_std = hp / std, np.abs(centred) / (hp.shape[1] * std)  # |∂σ_i/∂h_ik|
        others = (b * via_std).sum(1, keepdims=True) - b * via_std
        return float(((b * np.abs(1 - z * centred / (hp.shape[1] * std)) + np.abs(z) * others) / std).max())
    if norm == "cosine":
        da, db = np.diag(h[pair[0] * 2]), np.diag(h[pair[1] * 2])
        ea, eb = np.diag(bound[pair[0] * 2]), np.diag(bound[pair[1] * 2])
        scale = np.sqrt(np.maximum(np.outer(da, db), 1e-300))
        rel = np.add.outer(ea / np.maximum(da, 1e-300), eb / np.maximum(db, 1e-300))
        return float((b / scale + 0.5 * np.abs(hp / scale) * rel).max())
    raise InputError(f"normalisation {norm!r}: expected none, row-std or cosine")


def _bounds(solve: HatSolve, lam: float, pairs, normalize, parts=("krylov", "floor")) -> float:
    """The largest error bound of the pairs at λ over the asked normalisations, of the bound's ``parts``
    (HatSolve.bound: the Krylov part, which the space shrinks, and the products' round-off floor, which it
    cannot)."""
    need = sorted({*pairs, *(o * 2 for p in pairs for o in p)}) if "cosine" in normalize else list(pairs)
    h = solve.at(lam, need)
    b = {p: solve.bound(lam, p, parts) for p in need}
    return max(error_in_units(h, b, p, n) for p in pairs for n in normalize)


def solve_hat(jac: BatchJacobian, residuals: dict[str, torch.Tensor], pairs, damping: float,
              solver: SolverSettings = SolverSettings(), lambdas=(), normalize=("row-std",),
              progress=None) -> HatSolve:
    """The exact H_AB on the batch of ``jac`` for each pair "AB" (response A, perturbation B).

    ``residuals``: {observable: r [B, *sample_shape]}; ``lambdas``: further λ the result must
    answer for (dense and lanczos). lanczos stops when every λ's bound (in the units of
    ``normalize``) is ≤ htol and raises GradlakeError if the run's λ is not reached within
    its budget (the sweep's λ that are not reached are reported in ``info.sweep``).
    ``progress(total, desc, unit)`` makes reporters.
    """
    for lam in (damping, *lambdas):
        if not lam > 0:
            raise InputError(f"exact damping: expected λ > 0, got {lam!r}")
    space, method = _choose(jac, solver)
    res = {o: r.to(jac.output.device, torch.float64) for o, r in residuals.items()}
    for o, r in res.items():
        if r.shape != jac.output.shape:
            raise InputError(f"exact residual {o!r}: expected shape {list(jac.output.shape)}, got {list(r.shape)}")
    observables = sorted({o for p in pairs for o in p})
    started = time.monotonic()
    if method == "dense":
        solve = _dense(jac, res, observables, space, progress)
    elif method == "lanczos":
        solve = _lanczos(jac, res, observables, pairs, damping, solver, tuple(lambdas), tuple(normalize), progress)
    else:
        solve = _one_lambda(jac, res, pairs, damping, method, space, solver, progress)
    solve.damping, solve.n_outputs = damping, jac.output.numel()
    solve.info.seconds, solve.info.space = round(time.monotonic() - started, 3), space
    return solve


def exact_influence(jac: BatchJacobian, residuals: dict[str, torch.Tensor], pairs, damping: float,
                    solver: SolverSettings = SolverSettings(), progress=None):
    """({pair: H [B, B]}, SolveInfo) at one λ (see :func:`solve_hat`)."""
    solve = solve_hat(jac, residuals, pairs, damping, solver, progress=progress)
    return solve.at(damping, pairs), solve.info


def _dense(jac, res, observables, space, progress) -> HatSolve:
    n_batch = jac.output.shape[0]
    bar = progress(n_batch, f"exact: the {space}-space Gram from per-sample Jacobians", "sample") \
        if progress else None
    mu, q = torch.linalg.eigh(_dense_gram(jac, space, bar))
    if bar is not None:
        bar.close()
    blocks = []
    for o in observables:
        b = jac.placed(res[o].to(jac.output.dtype))
        if space == "parameter":  # g_i = J_iᵀ r_i
            b = jac.flat(jac.vjp(b.reshape(n_batch, *jac.output.shape)))
        blocks.append(b.double())
    coords = q.T @ torch.cat(blocks).T
    quad = Quadrature(mu.clamp_min(0.0), coords, torch.zeros((0, len(mu)), dtype=torch.float64), n_batch)
    columns = {o: slice(i * n_batch, (i + 1) * n_batch) for i, o in enumerate(observables)}
    return HatSolve("dense", space, SolveInfo(0, np.zeros(0), True, "dense", 0, 0), 0.0, quad, columns)


def _lanczos(jac, res, observables, pairs, damping, solver, lambdas, normalize, progress) -> HatSolve:
    n_batch, n = jac.output.shape[0], jac.output.numel()
    kv_dtype = jac.output.dtype
    start = [jac.placed(res[o]) for o in observables]
    if solver.probes:
        g = torch.Generator().manual_seed(solver.seed)
        start.append((torch.randint(0, 2, (solver.probes, n), generator=g) * 2 - 1).double().to(jac.output.device))
    start = torch.cat(start).double()
    columns = {o: slice(i * n_batch, (i + 1) * n_batch) for i, o in enumerate(observables)}
    probes = slice(len(observables) * n_batch, start.shape[0]) if solver.probes else None
    apply = blocked(lambda u: jac.gram(u.reshape(-1, *jac.output.shape)).reshape(u.shape[0], -1), solver.block)
    max_dim = min(n, int(solver.krylov_gb * 2**30 / (8 * n)), solver.max_iter * start.shape[0])
    every = sorted({damping, *lambdas})
    checks = []

    def converged(quad) -> bool:  # a Screen after every block, the Quadrature where it passes
        solve = HatSolve("lanczos", "output", None, damping, quad, columns, probes)
        # the whole bound (Krylov part + floor) is what the result is held to, so the stop waits for it; a λ
        # whose floor is above htol once the Krylov part is below the floor is given up (in absolute units the
        # floor only grows with the Ritz values; in row-std units it is settled only once H is resolved)
        krylov = {lam: _bounds(solve, lam, pairs, normalize, ("krylov",)) for lam in every}
        floor = {lam: _bounds(solve, lam, pairs, normalize, ("floor",)) for lam in every}
        floor = {lam: f if krylov[lam] <= f else 0.0 for lam, f in floor.items()}
        worst = {lam: _bounds(solve, lam, pairs, normalize) for lam in every}
        checks.append({"products": quad.products, "dimension": quad.dimension,
                       "bound": worst[damping], "worst_bound": max(worst.values())})
        if bar is not None:
            bar.set_postfix(dimension=quad.dimension, bound=f"{worst[damping]:.1e}")
        return floor[damping] > solver.htol or all(worst[lam] <= solver.htol or floor[lam] > solver.htol
                                                   for lam in every)

    bar = progress(None, "exact: block Lanczos", "product") if progress else None
    quad = block_lanczos(apply, start, converged, max_dim, every, apply_dtype=kv_dtype, progress=bar)
    if bar is not None:
        bar.close()
    solve = HatSolve("lanczos", "output", None, damping, quad, columns, probes)
    sweep = {lam: _bounds(solve, lam, pairs, normalize) for lam in every}
    info = SolveInfo(len(checks), np.zeros(0), sweep[damping] <= solver.htol, "lanczos", int(quad.theta.numel()),
                     quad.products, [c["bound"] for c in checks])
    info.bound, info.sweep = sweep[damping], {lam: {"bound": b, "converged": b <= solver.htol}
                                              for lam, b in sweep.items()}
    if not info.converged:
        krylov = _bounds(solve, damping, pairs, normalize, ("krylov",))
        floor = _bounds(solve, damping, pairs, normalize, ("floor",))
        why = (f"the round-off floor of {kv_dtype} products, about u‖K‖/λ, is above it (found after {quad.products} "
               "products); use float64 products (compute_dtype), a larger λ or a larger htol"
               if krylov <= solver.htol or floor > solver.htol else
               f"after {quad.products} products, Krylov dimension {quad.theta.numel()} of {n}; raise krylov_gb "
               "(the basis' memory) or max_iter, or λ")
        raise GradlakeError(f"exact: block Lanczos did not bound H within htol={solver.htol:g} at λ = {damping:g} "
                            f"(bound {sweep[damping]:.3g}): {why}")
    solve.info = info
    return solve


def _one_lambda(jac, res, pairs, damping, method, space, solver, progress) -> HatSolve:
    """pcg or paper: H at the run's λ alone, one solve per perturbation observable."""
    pull = blocked(lambda u: jac.flat(jac.vjp(u.reshape(-1, *jac.output.shape))), solver.block)
    dtype = PAPER["dtype"] if method == "paper" else torch.float64
    if space == "output":
        apply = blocked(lambda u: jac.gram(u.reshape(-1, *jac.output.shape).to(jac.output.dtype))
                        .reshape(u.shape[0], -1).to(u.dtype), solver.block)
        side = jac.output.numel()
    else:
        apply = blocked(lambda v: jac.flat(jac.vjp(jac.jvp(jac.unflat(v.to(jac.output.dtype))))).double(), solver.block)
        side = jac.n_params
    placed = {o: jac.placed(res[o]).double() for p in pairs for o in p}
    responses = {o: (b if space == "output" else pull(b.to(jac.output.dtype)).double()) for o, b in placed.items()}
    sketch = precondition = None
    if method == "pcg":
        bar = progress(None, "exact: Nyström sketch", "product") if progress else None
        sketch = nystrom(apply, side, damping, solver.rank, solver.max_rank, seed=solver.seed,
                         device=jac.output.device, progress=bar)
        precondition = NystromPreconditioner(sketch, damping)
        if bar is not None:
            bar.close()
    out, infos = {}, []
    for obs_b in sorted({p[1] for p in pairs}):
        b = placed[obs_b]
        rhs = b if space == "output" else responses[obs_b]
        bar = progress(solver.max_iter, f"exact: {method} on {obs_b}", "iteration") if progress else None
        if method == "paper":
            x, info = minres_stacked(lambda v: apply(v.to(dtype)).to(dtype), rhs.to(dtype), damping, PAPER["rtol"],
                                     PAPER["restart"], solver.max_iter, bar)
            x = x.double()
        else:
            tol = solver.rtol
            if space == "parameter":  # ‖J(JᵀJ + λI)⁻¹‖ <= 1/(2√λ)
                tol = solver.rtol * 2 * np.sqrt(damping) * torch.linalg.vector_norm(b, dim=1) / \
                    torch.linalg.vector_norm(rhs, dim=1).clamp_min(1e-300)
            x, info = pcg(apply, rhs, damping, tol, solver.max_iter, precondition, bar)
            info.rank, info.products = sketch.rank, info.products + sketch.products
            if not info.converged:
                raise GradlakeError(
                    f"exact: PCG did not reach rtol={solver.rtol:g} in {solver.max_iter} iterations (worst relative "
                    f"residual {info.relative_residual.max():.3g}, Nyström rank {sketch.rank}, "
                    f"λ̂_ℓ/λ = {float(sketch.eigenvalues[-1]) / damping:.3g}); raise max_iter, max_rank or λ")
        if bar is not None:
            bar.close()
        solved = b - damping * x if space == "output" else x  # Π b_j, or (JᵀJ + λI)⁻¹ g_j
        for pair in pairs:
            if pair[1] == obs_b:
                out[pair] = (responses[pair[0]] @ solved.T).cpu().numpy()
        infos.append(info)
    info = infos[0] if len(infos) == 1 else replace(
        infos[0], iterations=max(i.iterations for i in infos), products=sum(i.products for i in infos),
        relative_residual=np.concatenate([i.relative_residual for i in infos]),
        converged=all(i.converged for i in infos))
    return HatSolve(method, space, info, damping, fixed=out)
