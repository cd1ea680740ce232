"""Queries on Ray: the parts of a top-k or metric pass (gradlake.stages.query) as Ray tasks.

Each task opens the store by URL (the pass's StoreRef) and streams its part of the candidates;
only the parts' small results (top-k lists, moments) come back, merged in part order by
gradlake.query.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import ray

from gradlake import query
from gradlake.distributed.cluster import ensure_ray
from gradlake.distributed.executor import Executor, RayTasks
from gradlake.stages.query import shard_parts


def ray_mapper(desc: str = "query") -> query.Mapper:
    """A :data:`gradlake.query.Mapper` running each part as a Ray task of the executor
    (gradlake.distributed.executor); the pass's spec, with its query matrix, goes to the
    object store once."""
    executor = Executor(RayTasks())

    def run(fn, spec, units: list) -> list:
        return executor.map(fn, spec, units, f"{desc}: {getattr(fn, '__name__', 'part')}", "parts")

    return run


def topk(url: str, query_where: str, train_where: str = "split == 'train'", k: int = 10, pair: str = "CC",
         checkpoint: str | None = None, metric: str = "V", damping: float = 1e-4, block_rows: int | None = None,
         storage_options: dict[str, Any] | None = None, parts: int = 0, address: str = "",
         num_cpus: int = 0, allow_partial: bool = False, **options: Any) -> pa.Table:
    """:func:`gradlake.query.topk` with its passes cut into ``parts`` Ray tasks (0: two per CPU
    of the cluster or parts of about PART_ROWS rows, whichever are more; at most one per shard)
    on the Ray at ``address`` (:func:`ensure_ray`; ``num_cpus`` for an embedded one);
    ``options``: its group_by, aggregate, by_layer."""
    ensure_ray(address, num_cpus)
    store = query.open_store(url, storage_options, allow_partial)
    parts = parts or max(2 * int(ray.cluster_resources().get("CPU", 1)), len(shard_parts(store)))
    return query.topk(store, query_where, train_where, k, pair, checkpoint, metric, damping, block_rows,
                      mapper=ray_mapper("topk"), parts=parts, **options)
