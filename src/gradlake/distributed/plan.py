"""The shard plan of the grads stage (no Ray here).

Gradlake shard s is the row range [s * shard_rows, (s + 1) * shard_rows) of the dataset's
sample index, which is exactly one zarr shard of every array in the store: one writer per
zarr shard, ever. A shard is planned when it holds at least one sample of the store's splits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ShardTask:
    """One unit of work: the held rows of one shard, for one checkpoint."""

    checkpoint: str  # name in the store
    checkpoint_path: str
    shard: int
    rows: np.ndarray  # sorted dataset rows inside the shard's range

    def __repr__(self) -> str:
        return f"ShardTask({self.checkpoint}, shard {self.shard}, {len(self.rows)} rows)"


def plan_shards(held_rows: np.ndarray, shard_rows: int) -> dict[int, np.ndarray]:
    """Shard number -> its sorted held rows, for every shard with at least one."""
    rows = np.unique(np.asarray(held_rows, dtype=np.int64))
    shard = rows // shard_rows
    cuts = np.flatnonzero(np.diff(shard)) + 1
    return {int(part[0] // shard_rows): part for part in np.split(rows, cuts) if len(part)}
