"""Exact minibatch influence (dense, block Lanczos, Nyström-PCG, the paper's solve) against a dense autograd Jacobian."""

import re

import numpy as np
import pytest
import torch
from torch import nn

from gradlake import physics
from gradlake.errors import GradlakeError
from gradlake.reduce.exact import (BatchJacobian, SolverSettings, error_in_units, exact_influence,
                                   normalize_matrix, relative_frobenius, solve_hat, spearman)
from gradlake.reduce.lanczos import Screen, block_lanczos

CHANNELS = physics.EULER_CHANNELS
LAM = 1e-4


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(4, 1, 3, padding=1, padding_mode="circular"), nn.Tanh(),
                         nn.Conv2d(1, 4, 3, padding=1, padding_mode="circular"))


def dense_case(outputs_per_channel: int, samples: int, seed: int = 1):
    """A batch, its residuals and the dense J [outputs, p] formed by reverse-mode autograd."""
    torch.manual_seed(seed)
    side = outputs_per_channel
    x = 1 + 0.1 * torch.randn(samples, 4, side, side, dtype=torch.float64)
    y = x + 0.05 * torch.randn_like(x)
    jac = BatchJacobian(tiny_model(), x)
    res = physics.residuals(jac.output, x, y, ("C", "M", "E"), CHANNELS)
    full = torch.func.jacrev(jac._forward)(jac.params)
    J = torch.cat([full[n].reshape(jac.output.numel(), -1) for n in jac.params], 1).numpy()
    return jac, res, J


@pytest.fixture(scope="module", params=["outputs>p", "outputs<p"])
def setup(request):
    # tiny_model has p = 77: 3 samples at 3x3 give 108 outputs > p (K = JJᵀ singular),
    # 2 samples at 2x2 give 32 outputs < p (JᵀJ singular).
    return dense_case(3, 3) if request.param == "outputs>p" else dense_case(2, 2)


def dense_reference(J: np.ndarray, res, pair: str, n: int) -> np.ndarray:
    """H_AB = g_Aᵀ (JᵀJ + λI)⁻¹ g_B in float64 numpy, from the dense J (an independent route)."""
    d = J.shape[0] // n
    flat = {o: r.reshape(n, d).numpy() for o, r in res.items()}
    g = {o: np.stack([J[i * d:(i + 1) * d].T @ flat[o][i] for i in range(n)]) for o in pair}
    return g[pair[0]] @ np.linalg.solve(J.T @ J + LAM * np.eye(J.shape[1]), g[pair[1]].T)


SOLVERS = [SolverSettings(method=m, space=s, rtol=1e-9, rank=4, max_rank=64, block=4)
           for m in ("dense", "pcg") for s in ("output", "parameter")] + \
    [SolverSettings(method="lanczos", htol=1e-6, probes=0, block=4)]


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: f"{s.method}-{s.space}")
def test_exact_influence_matches_dense(setup, solver):
    jac, res, J = setup
    n = jac.output.shape[0]
    pairs = ("CC", "MC", "EC")
    got, info = exact_influence(jac, res, pairs, LAM, solver)
    for pair in pairs:
        want = dense_reference(J, res, pair, n)
        na = res[pair[0]].reshape(n, -1).norm(dim=1).numpy()
        nb = res[pair[1]].reshape(n, -1).norm(dim=1).numpy()
        # the stated bound, plus float64 round-off of a system with κ up to ~1e8
        assert np.all(np.abs(got[pair] - want) <= 1e-9 * np.outer(na, nb) + 1e-7 * np.abs(want).max()), pair
        assert relative_frobenius(got[pair], want) <= 1e-6, pair
    np.testing.assert_allclose(got["CC"], got["CC"].T, rtol=1e-6, atol=1e-9 * np.abs(got["CC"]).max())
    assert info.converged and info.method == solver.method and solver.space in (info.space, "auto")


def test_pcg_reports_non_convergence(setup):
    jac, res, _ = setup
    with pytest.raises(GradlakeError, match="did not reach"):
        exact_influence(jac, res, ("CC",), LAM, SolverSettings(method="pcg", rtol=1e-12, max_iter=2, rank=2,
                                                               max_rank=2))


def test_spectrum_and_effective_dimension(setup):
    """dense: K's eigenvalues and d_eff exactly; lanczos: the top Ritz value and d_eff from its probes."""
    jac, res, J = setup
    mu = np.clip(np.linalg.eigvalsh(J @ J.T), 0, None)
    dense = solve_hat(jac, res, ("CC",), LAM, SolverSettings(method="dense"))
    assert dense.eigenvalues[0] == pytest.approx(mu[-1], rel=1e-9)
    for lam in (LAM, 1e-2, 1.0):
        assert dense.d_eff(lam) == pytest.approx((mu / (mu + lam)).sum(), rel=1e-9)
    krylov = solve_hat(jac, res, ("CC",), LAM, SolverSettings(method="lanczos", htol=1e-6, probes=64, block=4))
    assert krylov.eigenvalues[0] == pytest.approx(mu[-1], rel=1e-8)
    want = (mu / (mu + 1e-2)).sum()  # Hutchinson with 64 ±1 probes: std <= sqrt(2 d_eff / 64)
    assert abs(krylov.d_eff(1e-2) - want) <= 4 * np.sqrt(2 * want / 64)


def test_agreement_metrics():
    a = np.array([[1.0, 2.0], [3.0, 4.0]])
    assert spearman(a, 2 * a + 1) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert relative_frobenius(a * 1.1, a) == pytest.approx(0.1)
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=50), rng.normal(size=50)
    x[:5] = 0.0  # ties
    assert spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic)
    h = rng.normal(size=(4, 4))
    np.testing.assert_allclose(normalize_matrix(h, "row-std").std(1), 1.0)


class BatchMixing(nn.Module):
    """Outputs that depend on the other samples of the batch (a batch-mean subtraction)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        return y - y.mean(0, keepdim=True)


def test_dense_refuses_a_batch_dependent_model_pcg_still_solves():
    torch.manual_seed(0)
    x = 1 + 0.1 * torch.randn(3, 4, 2, 2, dtype=torch.float64)
    jac = BatchJacobian(BatchMixing(), x)
    res = physics.residuals(jac.output, x, x + 0.01, ("C",), CHANNELS)
    with pytest.raises(GradlakeError, match="depend on other samples"):
        exact_influence(jac, res, ("CC",), LAM, SolverSettings(method="dense"))
    h, info = exact_influence(jac, res, ("CC",), LAM, SolverSettings(method="pcg", rtol=1e-8, rank=4))
    assert info.converged and np.isfinite(h["CC"]).all()


SWEEP = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


@pytest.mark.parametrize("solver", [SolverSettings(method="dense", space="output"),
                                    SolverSettings(method="dense", space="parameter"),
                                    SolverSettings(method="lanczos", htol=1e-6, probes=0, block=4)],
                         ids=["dense-output", "dense-parameter", "lanczos"])
def test_lambda_sweep_from_one_solve(setup, solver):
    """H at 8 λ from one solve equals 8 separate dense solves of the numpy reference (a wrong shift fails)."""
    jac, res, J = setup
    n = jac.output.shape[0]
    solve = solve_hat(jac, res, ("CC", "EC"), LAM, solver, lambdas=SWEEP)
    d = J.shape[0] // n
    flat = {o: r.reshape(n, d).numpy() for o, r in res.items()}
    g = {o: np.stack([J[i * d:(i + 1) * d].T @ flat[o][i] for i in range(n)]) for o in ("C", "E")}
    for lam in SWEEP:
        got = solve.at(lam, ("CC", "EC"))
        for pair in ("CC", "EC"):
            want = g[pair[0]] @ np.linalg.solve(J.T @ J + lam * np.eye(J.shape[1]), g[pair[1]].T)
            assert relative_frobenius(got[pair], want) <= 1e-6, (lam, pair)


def test_lanczos_bound_holds_and_a_stall_is_not_convergence():
    """On a spectrum that stalls convergence (λ = 1e-6, κ ~ 1e12) the proven bounds (Gauss–Radau
    e_i e_j ≤ ‖ρ_i‖‖ρ_j‖) hold at every stage of the run, up to the round-off floor ε‖A‖/λ ‖s_i‖‖s_j‖
    of float64 products, and Gauss–Radau stays within 3× of the error while ‖ρ_i‖‖ρ_j‖ is ≥ 20× off."""
    torch.manual_seed(0)
    n, s = 400, 4
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    mu = torch.logspace(6, -8, n, dtype=torch.float64)
    a = (q * mu) @ q.T
    start = torch.randn(s, n, dtype=torch.float64)
    lam = 1e-6
    coords = start @ q  # the reference from the known spectrum (a solve would lose ~κε = 1e-4)
    want = ((coords * (mu / (mu + lam))) @ coords.T).numpy()
    norms = start.norm(dim=1).numpy()
    floor = np.finfo(np.float64).eps * float(mu.max()) / lam * np.outer(norms, norms)
    seen = []

    def check(quad):
        err = np.abs(quad.hat(lam).numpy() - want)
        res, radau = quad.residuals(lam).numpy(), quad.error_factors(lam).numpy()
        seen.append((err, np.outer(radau, radau), np.outer(res, res)))
        return False

    quad = block_lanczos(lambda v: v @ a, start, check, max_dim=n, growth=1.05)
    assert len(seen) > 20
    for err, bound, residual_bound in seen:
        assert np.all(err <= bound * (1 + 1e-6) + floor)
        assert np.all(bound <= residual_bound * (1 + 1e-9))
        if err.max() > 1e3 * floor.max():  # Gauss–Radau is tight where ‖ρ_i‖‖ρ_j‖ is not
            assert bound.max() <= 3 * err.max() and residual_bound.max() >= 20 * err.max()
    assert seen[len(seen) // 2][0].max() > 1e-3 * np.abs(want).max()  # the middle of the run is far from converged
    assert seen[-1][0].max() <= floor.max()


class ExplicitGram:
    """BatchJacobian's part that block Lanczos uses, for an explicit K [n, n] over ``batch`` samples."""

    placed = BatchJacobian.placed
    n_params = 10**9

    def __init__(self, k: torch.Tensor, batch: int):
        self.k, self.output = k, torch.zeros(batch, k.shape[0] // batch, dtype=torch.float64)

    def gram(self, u):
        return (u.reshape(u.shape[0], -1) @ self.k).reshape(u.shape)


def test_lanczos_screen_is_the_quadrature():
    """The screen after every block (block Cholesky of T + λI grown with T) gives the eigendecomposition's
    H and Gauss–Radau factors at every block and shift (a wrong shift or a dropped block fails)."""
    torch.manual_seed(0)
    n, lams, seen = 300, (1e-4, 1e-2, 1.0), {}
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    a = (q * torch.logspace(4, -6, n, dtype=torch.float64)) @ q.T

    def check(quad):
        if isinstance(quad, Screen):
            seen[quad.dimension] = {lam: (quad.hat(lam), quad.error_factors(lam)) for lam in lams}
            return True
        screened = seen.pop(quad.dimension)
        for lam in lams:
            h, e = screened[lam]
            # Cholesky vs eigh of T + λI (condition up to 1e8 here): round-off ~1e-10 of max|H|, thread-dependent
            assert torch.allclose(h, quad.hat(lam), rtol=0, atol=1e-8 * float(quad.hat(lam).abs().max()))
            assert torch.allclose(e, quad.error_factors(lam), rtol=1e-4)
        return quad.dimension >= 150

    block_lanczos(lambda v: v @ a, torch.randn(3, n, dtype=torch.float64), check, n, lams, growth=1.0)
    assert not seen


@pytest.mark.parametrize("screen", ["real", "always passes"])
def test_lanczos_stops_only_where_every_lambda_is_proven(monkeypatch, screen):
    """The screen only says when to prove: at the stop the eigendecomposition bounds H within htol at every
    λ of the sweep, below the run's λ too, even when the screen passes at once (it cannot stop a run early)."""
    torch.manual_seed(1)
    n, batch = 240, 4
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    mu = torch.logspace(3, -5, n, dtype=torch.float64)
    jac, r = ExplicitGram((q * mu) @ q.T, batch), torch.randn(batch, n // batch, dtype=torch.float64)
    if screen != "real":
        monkeypatch.setattr(Screen, "error_factors", lambda self, lam: torch.zeros_like(self.norms))
    solve = solve_hat(jac, {"C": r}, ("CC",), 1e-1, SolverSettings(method="lanczos", htol=1e-6, probes=0),
                      lambdas=(1e-4, 1e-3))
    assert solve.info.rank < n and all(v["converged"] for v in solve.info.sweep.values())
    b = jac.placed(r)
    for lam in (1e-4, 1e-3, 1e-1):
        want = (b @ q * (mu / (mu + lam))) @ (b @ q).T
        assert relative_frobenius(normalize_matrix(solve.at(lam, ("CC",))["CC"], "row-std"),
                                  normalize_matrix(want.numpy(), "row-std")) <= 1e-6


def test_lanczos_budget_exhausted_is_an_error(setup):
    jac, res, _ = setup
    with pytest.raises(GradlakeError, match="did not bound H.*raise krylov_gb"):
        solve_hat(jac, res, ("CC",), 1e-2, SolverSettings(method="lanczos", htol=1e-9, max_iter=1, probes=0))


def test_float32_products_cannot_claim_a_small_lambda(setup):
    """float32 K·v carry errors of ~6e-8 ‖K‖: at λ far below that the round-off floor, not the
    Krylov space, limits H, and the solve says so instead of answering."""
    jac, res, _ = setup
    jac32 = BatchJacobian(jac._model, jac.inputs.float(), torch.float32)
    with pytest.raises(GradlakeError, match="round-off floor of torch.float32 products") as refused:
        solve_hat(jac32, res, ("CC",), 1e-8, SolverSettings(method="lanczos", htol=1e-3, probes=0))
    solve = solve_hat(jac, res, ("CC",), 1e-8, SolverSettings(method="lanczos", htol=1e-3, probes=0))
    assert solve.info.converged  # float64 products answer the same λ
    spent = int(re.search(r"found after (\d+) products", str(refused.value)).group(1))
    assert spent < solve.info.products / 2  # refused at the first check whose floor is above htol, not at the end


def test_error_in_units_bounds_the_normalised_error():
    """A perturbation within the entrywise bound moves row-std and cosine H by at most the stated amount (to first order)."""
    rng = np.random.default_rng(0)
    g = rng.normal(size=(6, 20))
    h = {"CC": g @ g.T}
    bound = {"CC": np.full((6, 6), 1e-6 * np.abs(h["CC"]).max())}
    worst = {n: error_in_units(h, bound, "CC", n) for n in ("none", "row-std", "cosine")}
    # adversarial (row-std): every entry of a row at ±bound, signed by its effect on z_ij, for each (i, j)
    centred = h["CC"] - h["CC"].mean(1, keepdims=True)
    std = np.sqrt((centred ** 2).mean(1))
    worst_case = []
    for i, j in np.ndindex(6, 6):
        grad = -h["CC"][i, j] * centred[i] / (6 * std[i] ** 3)  # ∂z_ij/∂h_ik
        grad[j] += 1 / std[i]
        e = np.zeros((6, 6))
        e[i] = np.sign(grad) * bound["CC"][i]
        worst_case.append(e)
    symmetric = [rng.uniform(-1, 1, size=(6, 6)) * bound["CC"] for _ in range(20)]
    tight = 0.0
    for e in [*worst_case, *(0.5 * (e + e.T) for e in symmetric)]:
        for norm in ("none", "row-std"):
            moved = np.abs(normalize_matrix(h["CC"] + e, norm) - normalize_matrix(h["CC"], norm)).max()
            scale = 1.0 if norm == "row-std" else np.abs(h["CC"]).max()
            assert moved / scale <= 1.01 * worst[norm]
            tight = max(tight, moved / worst["row-std"]) if norm == "row-std" else tight
        d = np.diag(h["CC"] + e)
        moved = np.abs(normalize_matrix(h["CC"] + e, "cosine", d, d) -
                       normalize_matrix(h["CC"], "cosine", np.diag(h["CC"]), np.diag(h["CC"]))).max()
        assert moved <= 1.01 * worst["cosine"]
    assert tight > 0.99  # the row-std bound is attained: no looser than it must be


def test_paper_solver_is_the_stacked_restarted_minres(setup):
    """method = "paper" stops at the stacked residual 1.5e-2 (float32) — an H visibly looser than converged."""
    from gradlake.reduce.krylov import minres_stacked

    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(50, 50, dtype=torch.float64))
    a = (q * torch.logspace(3, -3, 50, dtype=torch.float64)) @ q.T
    b = torch.randn(4, 50, dtype=torch.float64)
    x, info = minres_stacked(lambda v: v @ a, b, 1e-3, 1e-9, 1000, 500)
    want = torch.linalg.solve(a + 1e-3 * torch.eye(50, dtype=torch.float64), b.T).T
    assert info.converged and float((x - want).norm() / want.norm()) < 1e-6
    jac, res, J = setup
    h, info = exact_influence(jac, res, ("CC",), LAM, SolverSettings(method="paper", max_iter=60))
    exact, _ = exact_influence(jac, res, ("CC",), LAM, SolverSettings(method="dense"))
    stacked = info.history[-1]
    assert info.method == "paper" and (info.converged == (stacked <= 1.5e-2) or info.iterations == 60)
    assert 1e-6 < relative_frobenius(h["CC"], exact["CC"]) < 1.0


class _NoForwardMode(torch.autograd.Function):
    """tanh with a backward but no forward-mode formula (as some custom ops have)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class _CustomTanh(nn.Module):
    def forward(self, x):
        return _NoForwardMode.apply(x)


@pytest.mark.parametrize("activation", [nn.Tanh, _CustomTanh], ids=["forward-mode", "no forward-mode formula"])
def test_jacobian_products_equal_the_dense_jacobian(activation):
    """J t and Jᵀu against the dense J, by forward-mode AD or, where the model has no forward-mode
    formula, by the VJP of u -> Jᵀu."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 2, 3, padding=1), activation(), nn.Conv2d(2, 4, 3, padding=1))
    x = torch.randn(3, 4, 3, 3, dtype=torch.float64)
    jac = BatchJacobian(model, x)
    full = torch.func.jacrev(jac._forward)(jac.params)
    J = torch.cat([full[n].reshape(jac.output.numel(), -1) for n in jac.params], 1)
    t = torch.randn(5, J.shape[1], dtype=torch.float64)
    u = torch.randn(5, J.shape[0], dtype=torch.float64)
    assert torch.allclose(jac.jvp(jac.unflat(t)).reshape(5, -1), t @ J.T, rtol=1e-12, atol=1e-12)
    assert torch.allclose(jac.flat(jac.vjp(u.reshape(5, *jac.output.shape))), u @ J, rtol=1e-12, atol=1e-12)
