"""Exact minibatch influence (matrix-free CG, Lanczos) against a dense autograd Jacobian."""

import numpy as np
import pytest
import torch
from torch import nn

from gradlake import physics
from gradlake.errors import GradlakeError
from gradlake.reduce.exact import (BatchJacobian, conjugate_gradients, exact_influence, lanczos_top,
                                   normalize_matrix, relative_frobenius, spearman)

CHANNELS = physics.EULER_CHANNELS
LAM = 1e-4


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(4, 1, 3, padding=1, padding_mode="circular"), nn.Tanh(),
                         nn.Conv2d(1, 4, 3, padding=1, padding_mode="circular"))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(1)
    x = 1 + 0.1 * torch.randn(3, 4, 3, 3, dtype=torch.float64)
    y = x + 0.05 * torch.randn_like(x)
    model = tiny_model()
    jac = BatchJacobian(model, x)
    res = physics.residuals(jac.output, x, y, ("C", "M", "E"), CHANNELS)
    # Dense J [outputs, p] by autograd, independent of the JVP/VJP path.
    full = torch.func.jacrev(jac._forward)(jac.params)
    J = torch.cat([full[n].reshape(jac.output.numel(), -1) for n in jac.params], 1).numpy()
    return jac, res, J


def test_exact_influence_matches_dense(setup):
    jac, res, J = setup
    assert J.shape[1] < J.shape[0]  # p < outputs: K = JJᵀ is singular, the hard case
    rtol = 1e-8
    pairs = ("CC", "MC", "EC")
    got, infos = exact_influence(jac, res, pairs, LAM, rtol=rtol, block=2)
    n, d = 3, J.shape[0] // 3
    K = J @ J.T
    pi = np.eye(len(K)) - LAM * np.linalg.inv(K + LAM * np.eye(len(K)))  # I − λ(JJᵀ+λI)⁻¹
    flat = {o: r.reshape(n, d).numpy() for o, r in res.items()}
    for pair in pairs:
        ra, rb = flat[pair[0]], flat[pair[1]]
        want = np.array([[ra[i] @ pi[i * d:(i + 1) * d, j * d:(j + 1) * d] @ rb[j] for j in range(n)]
                         for i in range(n)])
        bound = rtol * np.outer(np.linalg.norm(ra, axis=1), np.linalg.norm(rb, axis=1))
        assert np.all(np.abs(got[pair] - want) <= bound), pair
        # The same quantity in parameter space: g_Aᵀ (JᵀJ + λI)⁻¹ g_B.
        ga = np.stack([J[i * d:(i + 1) * d].T @ ra[i] for i in range(n)])
        gb = np.stack([J[j * d:(j + 1) * d].T @ rb[j] for j in range(n)])
        param_form = ga @ np.linalg.solve(J.T @ J + LAM * np.eye(J.shape[1]), gb.T)
        np.testing.assert_allclose(got[pair], param_form, rtol=1e-5, atol=1e-6 * np.abs(param_form).max())
    np.testing.assert_allclose(got["CC"], got["CC"].T, rtol=1e-6)
    assert infos["C"].converged and (infos["C"].relative_residual <= rtol * 1.01).all()


def test_cg_reports_non_convergence(setup):
    jac, res, _ = setup
    with pytest.raises(GradlakeError, match="did not reach"):
        exact_influence(jac, res, ("CC",), LAM, rtol=1e-12, max_iter=3)


def test_cg_solves_a_known_system():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(20, 20))
    K = torch.tensor(m @ m.T)
    b = torch.tensor(rng.normal(size=(3, 20)))
    y, info = conjugate_gradients(lambda u: u @ K, b, 0.5, 1e-10, 200)
    np.testing.assert_allclose(y.numpy(), np.linalg.solve(K.numpy() + 0.5 * np.eye(20), b.numpy().T).T,
                               rtol=1e-7)
    assert info.converged


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
