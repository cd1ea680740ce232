"""The LDS numerics (gradlake.lds) against numpy / scipy, and its sign against real training."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from gradlake import lds
from gradlake.errors import InputError


def test_subsets_are_alpha_sized_seeded_prefix_stable_and_uniform():
    masks = lds.sample_subsets(10, 4000, 0.3, seed=7)
    assert masks.shape == (4000, 10) and (masks.sum(axis=1) == 3).all()
    np.testing.assert_array_equal(masks[:5], lds.sample_subsets(10, 5, 0.3, seed=7))  # more subsets keep these
    assert not np.array_equal(masks[:5], lds.sample_subsets(10, 5, 0.3, seed=8))
    np.testing.assert_allclose(masks.mean(axis=0), 0.3, atol=0.03)  # every item equally likely
    assert len({tuple(row) for row in masks[:200]}) > 80  # C(10, 3) = 120: about 97 distinct expected
    assert lds.subset_size(3, 0.01) == 1 and lds.subset_size(3, 0.99) == 2  # never empty, never everything
    with pytest.raises(InputError, match="at least 2"):
        lds.sample_subsets(1, 4, 0.5, 0)


def test_influence_group_sums_and_prediction_against_dense_loops():
    rng = np.random.default_rng(0)
    response, train = rng.normal(size=(5, 6)), rng.normal(size=(9, 6))
    a = rng.normal(size=(6, 6))
    inverse = np.linalg.inv(a @ a.T + np.eye(6))
    h = lds.influence(response, train, inverse)
    for i in range(5):
        for j in range(9):
            np.testing.assert_allclose(h[i, j], response[i] @ inverse @ train[j])
            np.testing.assert_allclose(lds.influence(response, train, None)[i, j], response[i] @ train[j])
    groups = np.array([2, 0, 0, 1, 2, 2, 3, 1, 0])
    sums = lds.group_sums(train, groups, 4)
    for g in range(4):
        np.testing.assert_allclose(sums[g], train[groups == g].sum(axis=0))
    tau = lds.influence(response, sums, inverse)  # linear: the trajectory's summed φ
    np.testing.assert_allclose(tau, np.stack([h[:, groups == g].sum(axis=1) for g in range(4)], axis=1))
    masks = lds.sample_subsets(4, 6, 0.5, 1)
    predicted = lds.predicted_change(tau, masks)
    for m in range(6):
        for i in range(5):
            np.testing.assert_allclose(predicted[m, i], sum(tau[i, g] for g in range(4) if not masks[m, g]))


def test_lds_is_the_mean_per_sample_spearman_of_scipy():
    rng = np.random.default_rng(1)
    actual = rng.normal(size=(12, 7))
    predicted = actual + rng.normal(scale=1.5, size=(12, 7))
    predicted[:4, 2] = predicted[4:8, 2]  # ties
    actual[:, 5] = 3.0  # a constant column: no correlation, left out
    score, per_sample = lds.lds(actual, predicted)
    expected = [stats.spearmanr(actual[:, i], predicted[:, i]).statistic for i in range(7) if i != 5]
    np.testing.assert_allclose(np.delete(per_sample, 5), expected, rtol=1e-12)
    assert np.isnan(per_sample[5])
    np.testing.assert_allclose(score, np.mean(expected), rtol=1e-12)
    assert np.isnan(lds.lds(np.ones((3, 2)), np.ones((3, 2)))[0])
    with pytest.raises(InputError):
        lds.lds(actual, predicted[:, :3])


def test_the_sign_predicts_what_a_gradient_step_does():
    """Least squares, one small gradient-descent step on each subset's summed loss: the change of each
    test loss against the step on every training sample is, to first order, +η Σ_{j∉S} g_iᵀ g_j, so
    the prediction of gradlake.lds (with the identity metric) ranks it almost perfectly (LDS ≈ 1);
    the opposite sign would give ≈ −1."""
    rng = np.random.default_rng(2)
    x_train, x_test = rng.normal(size=(20, 5)), rng.normal(size=(6, 5))
    truth, theta0 = rng.normal(size=5), rng.normal(size=5)
    y_train, y_test = x_train @ truth, x_test @ truth

    def grads(x, y, theta):  # of 0.5 (xᵀθ − y)²
        return (x @ theta - y)[:, None] * x

    def losses(theta):
        return 0.5 * (x_test @ theta - y_test) ** 2

    eta = 1e-4
    g_train, g_test = grads(x_train, y_train, theta0), grads(x_test, y_test, theta0)
    masks = lds.sample_subsets(20, 40, 0.5, seed=3)
    full = losses(theta0 - eta * g_train.sum(axis=0))
    actual = np.stack([losses(theta0 - eta * g_train[mask].sum(axis=0)) - full for mask in masks])
    tau = lds.influence(g_test, lds.group_sums(g_train, np.arange(20), 20), None)
    score, _ = lds.lds(actual, lds.predicted_change(tau, masks))
    assert score > 0.95
