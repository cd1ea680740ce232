"""Queries on Ray: the parts of a top-k or metric pass (gradlake.query) as Ray tasks.

Each task opens the store by URL and streams its part of the candidates; only the parts'
small results (top-k lists, moments) come back, merged in part order by gradlake.query.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import ray

from gradlake import query
from gradlake.distributed.cluster import ensure_ray
from gradlake.distributed.executor import Executor, RayTasks


def _run_part(source: tuple, call: tuple):
    """One part on a Ray worker: open the store, resolve the shared plans, run ``fn(store, *args)``."""
    from gradlake.store import GradientStore

    url, storage_options, allow_partial = source
    fn, args = call
    args = [ray.get(a) if isinstance(a, ray.ObjectRef) else a for a in args]
    return fn(GradientStore.open(url, storage_options or None, allow_partial), *args)


def ray_mapper(url: str, storage_options: dict[str, Any] | None = None, desc: str = "query",
               allow_partial: bool = False) -> query.Mapper:
    """A :data:`gradlake.query.Mapper` running each part as a Ray task of the executor
    (gradlake.distributed.executor) on the store at ``url`` (opened with ``allow_partial``)."""
    source = (url, dict(storage_options or {}), allow_partial)
    executor = Executor(RayTasks())

    def run(fn, args: list[tuple]) -> list:
        shared: dict[int, Any] = {}

        def put_once(value):  # a plan (with its query matrix) goes to the object store once
            if not isinstance(value, query.TopKPlan):
                return value
            if id(value) not in shared:
                shared[id(value)] = ray.put(value)
            return shared[id(value)]

        calls = [(fn, tuple(map(put_once, part))) for part in args]
        return executor.map(_run_part, source, calls, f"{desc}: {getattr(fn, '__name__', 'part')}", "parts")

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
    parts = parts or max(2 * int(ray.cluster_resources().get("CPU", 1)), len(query.shard_parts(store)))
    return query.topk(store, query_where, train_where, k, pair, checkpoint, metric, damping, block_rows,
                      mapper=ray_mapper(url, storage_options, "topk", allow_partial), parts=parts, **options)
