"""The reduce's plan, part by part: what a scan of one part of the samples table gives the
planner (:func:`part_index`), the row spans of blocks folded from them in row order
(:class:`BlockPlan`, O(blocks) numbers), and the lookup of rows by rank (:func:`rows_at`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradlake.stages.reduce_source import StoreRef, matches


@dataclass
class PartIndex:
    """What the planner needs of one part (a shard range) of the samples table: selected
    rows per selection, sorted (transient: the driver folds it into a :class:`BlockPlan`)."""

    shards: tuple[int, int]
    samples: int
    classes: tuple[str, ...]
    max_t: int
    reference: np.ndarray
    response: int  # counts of the aggregate selections
    perturbation: int
    kept: np.ndarray  # rows in the response or perturbation selection ...
    kept_trajectory: np.ndarray  # ... and their trajectories
    queries: np.ndarray  # top-k query rows
    tile_rows: np.ndarray  # at most tile_max rows of each tile selection
    tile_cols: np.ndarray


def part_index(src: StoreRef, shards: tuple[int, int], settings) -> PartIndex:
    """Scan one part's sample rows (filters applied in memory on the part) for the planner."""
    table = src.samples(shards)
    rows = table.column("row").to_numpy().astype(np.int64)
    response, perturbation = matches(table, settings.response), matches(table, settings.perturbation)
    keep = response | perturbation

    def selected(where: str, limit=None) -> np.ndarray:
        return rows[matches(table, where)][:limit]

    return PartIndex(
        shards=shards, samples=len(rows),
        classes=tuple(np.unique(table.column("class").to_numpy(zero_copy_only=False)).tolist()),
        max_t=int(table.column("t").to_numpy().max()) if len(rows) else -1,
        reference=rows[matches(table, f"split == '{settings.reference_split}'")],
        response=int(response.sum()), perturbation=int(perturbation.sum()), kept=rows[keep],
        kept_trajectory=table.column("trajectory").to_numpy()[keep],
        queries=selected(settings.topk_queries) if settings.topk else rows[:0],
        tile_rows=selected(settings.tile_rows, settings.tile_max),
        tile_cols=selected(settings.tile_cols, settings.tile_max))


class BlockPlan:
    """The reduce's blocks, planned from the parts of the samples table fed in row order,
    holding O(blocks) numbers (never a row per sample):

    - ``reference_blocks``: row spans [lo, hi) of ``block_rows`` reference rows each (the
      metric pass and the top-k candidates), as :func:`row_blocks` cuts the reference rows;
    - ``trajectory_blocks``: row spans of the aggregate passes' blocks of whole trajectories,
      about ``block_rows`` selected rows each, cut only where a trajectory starts: a block
      ends at the first trajectory start at least ``block_rows`` selected rows after its own;
    - ``query_blocks``: row spans of ``query_rows`` top-k queries each;
    - the first ``tile_max`` rows of each tile selection, the counts, classes and n_times.
    """

    def __init__(self, block_rows: int, query_rows: int, tile_max: int):
        self.block_rows, self.query_rows, self.tile_max = block_rows, query_rows, tile_max
        self.samples = self.response = self.perturbation = self.queries = 0
        self.parts: list[dict] = []  # per part: shards, response and perturbation counts
        self.classes: set[str] = set()
        self.n_times = 0
        self._reference = _RankCuts(block_rows)
        self._query = _RankCuts(query_rows)
        self._cuts: list[int] = []  # first row of each trajectory block
        self._kept = 0  # selected rows so far
        self._begin = 0  # position (among them) of the block being filled
        self._last_trajectory = None
        self.tile_rows, self.tile_cols = np.zeros(0, np.int64), np.zeros(0, np.int64)

    def add(self, part: PartIndex) -> None:
        """Fold in the next part (parts in row order)."""
        self.samples += part.samples
        self.response += part.response
        self.perturbation += part.perturbation
        self.parts.append({"shards": part.shards, "response": part.response, "perturbation": part.perturbation})
        self.classes.update(part.classes)
        self.n_times = max(self.n_times, part.max_t + 1)
        self._reference.add(part.reference)
        self._query.add(part.queries)
        self.queries += len(part.queries)
        self.tile_rows = np.r_[self.tile_rows, part.tile_rows][: self.tile_max]
        self.tile_cols = np.r_[self.tile_cols, part.tile_cols][: self.tile_max]
        trajectory = np.asarray(part.kept_trajectory)
        if not len(trajectory):
            return
        new = np.r_[trajectory[0] != self._last_trajectory, trajectory[1:] != trajectory[:-1]]
        for position in np.flatnonzero(new):
            start = self._kept + int(position)
            if not self._cuts:
                self._cuts.append(int(part.kept[position]))
            elif start - self._begin >= self.block_rows:
                self._cuts.append(int(part.kept[position]))
                self._begin = start
        self._kept += len(trajectory)
        self._last_trajectory = trajectory[-1]

    @property
    def reference(self) -> int:
        return self._reference.count

    def reference_blocks(self, n_rows: int) -> list[tuple[int, int]]:
        return self._reference.spans(n_rows)

    def query_blocks(self, n_rows: int) -> list[tuple[int, int]]:
        return self._query.spans(n_rows)

    def trajectory_blocks(self, n_rows: int) -> list[tuple[int, int]]:
        return _spans(self._cuts, n_rows)


class _RankCuts:
    """Row spans holding ``size`` selected rows each, from the selected rows fed in order."""

    def __init__(self, size: int):
        self.size, self.count, self.starts = size, 0, []

    def add(self, rows: np.ndarray) -> None:
        first = (-self.count) % self.size  # position of the next block's first row in ``rows``
        self.starts.extend(int(r) for r in rows[first::self.size])
        self.count += len(rows)

    def spans(self, n_rows: int) -> list[tuple[int, int]]:
        return _spans(self.starts, n_rows)


def _spans(starts: list[int], n_rows: int) -> list[tuple[int, int]]:
    return [(lo, hi) for lo, hi in zip(starts, [*starts[1:], n_rows])]


def rows_at(src: StoreRef, shards: tuple[int, int], where: str, ranks: np.ndarray) -> np.ndarray:
    """The rows at positions ``ranks`` among the rows of ``where`` in ``shards``."""
    rows = src.samples(shards)
    return rows.column("row").to_numpy()[matches(rows, where)][np.asarray(ranks, dtype=np.int64)]
