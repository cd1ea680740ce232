"""Pairwise H out of core: dense tiles, running top-k over tiles, influence vs distance.

A tile of H_AB is (φ_A (η̃ + λI)⁻¹) φ_Bᵀ: a task preconditions its block of response rows
once (O(m k²)) and then streams raw perturbation rows through one matmul per tile, so a
tile costs the same as a plain matmul of its shapes.
"""

from __future__ import annotations

import numpy as np

from gradlake.casting import cast_into
from gradlake.errors import InputError


def whiten(phi: np.ndarray, whitener: np.ndarray, dtype=np.float32) -> np.ndarray:
    """ψ = φ W in ``dtype`` (rows with a non-finite value become NaN rows)."""
    return (np.asarray(phi, dtype=np.float64) @ whitener).astype(dtype, copy=False)


def precondition(phi: np.ndarray, inverse: np.ndarray, dtype=np.float32) -> np.ndarray:
    """φ (η̃ + λI)⁻¹ in ``dtype``: response rows ready for :func:`tile`."""
    return (np.asarray(phi, dtype=np.float64) @ inverse).astype(dtype, copy=False)


CAST_BYTES = 1 << 20  # candidate rows cast at a time by tile(): the slice stays in cache


def tile(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """H(i, j) = a_i · b_j: preconditioned response rows [m, k] against raw perturbation rows
    [n, k] (or whitened rows on both sides). ``b`` may be narrower than ``a`` (float16 as
    stored): it is then cast a cache-sized slice at a time and multiplied there, never
    copied whole to a's dtype (half the memory traffic, no fresh pages)."""
    b = np.asarray(b)
    if b.dtype == a.dtype:
        return a @ b.T
    h = np.empty((len(a), len(b)), dtype=a.dtype)
    rows = max(1, CAST_BYTES // (a.dtype.itemsize * max(1, a.shape[1])))
    wide = np.empty((min(rows, len(b)), a.shape[1]), dtype=a.dtype)
    for start in range(0, len(b), rows):
        part = b[start:start + rows]
        cast_into(wide[:len(part)], part)
        np.matmul(a, wide[:len(part)].T, out=h[:, start:start + len(part)])
    return h


class TopK:
    """The k largest and k smallest H(i, ·) per query row, merged tile by tile.

    Non-finite entries never enter; pairs with equal query and candidate ids are skipped
    when ``exclude_self`` (a sample's self-influence would top its own list). A tile costs
    one comparison per entry against each row's current k-th value; only the entries that
    reach it are sorted in, so the merge costs much less than the matmul that made the tile.
    """

    def __init__(self, query_ids: np.ndarray, k: int, exclude_self: bool = True):
        if k <= 0:
            raise InputError(f"top-k: expected k > 0, got {k}")
        self.query_ids = np.asarray(query_ids, dtype=np.int64)
        self.k, self.exclude_self = k, exclude_self
        n = len(self.query_ids)
        # Scores: the values for the top list, minus the values for the bottom list.
        self._score = {+1: np.full((n, k), -np.inf), -1: np.full((n, k), -np.inf)}
        self._ids = {+1: np.full((n, k), -1, dtype=np.int64), -1: np.full((n, k), -1, dtype=np.int64)}

    def update(self, h: np.ndarray, candidate_ids: np.ndarray) -> None:
        """Merge a tile [n_queries, m] whose columns are the samples ``candidate_ids`` [m]
        (or whose entries are: ids [n_queries, m], -1 for none)."""
        h = np.asarray(h)
        candidate_ids = np.asarray(candidate_ids, dtype=np.int64)
        if candidate_ids.ndim == 2:
            drop = candidate_ids < 0
            if self.exclude_self:
                drop |= candidate_ids == self.query_ids[:, None]
            h = np.where(drop, np.nan, h)
        elif self.exclude_self and len(candidate_ids):
            h = self._without_self(h, candidate_ids)
        for sign in (+1, -1):
            self._merge(sign, h, candidate_ids)

    def merge(self, result: dict[str, np.ndarray]) -> None:
        """Merge another TopK's :meth:`result` over the same queries (other candidates)."""
        for sign, kind in ((+1, "top"), (-1, "bottom")):
            ids = result[f"{kind}_ids"]
            self._merge(sign, np.where(ids >= 0, result[kind], np.nan), ids)

    def _without_self(self, h: np.ndarray, candidate_ids: np.ndarray) -> np.ndarray:
        order = np.argsort(candidate_ids, kind="stable")
        at = np.clip(np.searchsorted(candidate_ids, self.query_ids, sorter=order), 0, len(order) - 1)
        column = order[at]
        hit = np.flatnonzero(candidate_ids[column] == self.query_ids)
        if not len(hit):
            return h
        h = np.array(h, dtype=np.result_type(h.dtype, np.float32))
        h[hit, column[hit]] = np.nan
        return h

    def _merge(self, sign: int, h: np.ndarray, candidate_ids: np.ndarray) -> None:
        """Merge ``h`` [n, m] with ids per column [m] or per entry [n, m] into one list."""
        score, ids = self._score[sign], self._ids[sign]
        threshold = score.min(axis=1)  # the k-th best score so far (-inf until k are held)
        if h.shape[1] > 4 * self.k and np.isneginf(threshold).any():
            threshold = np.maximum(threshold, self._estimate(sign, h))
        threshold = (sign * threshold).astype(h.dtype)[:, None]
        beats = np.flatnonzero(h >= threshold if sign > 0 else h <= threshold)
        qi, cj = np.divmod(beats, h.shape[1])
        values = sign * h[qi, cj].astype(np.float64)
        finite = np.isfinite(values)
        qi, cj, values = qi[finite], cj[finite], values[finite]
        if not len(qi):
            return
        new_ids = candidate_ids[qi, cj] if candidate_ids.ndim == 2 else candidate_ids[cj]
        first = np.flatnonzero(np.r_[True, qi[1:] != qi[:-1]])  # qi is sorted (row-major order)
        rows, counts = qi[first], np.diff(np.r_[first, len(qi)])
        slot = np.arange(len(qi)) - np.repeat(first, counts)
        which = np.repeat(np.arange(len(rows)), counts)
        pad = np.full((len(rows), counts.max()), -np.inf)
        pad_ids = np.full(pad.shape, -1, dtype=np.int64)
        pad[which, slot], pad_ids[which, slot] = values, new_ids
        both = np.concatenate([score[rows], pad], 1)
        both_ids = np.concatenate([ids[rows], pad_ids], 1)
        keep = np.argpartition(-both, self.k - 1, axis=1)[:, :self.k]
        score[rows] = np.take_along_axis(both, keep, 1)
        ids[rows] = np.take_along_axis(both_ids, keep, 1)

    def _estimate(self, sign: int, h: np.ndarray) -> np.ndarray:
        """A lower bound of each row's k-th best score in ``h``: the k-th best of its first
        columns (so a fresh list does not sort in a whole tile)."""
        head = sign * np.asarray(h[:, :max(16 * self.k, 1024)], dtype=np.float64)
        head[~np.isfinite(head)] = -np.inf
        if head.shape[1] < self.k:
            return np.full(len(head), -np.inf)
        return -np.partition(-head, self.k - 1, axis=1)[:, self.k - 1]

    def result(self) -> dict[str, np.ndarray]:
        """Sorted lists: ``top`` descending, ``bottom`` ascending; id -1 where fewer than k."""
        out = {}
        for sign, kind in ((+1, "top"), (-1, "bottom")):
            order = np.argsort(-self._score[sign], axis=1, kind="stable")
            values = sign * np.take_along_axis(self._score[sign], order, 1)
            ids = np.take_along_axis(self._ids[sign], order, 1)
            ids[~np.isfinite(values)] = -1
            out[kind], out[f"{kind}_ids"] = values, ids
        return out


def sample_pairs(rows_i: np.ndarray, rows_j: np.ndarray, n_pairs: int, seed: int = 0):
    """Up to ``n_pairs`` random pairs (i from rows_i, j from rows_j, i ≠ j), seeded."""
    rows_i, rows_j = np.asarray(rows_i, dtype=np.int64), np.asarray(rows_j, dtype=np.int64)
    ranks_i, ranks_j = pair_ranks(len(rows_i), len(rows_j), n_pairs, seed)
    i, j = rows_i[ranks_i], rows_j[ranks_j]
    keep = i != j
    return i[keep], j[keep]


def pair_ranks(n_i: int, n_j: int, n_pairs: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The positions in rows_i and rows_j of :func:`sample_pairs`' draws (before dropping i = j),
    so the rows can be looked up where they are stored."""
    if not n_i or not n_j or n_pairs == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_i, n_pairs), rng.integers(0, n_j, n_pairs)


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
