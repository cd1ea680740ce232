"""Pairwise H out of core: dense tiles, running top-k over tiles, influence vs distance.

A tile of H_AB is (φ_A (η̃ + λI)⁻¹) φ_Bᵀ: a task preconditions its block of response rows
once (O(m k²)) and then streams raw perturbation rows through one matmul per tile, so a
tile costs the same as a plain matmul of its shapes.
"""

from __future__ import annotations

import numpy as np

from gradlake.errors import InputError


def whiten(phi: np.ndarray, whitener: np.ndarray, dtype=np.float32) -> np.ndarray:
    """ψ = φ W in ``dtype`` (rows with a non-finite value become NaN rows)."""
    return (np.asarray(phi, dtype=np.float64) @ whitener).astype(dtype, copy=False)


def precondition(phi: np.ndarray, inverse: np.ndarray, dtype=np.float32) -> np.ndarray:
    """φ (η̃ + λI)⁻¹ in ``dtype``: response rows ready for :func:`tile`."""
    return (np.asarray(phi, dtype=np.float64) @ inverse).astype(dtype, copy=False)


def tile(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """H(i, j) = a_i · b_j: preconditioned response rows [m, k] against raw perturbation rows
    [n, k] (or whitened rows on both sides)."""
    return a @ np.asarray(b, dtype=a.dtype).T


class TopK:
    """The k largest and k smallest H(i, ·) per query row, merged tile by tile.

    Non-finite entries never enter; pairs with equal query and candidate ids are skipped
    when ``exclude_self`` (a sample's self-influence would top its own list).
    """

    def __init__(self, query_ids: np.ndarray, k: int, exclude_self: bool = True):
        if k <= 0:
            raise InputError(f"reduce.topk: expected k > 0, got {k}")
        self.query_ids = np.asarray(query_ids, dtype=np.int64)
        self.k, self.exclude_self = k, exclude_self
        n = len(self.query_ids)
        self.top = np.full((n, k), -np.inf)
        self.top_ids = np.full((n, k), -1, dtype=np.int64)
        self.bottom = np.full((n, k), np.inf)
        self.bottom_ids = np.full((n, k), -1, dtype=np.int64)

    @staticmethod
    def _keep(values, ids, k):
        """The k largest values per row of [n, m] with their ids."""
        if values.shape[1] > k:
            part = np.argpartition(-values, k - 1, axis=1)[:, :k]
            values = np.take_along_axis(values, part, 1)
            ids = np.take_along_axis(ids, part, 1)
        return values, ids

    def update(self, h: np.ndarray, candidate_ids: np.ndarray) -> None:
        """Merge a tile [n_queries, m] whose columns are the samples ``candidate_ids``."""
        h = np.asarray(h, dtype=np.float64)
        candidate_ids = np.asarray(candidate_ids, dtype=np.int64)
        bad = ~np.isfinite(h)
        if self.exclude_self:
            bad |= self.query_ids[:, None] == candidate_ids[None, :]
        ids = np.broadcast_to(candidate_ids, h.shape)
        hi = np.where(bad, -np.inf, h)
        lo = np.where(bad, np.inf, h)
        self.top, self.top_ids = self._keep(np.concatenate([self.top, hi], 1),
                                            np.concatenate([self.top_ids, ids], 1), self.k)
        neg, self.bottom_ids = self._keep(np.concatenate([-self.bottom, -lo], 1),
                                          np.concatenate([self.bottom_ids, ids], 1), self.k)
        self.bottom = -neg

    def result(self) -> dict[str, np.ndarray]:
        """Sorted lists: ``top`` descending, ``bottom`` ascending; id -1 where fewer than k."""
        order = np.argsort(-self.top, axis=1, kind="stable")
        top, top_ids = np.take_along_axis(self.top, order, 1), np.take_along_axis(self.top_ids, order, 1)
        order = np.argsort(self.bottom, axis=1, kind="stable")
        bottom = np.take_along_axis(self.bottom, order, 1)
        bottom_ids = np.take_along_axis(self.bottom_ids, order, 1)
        top_ids[~np.isfinite(top)] = -1
        bottom_ids[~np.isfinite(bottom)] = -1
        return {"top": top, "top_ids": top_ids, "bottom": bottom, "bottom_ids": bottom_ids}


def sample_pairs(rows_i: np.ndarray, rows_j: np.ndarray, n_pairs: int, seed: int = 0):
    """Up to ``n_pairs`` random pairs (i from rows_i, j from rows_j, i ≠ j), seeded."""
    rows_i, rows_j = np.asarray(rows_i, dtype=np.int64), np.asarray(rows_j, dtype=np.int64)
    if not len(rows_i) or not len(rows_j) or n_pairs == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rng = np.random.default_rng(seed)
    i = rows_i[rng.integers(0, len(rows_i), n_pairs)]
    j = rows_j[rng.integers(0, len(rows_j), n_pairs)]
    keep = i != j
    return i[keep], j[keep]


def input_distance(x_i: np.ndarray, x_j: np.ndarray) -> np.ndarray:
    """Root-mean-square difference of two batches of inputs [n, ...] (per pair)."""
    diff = np.asarray(x_i, dtype=np.float64) - np.asarray(x_j, dtype=np.float64)
    return np.sqrt((diff.reshape(len(diff), -1) ** 2).mean(1))


def distance_curve(h: np.ndarray, distance: np.ndarray, n_bins: int) -> dict[str, np.ndarray]:
    """H binned by input distance in equal-count bins (quantiles of the distance):
    per bin its edges, pair count, mean distance and the mean, median and quartiles of H."""
    h, distance = np.asarray(h, dtype=np.float64), np.asarray(distance, dtype=np.float64)
    ok = np.isfinite(h) & np.isfinite(distance)
    h, distance = h[ok], distance[ok]
    if not len(h):
        return {name: np.zeros(0) for name in
                ("lo", "hi", "pairs", "distance", "mean", "median", "q25", "q75")}
    edges = np.unique(np.quantile(distance, np.linspace(0, 1, n_bins + 1)))
    if len(edges) == 1:
        edges = np.array([edges[0], edges[0]])
    which = np.clip(np.searchsorted(edges, distance, side="right") - 1, 0, len(edges) - 2)
    rows = []
    for b in range(len(edges) - 1):
        sel = which == b
        vals = h[sel]
        q25, med, q75 = np.percentile(vals, [25, 50, 75]) if len(vals) else (np.nan,) * 3
        rows.append((edges[b], edges[b + 1], sel.sum(), distance[sel].mean() if len(vals) else np.nan,
                     vals.mean() if len(vals) else np.nan, med, q25, q75))
    cols = np.array(rows, dtype=np.float64).T
    names = ("lo", "hi", "pairs", "distance", "mean", "median", "q25", "q75")
    out = dict(zip(names, cols))
    out["pairs"] = out["pairs"].astype(np.int64)
    return out
