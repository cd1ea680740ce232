"""The metric's rank-deficiency and spectrum-cliff warnings: fire when η̃ is undersampled, not otherwise."""

from __future__ import annotations

import numpy as np

from gradlake.reduce.metric import Metric, Moments, metric_warnings, numerical_rank, spectrum_cliff


def _metric(phi: np.ndarray) -> tuple[Metric, Moments]:
    moments = Moments(phi.shape[-1]).add(phi[: len(phi) // 2]).merge(Moments(phi.shape[-1]).add(phi[len(phi) // 2:]))
    return Metric.from_moments(moments), moments


def test_undersampled_metric_warns_with_the_remedy():
    rng = np.random.default_rng(0)
    metric, moments = _metric(rng.normal(size=(3, 2, 20)))  # 3 samples x 2 probes = 6 < k = 20
    assert (moments.count, moments.vectors) == (3, 6)
    warnings = metric_warnings(metric, moments.count, moments.vectors)
    kinds = {w["kind"]: w for w in warnings}
    assert set(kinds) == {"undersampled", "cliff"}
    under = kinds["undersampled"]
    assert (under["k"], under["vectors"], under["rank"], under["probes"]) == (20, 6, 6, 2)
    assert "at least 7 V probes per sample" in under["remedy"]  # ceil(20 / 3)
    assert "6 rank-one terms, fewer than k = 20" in under["message"]
    assert kinds["cliff"]["index"] == 5  # the sixth eigenvalue is the last non-zero one


def test_well_sampled_metric_does_not_warn():
    rng = np.random.default_rng(1)
    scales = np.geomspace(1.0, 1e-2, 12)  # a decaying but smooth spectrum
    metric, moments = _metric(rng.normal(size=(40, 2, 12)) * scales)
    assert moments.vectors == 80 and numerical_rank(metric.eigenvalues) == 12
    assert metric_warnings(metric, moments.count, moments.vectors) == []


def test_a_cliff_in_a_well_sampled_spectrum_is_found():
    rng = np.random.default_rng(2)
    basis = np.linalg.qr(rng.normal(size=(10, 10)))[0]
    phi = rng.normal(size=(50, 10)) * np.array([1.0, 0.9, 0.8, 0.7] + [1e-5] * 6)  # 4 directions, then 1e-10
    metric, moments = _metric(phi @ basis.T)
    warnings = metric_warnings(metric, moments.count, moments.vectors)
    assert [w["kind"] for w in warnings] == ["cliff"]
    assert warnings[0]["index"] == 3 and "after eigenvalue 4 of 10" in warnings[0]["message"]
    assert spectrum_cliff(np.geomspace(1.0, 1e-5, 10)) is None  # steady decay: 1e-5 overall, no cliff
    assert spectrum_cliff(np.array([1.0, 1e-3, 1e-7, 1e-8])) == 1  # 1e7 within the span; the largest step


def test_shrinkage_weight_matches_the_ledoit_wolf_formula_and_helps_when_undersampled():
    rng = np.random.default_rng(3)
    n, probes, d, k, lam = 4, 2, 30, 24, 1e-6
    blocks = rng.normal(size=(n, d, k)) * np.geomspace(1, 1e-2, k)  # P J_iᵀ of each sample: η* = Σ BᵀB
    exact = np.einsum("nok,nol->kl", blocks, blocks)
    signs = rng.choice([-1.0, 1.0], size=(n, probes, d))
    phi = np.einsum("nmo,nok->nmk", signs, blocks)
    moments = Moments(k).add(phi[:2]).merge(Moments(k).add(phi[2:]))
    vectors = phi.reshape(-1, k)
    second = vectors.T @ vectors / len(vectors)
    mu = np.trace(second) / k
    beta = sum(np.sum((np.outer(x, x) - second) ** 2) for x in vectors) / len(vectors) ** 2
    alpha = min(beta, np.sum((second - mu * np.eye(k)) ** 2)) / np.sum((second - mu * np.eye(k)) ** 2)
    shrunk = Metric.from_moments(moments, estimator="shrink")
    assert 0 < shrunk.shrink < 1 and np.isclose(shrunk.shrink, alpha, rtol=1e-9)
    np.testing.assert_allclose(shrunk.eta, (1 - alpha) * moments.outer + alpha * np.trace(moments.outer) / k
                               * np.eye(k), rtol=1e-9, atol=1e-12)
    assert numerical_rank(shrunk.eigenvalues) == k  # the complement is filled
    # Raw H on the reference samples' loss gradients: far closer to the exact metric's.
    c = np.einsum("no,nok->nk", rng.normal(size=(n, d)), blocks)
    reference = c @ np.linalg.inv(exact + lam * np.eye(k)) @ c.T

    def error(metric):
        return np.linalg.norm(c @ metric.inverse(lam) @ c.T - reference) / np.linalg.norm(reference)

    plain = Metric.from_moments(moments)
    assert plain.shrink == 0 and error(shrunk) < 0.1 * error(plain)


def test_full_rank_probes_size_the_metric_to_twice_k():
    from gradlake.reduce.metric import full_rank_probes

    for k, samples in ((1604, 72), (1604, 12), (10, 100), (7, 7)):
        probes = full_rank_probes(k, samples)
        assert samples * probes >= 2 * k and (probes == 1 or samples * (probes - 1) < 2 * k)
    assert full_rank_probes(1604, 72) == 45
