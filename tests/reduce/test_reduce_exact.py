"""Exact minibatch influence (dense and Nyström-PCG, both spaces) against a dense autograd Jacobian."""

import numpy as np
import pytest
import torch
from torch import nn

from gradlake import physics
from gradlake.errors import GradlakeError
from gradlake.reduce.exact import (BatchJacobian, SolverSettings, exact_influence, lanczos_top,
                                   normalize_matrix, relative_frobenius, spearman)

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
           for m in ("dense", "pcg") for s in ("output", "parameter")]


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: f"{s.method}-{s.space}")
def test_exact_influence_matches_dense(setup, solver):
    jac, res, J = setup
    n = jac.output.shape[0]
    pairs = ("CC", "MC", "EC")
    got, infos = exact_influence(jac, res, pairs, LAM, solver)
    for pair in pairs:
        want = dense_reference(J, res, pair, n)
        na = res[pair[0]].reshape(n, -1).norm(dim=1).numpy()
        nb = res[pair[1]].reshape(n, -1).norm(dim=1).numpy()
        # the stated bound, plus float64 round-off of a system with κ up to ~1e8
        assert np.all(np.abs(got[pair] - want) <= 1e-9 * np.outer(na, nb) + 1e-7 * np.abs(want).max()), pair
        assert relative_frobenius(got[pair], want) <= 1e-6, pair
    np.testing.assert_allclose(got["CC"], got["CC"].T, rtol=1e-6, atol=1e-9 * np.abs(got["CC"]).max())
    assert infos["C"].converged and infos["C"].method == solver.method and infos["C"].space == solver.space


def test_pcg_reports_non_convergence(setup):
    jac, res, _ = setup
    with pytest.raises(GradlakeError, match="did not reach"):
        exact_influence(jac, res, ("CC",), LAM, SolverSettings(method="pcg", rtol=1e-12, max_iter=2, rank=2,
                                                               max_rank=2))


def test_lanczos_top_eigenvalue(setup):
    jac, _, J = setup
    top = lanczos_top(jac.gram, jac.output.shape, LAM, steps=60)
    want = np.linalg.eigvalsh(J @ J.T)[-1] + LAM
    assert abs(top["top"] - want) <= max(top["bound"], 1e-9 * want)
    assert top["bound"] < 1e-6 * want


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
    assert info["C"].converged and np.isfinite(h["CC"]).all()


@pytest.mark.parametrize("space", ["output", "parameter"])
def test_lambda_sweep_equals_separate_solves(setup, space):
    from gradlake.reduce.exact import influence_over_lambdas

    jac, res, J = setup
    n = jac.output.shape[0]
    sweep, eigenvalues = influence_over_lambdas(jac, res, ("CC", "EC"), [1e-6, LAM, 1.0], space=space)
    assert np.all(np.diff(eigenvalues) <= 0)
    np.testing.assert_allclose(eigenvalues[0], np.linalg.eigvalsh(J.T @ J)[-1], rtol=1e-8)
    for lam, h in sweep.items():
        for pair in ("CC", "EC"):
            want = dense_reference(J, res, pair, n) if lam == LAM else None
            got, _ = exact_influence(jac, res, (pair,), lam, SolverSettings(method="dense", space=space))
            np.testing.assert_allclose(h[pair], got[pair], rtol=1e-6, atol=1e-9 * np.abs(got[pair]).max())
            if want is not None:
                assert relative_frobenius(h[pair], want) <= 1e-6
