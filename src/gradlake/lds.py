"""The linear datamodeling score (LDS): the numerics (pure numpy; the stage in
gradlake.stages.lds_plan, lds_unit, lds_finish).

Definition (TRAK: Park, Georgiev, Ilyas, Leclerc, Madry, "TRAK: Attributing Model Behavior at
Scale", ICML 2023, Sec. 2.2, Def. 2.3): draw M random subsets S_1..S_M of the training set,
each of a fraction α of it; retrain a model on each; for every test sample i, the LDS is the
Spearman rank correlation across the M subsets between the actual model output f_i(θ_{S_m})
and the attribution's prediction g_i(S_m) = Σ_{j∈S_m} τ_ij; the score reported is its mean
over test samples. Here the units of the training set are whole training trajectories
(a trajectory's samples are not independent), f_i is a test sample's loss (or observable O_A),
and the output is reported as the change against the model trained on every trajectory,
Δ_i(S) = O_A(i; θ_S) − O_A(i; θ_full), a constant shift per test sample that Spearman ignores.

Sign and scale of the prediction. gradlake's H_AC(i, j) = φ_{A,i}ᵀ (η̃ + λI)⁻¹ φ_{C,j} is the
first-order *decrease* of O_A at i per unit of a preconditioned descent step on sample j's loss
(tests/test_sign_convention.py: the step Δθ = −ε (η + λI)⁻¹ g_{C,j} changes O_A(i) by −ε H_AC(i, j)).
Training on j is, to first order, such steps; so including trajectory n lowers O_A(i) by
c·τ_in with τ_in = Σ_{j∈n} H_AC(i, j) and some c > 0 (learning rate × steps × ...), and the
linear datamodel is f_i(S) ≈ const − c Σ_{n∈S} τ_in. Relative to the full model this is

    Δ̂_i(S) = + Σ_{n∉S} τ_in         (removing helpful trajectories, τ > 0, raises the loss)

up to the unknown c > 0, which Spearman's rank correlation is invariant to: only the sign
matters, and a correct attribution gives a positive LDS. The same holds for the plain gradient
inner product φ_{A,i}ᵀ φ_{C,j} (the metric replaced by the identity: an SGD step).
"""

from __future__ import annotations

import numpy as np

from gradlake.errors import InputError
from gradlake.reduce.exact import spearman


def subset_size(n: int, alpha: float) -> int:
    """Items in an α-subset of ``n``: round(α n), at least 1 and at most n − 1."""
    return int(min(n - 1, max(1, round(alpha * n))))


def sample_subsets(n: int, subsets: int, alpha: float, seed: int) -> np.ndarray:
    """[M, n] bool: subset m holds ``subset_size(n, α)`` of the n items, uniformly at random.

    Subset m is a pure function of (seed, m), so a run with more subsets keeps the first ones."""
    if n < 2:
        raise InputError(f"eval.lds: the training split has {n} trajectory; an α-subset needs at least 2")
    size = subset_size(n, alpha)
    masks = np.zeros((subsets, n), dtype=bool)
    for m in range(subsets):
        masks[m, np.random.default_rng([int(seed) & 0xFFFFFFFF, m]).permutation(n)[:size]] = True
    return masks


def influence(response: np.ndarray, perturbation: np.ndarray, inverse: np.ndarray | None) -> np.ndarray:
    """[T, N]: φ_A,i (η̃ + λI)⁻¹ φ_C,jᵀ, or the plain inner products φ_A,iᵀ φ_C,j when ``inverse`` is None."""
    a = np.asarray(response, dtype=np.float64)
    if inverse is not None:
        a = a @ inverse
    return a @ np.asarray(perturbation, dtype=np.float64).T


def group_sums(rows: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """[G, k]: ``rows`` [N, k] summed per group (groups [N] in 0..G−1). Influence is linear in the
    perturbation's φ, so τ of a trajectory is the influence of its summed φ."""
    onehot = np.zeros((n_groups, len(groups)))
    onehot[groups, np.arange(len(groups))] = 1.0
    return onehot @ np.asarray(rows, dtype=np.float64)


def predicted_change(tau: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """[M, T]: Δ̂_i(S_m) = Σ_{n∉S_m} τ_in for τ [T, G] and subsets [M, G] (module docstring)."""
    return (~np.asarray(masks, dtype=bool)).astype(np.float64) @ np.asarray(tau, dtype=np.float64).T


def lds(actual: np.ndarray, predicted: np.ndarray) -> tuple[float, np.ndarray]:
    """(mean over test samples, per-sample values [T]) of the Spearman correlation across subsets
    of ``actual`` and ``predicted`` [M, T]. A sample whose actual or predicted change is constant
    across subsets has no correlation (NaN) and is left out of the mean (NaN if every one is)."""
    actual, predicted = np.asarray(actual), np.asarray(predicted)
    if actual.shape != predicted.shape or actual.ndim != 2:
        raise InputError(f"lds: expected two [subsets, samples] arrays of one shape, got {actual.shape}, "
                         f"{predicted.shape}")
    per_sample = np.array([spearman(actual[:, i], predicted[:, i]) for i in range(actual.shape[1])])
    defined = per_sample[np.isfinite(per_sample)]
    return (float(defined.mean()) if len(defined) else float("nan")), per_sample
