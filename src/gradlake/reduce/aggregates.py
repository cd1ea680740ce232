"""Group averages of H in O(N k²): two-time matrices, lag curves, transfer matrices.

With whitened rows ψ = Wᵀφ (metric.py), H_AB(i, j) = a_i · b_j where, per normalisation,

    none      a_i = ψ_{A,i}                 b_j = ψ_{B,j}
    row-std   a_i = ψ_{A,i} / σ_i           b_j = ψ_{B,j}
              σ_i² = Var_{j∈ref} H(i, j) = ψ_{A,i}ᵀ E[ψ_Bψ_Bᵀ] ψ_{A,i} − (ψ_{A,i}·E[ψ_B])²
              (population variance over the reference set; σ_i = 0 gives a zero row)
    cosine    a_i = ψ_{A,i} / ‖ψ_{A,i}‖     b_j = ψ_{B,j} / ‖ψ_{B,j}‖
              so a_i · b_j = H_AB(i,j) / sqrt(H_AA(i,i) H_BB(j,j)) exactly, and the group
              average of the cosine is the bilinear form of group sums of unit vectors.

Every aggregate is a mean over sample pairs (i, j) — i a response sample, j a
perturbation sample — of a_i · b_j, so it is a bilinear form of group sums:
Σ_{i∈g} a_i · Σ_{j∈g'} b_j. Groups are (class, t); pairs in the same trajectory are
summed per trajectory as a T×T product (O(T² k) per trajectory) and subtracted where a
relation excludes them. Relations of a pair (i, j):

    same_trajectory   traj(i) = traj(j)
    same_class        class(i) = class(j), traj(i) ≠ traj(j)
    other_class       class(i) ≠ class(j)

Work happens on blocks of whole trajectories laid out as slots [trajectory, t]; a slot
without a sample (or not selected, or with a non-finite φ) holds zeros and a False mask.

By layer (gradlake.reduce.layers), the lag curves also split into the shares of layer
groups g: a_i = s_i ψ_{A,i} (s_i: the normalisation's factor of the whole row) and
ψ_{A,i} = φ_{A,i} w = Σ_g (φ_{A,i} on g's entries) w, so the pair sums with a_i replaced
by s_i (φ_{A,i} on g) w are g's share of every mean; the shares sum to the curve.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from dataclasses import dataclass, fields

import numpy as np

from gradlake.errors import InputError
from gradlake.reduce.layers import Layers

RELATIONS = ("same_trajectory", "same_class", "other_class")


# --------------------------------------------------------------------------- layout
@dataclass
class TrajectoryBlock:
    """Whole trajectories as padded slots [n, T]: ``rows`` lists the block's samples in
    reading order and ``slots`` their flat slot index (trajectory_position * T + t)."""

    trajectories: np.ndarray  # [n] trajectory ids
    classes: np.ndarray  # [n] class index
    n_times: int
    rows: np.ndarray  # [m] sample rows
    slots: np.ndarray  # [m]
    response: np.ndarray  # [n, T] bool: slot is a response sample
    perturbation: np.ndarray  # [n, T] bool: slot is a perturbation sample

    @classmethod
    def build(cls, rows, trajectory, t, class_index, response, perturbation, n_times: int):
        """From per-sample columns (any order) of whole trajectories."""
        rows, trajectory, t = (np.asarray(x, dtype=np.int64) for x in (rows, trajectory, t))
        if len(t) and (t.min() < 0 or t.max() >= n_times):
            raise InputError(f"samples: t must lie in [0, {n_times}), got [{t.min()}, {t.max()}]")
        trajs, position = np.unique(trajectory, return_inverse=True)
        class_index = np.asarray(class_index, dtype=np.int64)
        classes = np.zeros(len(trajs), dtype=np.int64)
        classes[position] = class_index
        slots = position * n_times + t
        shape = (len(trajs), n_times)
        resp = np.zeros(shape, dtype=bool)
        pert = np.zeros(shape, dtype=bool)
        resp.flat[slots] = np.asarray(response, dtype=bool)
        pert.flat[slots] = np.asarray(perturbation, dtype=bool)
        return cls(trajs, classes, n_times, rows, slots, resp, pert)

    def scatter(self, values: np.ndarray, finite_only: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Rows [m, k] (in ``rows`` order) -> (padded float64 [n, T, k], finite mask [n, T])."""
        values = np.asarray(values, dtype=np.float64)
        n, T = self.response.shape
        out = np.zeros((n * T, values.shape[-1]))
        ok = np.zeros(n * T, dtype=bool)
        finite = np.isfinite(values).all(axis=-1)
        keep = finite if finite_only else np.ones_like(finite)
        out[self.slots[keep]] = values[keep]
        ok[self.slots[keep]] = True
        return out.reshape(n, T, -1), ok.reshape(n, T)


# --------------------------------------------------------------------------- normalisation
def row_std(psi_a: np.ndarray, mean_b: np.ndarray, second_b: np.ndarray) -> np.ndarray:
    """σ_i = std over the reference set of H(i, ·), from E[ψ_B] and E[ψ_Bψ_Bᵀ]."""
    quad = ((psi_a @ second_b) * psi_a).sum(axis=-1)  # a BLAS matmul, not an einsum loop
    lin = psi_a @ mean_b
    return np.sqrt(np.maximum(quad - lin * lin, 0.0))


def _divide_rows(x: np.ndarray, denom: np.ndarray) -> np.ndarray:
    scale = np.divide(1.0, denom, out=np.zeros_like(denom), where=denom > 0)
    return x * scale[..., None]


def response_scale(psi_a, norm: str, mean_b=None, second_b=None) -> np.ndarray:
    """The row factor s_i of a normalisation: a_i = s_i ψ_{A,i} (0 where its divisor is 0)."""
    if norm == "none":
        return np.ones(psi_a.shape[:-1])
    if norm == "row-std":
        denom = row_std(psi_a, mean_b, second_b)
    elif norm == "cosine":
        denom = np.linalg.norm(psi_a, axis=-1)
    else:
        raise InputError(f"reduce.normalize: unknown normalisation {norm!r}")
    return np.divide(1.0, denom, out=np.zeros_like(denom), where=denom > 0)


def normalized(psi_a, psi_b, norm: str, mean_b=None, second_b=None):
    """(a, b) of a normalisation (see the module docstring). mean_b/second_b: whitened
    reference moments of the perturbation observable (row-std only)."""
    if norm == "none":
        return psi_a, psi_b
    a = psi_a * response_scale(psi_a, norm, mean_b, second_b)[..., None]
    return a, (psi_b if norm == "row-std" else _divide_rows(psi_b, np.linalg.norm(psi_b, axis=-1)))


# --------------------------------------------------------------------------- accumulation
def _one_hot(classes: np.ndarray, n_classes: int) -> np.ndarray:
    onehot = np.zeros((n_classes, len(classes)))
    onehot[classes, np.arange(len(classes))] = 1.0
    return onehot


def class_time_sums(values: np.ndarray, mask: np.ndarray, classes: np.ndarray, n_classes: int):
    """Σ over the block's trajectories of each class: ([C, T, k] sums, [C, T] counts).
    ``values`` must be zero where ``mask`` is False."""
    n, T, k = values.shape
    onehot = _one_hot(classes, n_classes)
    sums = (onehot @ values.reshape(n, T * k)).reshape(n_classes, T, k)
    return sums, onehot @ mask.astype(np.float64)


@dataclass
class Sums:
    """Additive sufficient statistics of one (checkpoint, λ, pair, normalisation)."""

    response: np.ndarray  # [C, T, k]   Σ a_i over response samples of (c, t)
    n_response: np.ndarray  # [C, T]
    perturbation: np.ndarray  # [C, T, k]   Σ b_j over perturbation samples of (c, t)
    n_perturbation: np.ndarray  # [C, T]
    same: np.ndarray  # [C, T, T]   Σ over same-trajectory pairs ((n,t), (n,t')) of a·b
    n_same: np.ndarray  # [C, T, T]

    def __add__(self, other: "Sums") -> "Sums":
        return Sums(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


def perturbation_sums(b, mask_b, classes, n_classes):
    """Pass 1 of the aggregates: the perturbation group sums (needed by every lag curve)."""
    return class_time_sums(b, mask_b, classes, n_classes)


def lag_matrix(n_times: int) -> np.ndarray:
    """[T*T, 2T-1] 0/1 matrix summing a T×T matrix along diagonals; column Δ + T - 1 holds
    entries with t_response - t_perturbation = Δ."""
    t = np.arange(n_times)
    lag = (t[:, None] - t[None, :]).ravel() + n_times - 1
    out = np.zeros((n_times * n_times, 2 * n_times - 1))
    out[np.arange(n_times * n_times), lag] = 1.0
    return out


def response_block(a, mask_a, b, mask_b, classes, pert_sums, n_pert, shares=()):
    """Pass 2 on one block of whole trajectories.

    a, b: [n, T, k] (zeros outside the masks); pert_sums [C, T, k], n_pert [C, T]: the
    complete perturbation sums from pass 1. Returns (block's Sums without the
    perturbation part, per-trajectory lag sums [n, 3, 2T-1], lag pair counts [n, 3, 2T-1],
    the lag sums [G, n, 3, 2T-1] of each response part of ``shares`` (G × [n, T, k], summing
    to a) in place of a).
    """
    n, T, _ = a.shape
    C = pert_sums.shape[0]
    onehot = _one_hot(classes, C)
    resp_sums, n_resp = class_time_sums(a, mask_a, classes, C)
    mr, mq = mask_a.astype(np.float64), mask_b.astype(np.float64)
    same = a @ b.transpose(0, 2, 1)  # [n, T, T]
    n_same = mr[:, :, None] * mq[:, None, :]
    # Perturbations in the same class but other trajectories; in other classes.
    class_b = pert_sums[classes] - b
    n_class_b = n_pert[classes] - mq
    other_b = pert_sums.sum(0)[None] - pert_sums[classes]
    n_other_b = n_pert.sum(0)[None] - n_pert[classes]
    pair_sums = np.stack([same, a @ class_b.transpose(0, 2, 1), a @ other_b.transpose(0, 2, 1)], 1)
    pair_counts = np.stack([n_same, mr[:, :, None] * n_class_b[:, None, :],
                            mr[:, :, None] * n_other_b[:, None, :]], 1)
    lags = lag_matrix(T)
    lag_sums = pair_sums.reshape(n, 3, T * T) @ lags
    lag_counts = pair_counts.reshape(n, 3, T * T) @ lags
    share_sums = np.stack([np.stack([part @ x.transpose(0, 2, 1) for x in (b, class_b, other_b)], 1)
                           .reshape(n, 3, T * T) @ lags for part in shares]) if len(shares) else None
    sums = Sums(resp_sums, n_resp, np.zeros_like(pert_sums), np.zeros_like(n_pert),
                (onehot @ same.reshape(n, T * T)).reshape(C, T, T),
                (onehot @ n_same.reshape(n, T * T)).reshape(C, T, T))
    return sums, lag_sums, lag_counts, share_sums


def _mean(total, count):
    total = np.asarray(total, dtype=np.float64)
    return np.divide(total, count, out=np.full_like(total, np.nan), where=np.asarray(count) > 0)


def finalize(s: Sums) -> dict[str, np.ndarray]:
    """Group means from complete Sums (NaN where a group has no pairs).

    twotime       [3, C, T, T]  relation, class of both samples, t_response, t_perturbation
                                (other_class: the perturbation in any other class)
    class_twotime [C, C, T, T]  response class, perturbation class, t, t' (pairs in other
                                trajectories; the diagonal equals twotime[same_class])
    transfer      [C, C]        class_twotime averaged over all its pairs
    and the pair counts of each (``*_pairs``).
    """
    C = s.response.shape[0]
    full = np.einsum("ctk,duk->cdtu", s.response, s.perturbation)  # [C, C, T, T]
    n_full = np.einsum("ct,du->cdtu", s.n_response, s.n_perturbation)
    diag = np.arange(C)
    full[diag, diag] -= s.same
    n_full[diag, diag] -= s.n_same
    off = ~np.eye(C, dtype=bool)
    other = np.einsum("cd,cdtu->ctu", off, full)
    n_other = np.einsum("cd,cdtu->ctu", off, n_full)
    twotime_sums = np.stack([s.same, full[diag, diag], other])
    twotime_pairs = np.stack([s.n_same, n_full[diag, diag], n_other])
    return {
        "twotime": _mean(twotime_sums, twotime_pairs),
        "twotime_pairs": twotime_pairs,
        "class_twotime": _mean(full, n_full),
        "class_twotime_pairs": n_full,
        "transfer": _mean(full.sum((2, 3)), n_full.sum((2, 3))),
        "transfer_pairs": n_full.sum((2, 3)),
    }


def complete(parts: list[Sums], perturbation: tuple[np.ndarray, np.ndarray]) -> Sums:
    """The total Sums of a variant: response-pass parts of every block plus pass-1 sums."""
    total = functools.reduce(operator.add, parts)
    return dataclasses.replace(total, perturbation=perturbation[0], n_perturbation=perturbation[1])


def lag_values(lag_sums: np.ndarray, lag_counts: np.ndarray) -> np.ndarray:
    """Per-trajectory lag curves: mean of H over the pairs at each lag (NaN if none)."""
    return _mean(lag_sums, lag_counts)


def lag_statistics(values: np.ndarray) -> dict[str, np.ndarray]:
    """Median and quartiles over the first axis, ignoring NaN; ``n`` non-NaN entries."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN lags give NaN
        q25, median, q75 = np.nanpercentile(values, [25, 50, 75], axis=0)
    return {"median": median, "q25": q25, "q75": q75, "n": np.isfinite(values).sum(0)}


# --------------------------------------------------------------------------- one block, every variant
class AggregateReducer:
    """Both passes of the aggregate reduce on blocks of whole trajectories, for every
    (damping λ, pair "AB", normalisation) variant. Pure: arrays in, arrays out.

    whiteners: {λ: W}; reference: {observable B: Moments of φ_B over the reference set}
    (for row-std); pairs like "CC", "MC" (response A, perturbation B); ``layers``
    (:class:`Layers`): also split the lag curves into layer-group shares.
    """

    def __init__(self, whiteners: dict[float, np.ndarray], reference: dict, pairs, norms, n_classes: int,
                 layers: Layers | None = None):
        self.whiteners = dict(whiteners)
        self.layers = layers
        self.pairs = tuple(pairs)
        self.norms = tuple(norms)
        self.n_classes = n_classes
        self.observables = sorted({o for pair in self.pairs for o in pair})
        self.ref = {}
        for lam, w in self.whiteners.items():
            for obs in {pair[1] for pair in self.pairs}:
                mom = reference[obs]
                self.ref[lam, obs] = (w.T @ mom.mean, w.T @ mom.second @ w)

    @property
    def variants(self) -> list[tuple[float, str, str]]:
        return [(lam, pair, norm) for lam in self.whiteners for pair in self.pairs for norm in self.norms]

    def _whitened(self, block: TrajectoryBlock, phis: dict[str, np.ndarray]):
        padded = {obs: block.scatter(phis[obs]) for obs in self.observables}
        for lam, w in self.whiteners.items():
            yield lam, {obs: (vals @ w, ok) for obs, (vals, ok) in padded.items()}, padded

    def _group_parts(self, lam: float, phi: np.ndarray) -> list[np.ndarray]:
        """Each layer group's part of the whitened rows: (φ on g's entries) w (none without layers)."""
        w = self.whiteners[lam]
        return [phi[..., idx] @ w[idx] for idx in self.layers.group_slices()] if self.layers else []

    def _variant_vectors(self, lam, psi, pair, norm, block):
        (psi_a, ok_a), (psi_b, ok_b) = psi[pair[0]], psi[pair[1]]
        mean_b, second_b = self.ref[lam, pair[1]]
        a, b = normalized(psi_a, psi_b, norm, mean_b, second_b)
        mask_a, mask_b = block.response & ok_a, block.perturbation & ok_b
        return a * mask_a[..., None], mask_a, b * mask_b[..., None], mask_b

    def perturbation(self, block: TrajectoryBlock, phis: dict[str, np.ndarray]) -> dict:
        """Pass 1: {(λ, pair, norm): (perturbation sums [C, T, k], counts [C, T])}."""
        out = {}
        for lam, psi, _ in self._whitened(block, phis):
            for pair in self.pairs:
                for norm in self.norms:
                    _, _, b, mask_b = self._variant_vectors(lam, psi, pair, norm, block)
                    out[lam, pair, norm] = perturbation_sums(b, mask_b, block.classes, self.n_classes)
        return out

    def response(self, block: TrajectoryBlock, phis: dict[str, np.ndarray], perturbation: dict):
        """Pass 2: ({variant: (Sums, lag sums [n, 3, L], lag counts [n, 3, L], layer-group
        lag sums [G, n, 3, L] or None)}, per-sample diagonal {(λ, pair): (H_AB(i, i) [n, T],
        σ_i [n, T])})."""
        out, diagonal = {}, {}
        for lam, psi, padded in self._whitened(block, phis):
            parts = {obs: self._group_parts(lam, padded[obs][0]) for obs in {pair[0] for pair in self.pairs}}
            for pair in self.pairs:
                (psi_a, ok_a), (psi_b, ok_b) = psi[pair[0]], psi[pair[1]]
                mean_b, second_b = self.ref[lam, pair[1]]
                valid = ok_a & ok_b
                diagonal[lam, pair] = (np.where(valid, (psi_a * psi_b).sum(-1), np.nan),
                                       np.where(ok_a, row_std(psi_a, mean_b, second_b), np.nan))
                for norm in self.norms:
                    a, mask_a, b, mask_b = self._variant_vectors(lam, psi, pair, norm, block)
                    sums, n_sums = perturbation[lam, pair, norm]
                    scale = response_scale(psi_a, norm, mean_b, second_b) * mask_a if self.layers else None
                    shares = [part * scale[..., None] for part in parts[pair[0]]]
                    out[lam, pair, norm] = response_block(a, mask_a, b, mask_b, block.classes, sums, n_sums, shares)
        return out, diagonal
