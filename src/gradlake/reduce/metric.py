"""The k-space metric η̃ and its damped inverse (pure numpy, float64).

η̃ = (1/m) Σ_{i∈S} Σ_v φ_{V,i,v} φ_{V,i,v}ᵀ (m probes per sample; the paper's η = Σ_i J_iᵀJ_i,
a sum over the reference set S, not a mean) or, for the empirical Fisher,
Σ_i φ_{C,i} φ_{C,i}ᵀ. With η̃ = U diag(s) Uᵀ, (η̃ + λI)⁻¹ = W Wᵀ for the whitener
W = U diag((s + λ)^-1/2), so every influence H_AB(i, j) = ψ_{A,i} · ψ_{B,j} with ψ = Wᵀφ.

η̃ is a sum of (reference samples × probes) rank-one terms, so its rank is at most that
count; where it is below k, (η̃ + λI)⁻¹ is 1/λ on the directions no probe reached and H
there is the plain inner product φᵀφ / λ, unwhitened. :func:`metric_warnings` says so
(and flags a cliff in the spectrum), with the remedy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gradlake.errors import GradlakeError, InputError


def full_rank_probes(k: int, samples: int) -> int:
    """V probes per sample so that samples × probes >= 2k: a probe metric of full rank (below k it
    is not the metric at all, and a sketch's effective ridge μ_k needs the metric itself)."""
    return max(1, -(-2 * k // max(samples, 1)))


@dataclass
class Moments:
    """Running first and second moments of φ rows (float64), mergeable in any order.

    ``outer`` = Σ_rows φφᵀ (a row with probes contributes the mean over its probes),
    ``total`` = Σ_rows φ (probe-mean), ``count`` rows used, ``skipped`` rows with a
    non-finite value (left out of every sum), ``vectors`` the rank-one terms of ``outer``
    (rows × probes), ``fourth`` = Σ_vectors ‖φ‖⁴ (for the shrinkage estimator).
    """

    k: int
    outer: np.ndarray = field(default=None)
    total: np.ndarray = field(default=None)
    count: int = 0
    skipped: int = 0
    vectors: int = 0
    fourth: float = 0.0

    def __post_init__(self):
        if self.outer is None:
            self.outer = np.zeros((self.k, self.k))
        if self.total is None:
            self.total = np.zeros(self.k)

    def add(self, phi: np.ndarray) -> "Moments":
        """Add rows [n, k], or rows with probes [n, probes, k]."""
        phi = np.asarray(phi, dtype=np.float64)
        if phi.ndim == 2:
            phi = phi[:, None, :]
        if phi.ndim != 3 or phi.shape[-1] != self.k:
            raise InputError(f"moments: expected rows [n, k={self.k}] or [n, probes, k], got {phi.shape}")
        finite = np.isfinite(phi).all(axis=(1, 2))
        self.skipped += int((~finite).sum())
        phi = phi[finite]
        probes = phi.shape[1]
        flat = phi.reshape(-1, self.k)
        self.outer += flat.T @ flat / probes
        self.total += phi.mean(axis=1).sum(axis=0)
        self.count += phi.shape[0]
        self.vectors += phi.shape[0] * probes
        self.fourth += float(((flat * flat).sum(axis=1) ** 2).sum())
        return self

    def merge(self, other: "Moments") -> "Moments":
        return Moments(self.k, self.outer + other.outer, self.total + other.total,
                       self.count + other.count, self.skipped + other.skipped, self.vectors + other.vectors,
                       self.fourth + other.fourth)

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    @property
    def second(self) -> np.ndarray:
        """E[φφᵀ] over the rows used."""
        return self.outer / max(self.count, 1)


def tree_merge(parts: list[Moments]) -> Moments:
    """Pairwise (tree) merge; the order of additions does not depend on the number of workers."""
    if not parts:
        raise GradlakeError("moments: nothing to merge (no rows in the reference set)")
    while len(parts) > 1:
        parts = [parts[i].merge(parts[i + 1]) if i + 1 < len(parts) else parts[i]
                 for i in range(0, len(parts), 2)]
    return parts[0]


ESTIMATORS = ("probes", "shrink")


def shrinkage(moments: Moments) -> float:
    """Ledoit–Wolf weight α of (trace / k) I in (1 − α) η̃ + α (tr η̃ / k) I, from the vectors'
    second moment S = η̃ / rows and Σ‖φ‖⁴ (Ledoit & Wolf, J. Multivariate Anal. 2004)."""
    n, k = moments.vectors, moments.k
    if n == 0 or moments.count == 0:
        return 0.0
    second = moments.outer / moments.count  # Σ_vectors φφᵀ / vectors
    mu = np.trace(second) / k
    delta = float(np.sum((second - mu * np.eye(k)) ** 2))
    beta = max(moments.fourth - n * float(np.sum(second**2)), 0.0) / n**2
    return min(beta, delta) / delta if delta > 0 else 0.0


class Metric:
    """η̃ (symmetrised) and its eigendecomposition, with guards against bad input.

    ``shrink`` = α: the estimator is (1 − α) η̃ + α (tr η̃ / k) I (0: η̃ itself).
    """

    def __init__(self, eta: np.ndarray, source: str = "metric", shrink: float = 0.0):
        eta = np.asarray(eta, dtype=np.float64)
        if eta.ndim != 2 or eta.shape[0] != eta.shape[1]:
            raise InputError(f"{source}: expected a square matrix, got shape {eta.shape}")
        if not np.isfinite(eta).all():
            raise GradlakeError(f"{source}: the metric has non-finite entries")
        self.eta = 0.5 * (eta + eta.T)
        self.shrink = float(shrink)
        if self.shrink:
            self.eta = (1 - self.shrink) * self.eta + self.shrink * np.trace(self.eta) / len(eta) * np.eye(len(eta))
        values, vectors = np.linalg.eigh(self.eta)
        order = np.argsort(values)[::-1]
        # η̃ is PSD by construction; negative eigenvalues are round-off and are clipped.
        self.clipped = int((values < 0).sum())
        self.eigenvalues = np.maximum(values[order], 0.0)
        self.eigenvectors = vectors[:, order]

    @classmethod
    def from_moments(cls, moments: Moments, source: str = "metric", estimator: str = "probes") -> "Metric":
        """η̃ = Σ probe outer products ("probes"), or its Ledoit–Wolf shrinkage ("shrink")."""
        if estimator not in ESTIMATORS:
            raise InputError(f"reduce.metric_estimator: expected one of {', '.join(ESTIMATORS)}, got {estimator!r}")
        return cls(moments.outer, source, shrinkage(moments) if estimator == "shrink" else 0.0)

    @property
    def k(self) -> int:
        return self.eta.shape[0]

    def whitener(self, damping: float) -> np.ndarray:
        """W with W Wᵀ = (η̃ + λI)⁻¹."""
        if not damping > 0:
            raise InputError(f"reduce.damping: expected λ > 0, got {damping!r}")
        return self.eigenvectors * (self.eigenvalues + damping) ** -0.5

    def inverse(self, damping: float) -> np.ndarray:
        """(η̃ + λI)⁻¹."""
        w = self.whitener(damping)
        return w @ w.T


CLIFF_RATIO = 1e6  # a drop of the spectrum by this factor ...
CLIFF_SPAN = 4  # ... within this many indices is a cliff
ZERO = 1e-12  # eigenvalues below ZERO x the largest are numerically zero


def numerical_rank(eigenvalues: np.ndarray) -> int:
    """Eigenvalues (descending) above ZERO x the largest."""
    top = float(eigenvalues[0]) if len(eigenvalues) else 0.0
    return int((eigenvalues > ZERO * top).sum()) if top > 0 else 0


def spectrum_cliff(eigenvalues: np.ndarray) -> int | None:
    """Where the spectrum (descending) first drops by CLIFF_RATIO within CLIFF_SPAN indices,
    starting above numerical zero: the index of the largest one-step drop in that window (the
    last eigenvalue before the cliff); None if there is no cliff."""
    values = np.asarray(eigenvalues, dtype=np.float64)
    rank = numerical_rank(values)
    for i in range(min(rank, len(values) - 1)):
        stop = min(i + CLIFF_SPAN, len(values) - 1)
        if values[stop] * CLIFF_RATIO < values[i]:
            window = values[i:stop + 1]
            drops = window[:-1] / np.maximum(window[1:], np.finfo(np.float64).tiny)
            return i + int(np.argmax(drops))
    return None


def metric_warnings(metric: Metric, samples: int, vectors: int) -> list[dict]:
    """Warnings about η̃ as the metric of H: each {"kind", "message", "remedy", numbers}.

    ``metric``: the probe estimate η̃ itself (not shrunk); ``samples``: reference samples;
    ``vectors``: rank-one terms of η̃ (samples × probes).
    "undersampled" when vectors < k; "cliff" when the spectrum drops by CLIFF_RATIO within
    CLIFF_SPAN indices (at its numerical rank, or where the NTK spectrum itself falls off).
    """
    k, probes = metric.k, vectors // max(samples, 1)
    rank = numerical_rank(metric.eigenvalues)
    need = -(-k // max(samples, 1))
    remedy = (f"store at least {need} V probes per sample (grads.probes; reference samples × probes >= k = {k}), "
              "use a larger reference split, or a smaller k; reduce.metric_estimator = 'shrink' brings the raw "
              "magnitudes of H closer but not its row-std structure (benchmarks/bench_metric.py); the exact "
              "minibatch mode (reduce.exact) computes H without a sketched metric")
    out = []
    if vectors < k:
        out.append({"kind": "undersampled", "k": k, "reference_samples": samples, "probes": probes,
                    "vectors": vectors, "rank": rank,
                    "message": f"the metric η̃ is a sum of {samples} reference samples × {probes} "
                               f"probe{'s' if probes != 1 else ''} = "
                               f"{vectors} rank-one terms, fewer than k = {k}: its rank is {rank}, so "
                               f"(η̃ + λI)⁻¹ is 1/λ on the other {k - rank} directions and H there is the "
                               "unwhitened φᵀφ / λ",
                    "remedy": remedy})
    cliff = spectrum_cliff(metric.eigenvalues)
    if cliff is not None:
        before, after = float(metric.eigenvalues[cliff]), float(metric.eigenvalues[cliff + 1])
        out.append({"kind": "cliff", "index": cliff, "rank": rank, "from": before, "to": after,
                    "message": f"the metric spectrum falls off a cliff after eigenvalue {cliff + 1} of {k} "
                               f"(from {before:.3g} to {after:.3g}): η̃ holds no information on the "
                               "directions beyond it",
                    "remedy": remedy})
    return out
