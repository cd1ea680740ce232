"""Samples of a trajectory dataset, and seeded trajectory splits.

Sample row r is the transition (trajectory n, t) -> t + 1 with r = n * (T - 1) + t,
t = 0 .. T - 2. Splits are by trajectory, never by sample.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from gradlake.errors import InputError

DEFAULT_FRACTIONS = (0.65, 0.05, 0.30)
SPLIT_NAMES = ("train", "val", "test")


def split_counts(n: int, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> tuple[int, int, int]:
    """Trajectories per split for a class of ``n``: largest remainders, at least one in train."""
    fractions = np.asarray(fractions, dtype=np.float64)
    if fractions.shape != (3,) or (fractions < 0).any() or abs(fractions.sum() - 1) > 1e-9:
        raise InputError(f"splits: expected three fractions >= 0 summing to 1, got {list(fractions)}")
    exact = fractions * n
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    if n > 0 and counts[0] == 0:
        counts[int(np.argmax(counts))] -= 1
        counts[0] = 1
    return int(counts[0]), int(counts[1]), int(counts[2])


def split_trajectories(classes: Sequence[str], fractions: Sequence[float] = DEFAULT_FRACTIONS,
                       seed: int = 0) -> list[str]:
    """A split name per trajectory, stratified by class and seeded.

    Each class's trajectories are shuffled by a generator keyed on (seed, class name), so a
    class's split does not depend on which other classes the dataset holds.
    """
    classes = np.asarray(classes, dtype=str)
    out = np.empty(len(classes), dtype=object)
    for name in np.unique(classes):
        members = np.flatnonzero(classes == name)
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode())])
        shuffled = members[rng.permutation(len(members))]
        labels = np.repeat(SPLIT_NAMES, split_counts(len(members), fractions))
        out[shuffled] = labels
    return out.tolist()


class SampleIndex:
    """Row <-> (trajectory, t) for a dataset of ``n_times`` snapshots per trajectory."""

    def __init__(self, trajectories: pa.Table, n_times: int):
        if n_times < 2:
            raise InputError(f"a sample index needs at least two time steps, got {n_times}")
        self.n_trajectories = trajectories.num_rows
        self.steps = n_times - 1
        self._classes = np.asarray(trajectories.column("class").to_pylist(), dtype=str)
        self._splits = np.asarray(trajectories.column("split").to_pylist(), dtype=str)
        self._table = None

    def __len__(self) -> int:
        return self.n_trajectories * self.steps

    @property
    def table(self) -> pa.Table:
        """row int64, trajectory int64, t int32, class str, split str."""
        if self._table is None:
            rows = np.arange(len(self), dtype=np.int64)
            trajectory, t = self.locate(rows)
            self._table = pa.table({
                "row": rows, "trajectory": trajectory, "t": t.astype(np.int32),
                "class": self._classes[trajectory], "split": self._splits[trajectory],
            })
        return self._table

    def select(self, classes=None, splits=None, t_min=None, t_max=None, trajectories=None) -> np.ndarray:
        """Sorted rows matching every given filter (t_min, t_max inclusive)."""
        keep = np.ones(self.n_trajectories, dtype=bool)
        if classes is not None:
            keep &= np.isin(self._classes, _names(classes))
        if splits is not None:
            keep &= np.isin(self._splits, _names(splits))
        if trajectories is not None:
            chosen = np.zeros_like(keep)
            ids = np.asarray(trajectories, dtype=np.int64).reshape(-1)
            chosen[ids[(ids >= 0) & (ids < self.n_trajectories)]] = True
            keep &= chosen
        lo = 0 if t_min is None else max(int(t_min), 0)
        hi = self.steps - 1 if t_max is None else min(int(t_max), self.steps - 1)
        t = np.arange(lo, hi + 1, dtype=np.int64)
        return (np.flatnonzero(keep)[:, None] * self.steps + t[None, :]).reshape(-1)

    def locate(self, rows) -> tuple[np.ndarray, np.ndarray]:
        """(trajectory, t) of each row; InputError for rows outside the index."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise InputError(f"sample rows must lie in 0..{len(self) - 1}, got {rows.min()}..{rows.max()}")
        return rows // self.steps, rows % self.steps


def _names(values) -> list[str]:
    return [values] if isinstance(values, str) else [str(v) for v in values]
