"""The pure solvers: randomized Nyström, its preconditioner, PCG, the dense path (numpy references)."""

import numpy as np
import pytest
import torch

from gradlake.reduce.krylov import NystromPreconditioner, nystrom, pcg

LAM = 1e-3


def psd(n=300, top=1e6, decay=2.0, rank=None, seed=0):
    """A = Q diag(top · k^-decay) Qᵀ (an NTK-like spectrum: κ(A + λI) ~ 1e9 at λ = 1e-3)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    eig = top * np.arange(1, n + 1, dtype=float) ** -decay
    if rank is not None:
        eig[rank:] = 0.0
    return torch.tensor((q * eig) @ q.T), eig


def test_nystrom_recovers_the_top_of_a_low_rank_matrix():
    a, eig = psd(rank=20)
    approx = nystrom(lambda v: v @ a, a.shape[0], LAM, rank=32, max_rank=32)
    np.testing.assert_allclose(approx.eigenvalues[:20].numpy(), eig[:20], rtol=1e-8)
    u = approx.u.numpy()
    np.testing.assert_allclose(u.T @ u, np.eye(32), atol=1e-10)
    low = (u * approx.eigenvalues.numpy()) @ u.T
    assert np.linalg.norm(low - a.numpy()) <= 1e-8 * np.linalg.norm(a.numpy())


def test_nystrom_doubles_until_the_tail_is_near_damping():
    a, eig = psd()
    approx = nystrom(lambda v: v @ a, a.shape[0], 100.0, rank=8, max_rank=300, target=10.0)
    assert approx.rank in (8, 16, 32, 64, 128, 256, 300) and approx.products == approx.rank
    assert approx.eigenvalues[-1] <= 1000.0  # stopped by the target, not the cap
    assert approx.rank < 300


def test_preconditioner_flattens_the_spectrum():
    a, _ = psd(decay=4.0)  # λ_129 ≈ 3.6 λ: rank 128 leaves κ ≈ 5 of 1e9
    approx = nystrom(lambda v: v @ a, a.shape[0], LAM, rank=128, max_rank=128)
    pre = NystromPreconditioner(approx, LAM)
    m = a + LAM * torch.eye(a.shape[0], dtype=a.dtype)
    p_inv = pre(torch.eye(a.shape[0], dtype=a.dtype))
    np.testing.assert_allclose(p_inv.numpy(), p_inv.numpy().T, atol=1e-10)
    # P^-1/2 (A + λI) P^-1/2 has the spectrum of P^-1 (A + λI)
    ev = np.sort(np.linalg.eigvals(p_inv.numpy() @ m.numpy()).real)
    assert np.linalg.cond(m.numpy()) > 1e8 and ev[-1] / ev[0] < 20


def test_nystrom_pcg_solves_an_ill_conditioned_system_plain_cg_does_not():
    a, _ = psd(n=200, decay=3.0)
    rng = np.random.default_rng(1)
    b = torch.tensor(rng.normal(size=(3, 200)))
    want = np.linalg.solve(a.numpy() + LAM * np.eye(200), b.numpy().T).T
    pre = NystromPreconditioner(nystrom(lambda v: v @ a, 200, LAM, rank=64, max_rank=64), LAM)
    x, info = pcg(lambda v: v @ a, b, LAM, 1e-8, 200, pre)
    assert info.converged and (info.relative_residual <= 1.01e-8).all() and info.iterations < 100
    # (A + λI) x = b to rtol 1e-8 bounds Π b = b − λx to 1e-8 ‖b‖ (‖λ(A + λI)⁻¹‖ ≤ 1)
    assert np.abs(LAM * (x.numpy() - want)).max() <= 1e-8 * np.linalg.norm(b.numpy(), axis=1).max()
    # plain CG crawls on κ ~ 1e9: the reason for the preconditioner
    _, plain = pcg(lambda v: v @ a, b, LAM, 1e-8, 200)
    assert not plain.converged and plain.relative_residual.max() > 1e-6


def test_pcg_per_column_tolerance_and_zero_columns():
    a, _ = psd(n=50, decay=1.0)
    b = torch.zeros((2, 50), dtype=torch.float64)
    b[1, 3] = 1.0
    x, info = pcg(lambda v: v @ a, b, LAM, torch.tensor([1e-3, 1e-9], dtype=torch.float64), 500)
    assert torch.all(x[0] == 0) and info.converged
