"""Where the reduce's units (and the query's parts, gradlake.stages.query) read: a reference
to one checkpoint of the gradient store (opened in each task), the filter language on its
sample rows, the reference rows, the store's check.

The units themselves: gradlake.stages.reduce_blocks (the plan's scans),
gradlake.stages.reduce_aggregates (the metric and aggregate passes) and
gradlake.stages.reduce_pairwise (tiles, top-k, influence vs distance). Nothing here imports Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from gradlake.errors import GradlakeError


@dataclass
class StoreRef:
    """Where a task reads from: store URL, options, checkpoint (``allow_partial``: of committed
    shards only). The store is opened on first use in each task (never shared across tasks, so
    never stale); :meth:`of` a store open here shares it with the units run in this process."""

    url: str
    storage_options: dict[str, Any]
    checkpoint: str
    allow_partial: bool = False
    _store: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, store, checkpoint: str) -> StoreRef:
        return cls(store.url, store.storage_options, checkpoint, store.allow_partial, store)

    def __getstate__(self):
        return {**self.__dict__, "_store": None}

    @property
    def store(self):
        if self._store is None:
            from gradlake.store import GradientStore

            self._store = GradientStore.open(self.url, self.storage_options or None, self.allow_partial)
        return self._store

    def read(self, observable: str, rows: np.ndarray) -> np.ndarray:
        return self.store.read(self.checkpoint, observable, rows)

    def samples(self, shards: tuple[int, int], where: str = "", columns=None) -> pa.Table:
        """Committed samples of shards [first, stop) matching ``where`` (filter language,
        pushed into the scan of only those shards' files)."""
        return self.store.samples(self.checkpoint, where or None, shards=shards, columns=columns)

    def span_samples(self, span: tuple[int, int], where: str = "", columns=None) -> pa.Table:
        """Committed samples of rows [lo, hi) matching ``where``."""
        lo, hi = span
        shard_rows = self.store.spec.shard_rows
        rows = f"row >= {lo} and row < {hi}"
        return self.samples((lo // shard_rows, (hi - 1) // shard_rows + 1),
                            f"({where}) and {rows}" if where.strip() else rows, columns)

def matches(table: pa.Table, where: str) -> np.ndarray:
    """Boolean mask of the rows of a samples ``table`` selected by ``where`` ("" = all)."""
    if not where.strip():
        return np.ones(table.num_rows, dtype=bool)
    from gradlake.store.filters import parse_where

    rows = table.column("row").to_numpy()
    return np.isin(rows, table.filter(parse_where(where, table.schema)).column("row").to_numpy())


def reference_rows(src: StoreRef, span: tuple[int, int], reference_split: str) -> pa.Table:
    """Row, trajectory, t and class of the reference samples in rows [lo, hi)."""
    return src.span_samples(span, f"split == '{reference_split}'", ["row", "trajectory", "t", "class"])


def check_complete(store, checkpoint: str) -> None:
    store.check_complete(checkpoint)
    for observable, shards in store.missing_data(checkpoint).items():
        start, stop = store.spec.shard_range(shards[0])
        raise GradlakeError(f"store {store.url}, checkpoint {checkpoint}, array grads.zarr/{checkpoint}/"
                            f"{observable}: the data of committed shard {shards[0]} (rows {start}..{stop - 1}) "
                            f"is missing from storage ({len(shards)} shard(s)); the store is damaged")
