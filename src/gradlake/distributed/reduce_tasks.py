"""The reduce stage on Ray: tasks over row blocks, results combined in a tree.

Per checkpoint: (0) the plan: tasks scan the samples table part by part (shard ranges) and
the driver folds their selected rows, in order, into row spans of blocks (BlockPlan of
gradlake.stages.reduce_blocks), so it holds O(blocks) numbers, never a row per sample; every
later task reads its own block's sample rows with the row range pushed into the scan; (1)
reference-set moments (the metric η̃ and the row-std moments) over row blocks; (2) perturbation
group sums over blocks of whole trajectories; (3) the response pass over the same blocks (group
sums, same-trajectory T×T sums, per-trajectory lag curves and self-influence written by the
tasks); then the dense tiles (at most tile_max rows a side), the top-k lists (written by
their tasks) and the influence-vs-distance pairs (their rows looked up where stored).
Each pass runs its units on the one executor (gradlake.distributed.executor: Ray tasks by
default), a window at a time, and sums their results in order over a binary tree fixed by
the block order, so driver and object-store memory do not grow with the number of samples
and the results are bit-identical whatever the backend, the number of workers, the timing or
the parts of the plan.
The exact minibatch mode runs one Ray task per minibatch (distributed/exact_tasks.py).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np
import ray

from gradlake import streaming
from gradlake.config import RayConfig, ReduceConfig
from gradlake.distributed.cluster import ensure_ray
from gradlake.distributed.executor import Executor, RayTasks
from gradlake.errors import GradlakeError, InputError
from gradlake.stages.query import shard_parts
from gradlake.stages import reduce_aggregates as aggregates
from gradlake.stages import reduce_pairwise as pairwise
from gradlake.stages import reduce_plan as stage
from gradlake.stages.reduce_blocks import BlockPlan, part_index, rows_at
from gradlake.stages.reduce_source import StoreRef
from gradlake.reduce.aggregates import RELATIONS, AggregateReducer
from gradlake.reduce.layers import Layers
from gradlake.distributed.exact_tasks import run_exact
from gradlake.stages.exact_plan import EXACT_JSON
from gradlake.reduce.metric import Metric, metric_warnings, numerical_rank
from gradlake.reduce.output import SUMMARY, ReduceOutput
from gradlake.reduce.pairwise import pair_ranks

def _apply(context: tuple, unit: dict[str, Any]):
    """A unit of a pass: the stage function ``fn(**shared, **unit)``; the pass's shared arguments
    (the context) reach each worker once."""
    fn, shared = context
    return fn(**shared, **unit)


class _Passes:
    """The passes of one reduce on the executor: each unit a call of a gradlake.stages.reduce_*
    function with the pass's shared arguments and its own."""

    def __init__(self, executor: Executor):
        self.executor = executor

    def run(self, fn, shared: dict, units: list[dict], desc: str, unit: str):
        """(index, result) of every unit, in unit order, a window at a time."""
        return self.executor.run(_apply, (fn, shared), units, desc, unit)

    def map(self, fn, shared: dict, units: list[dict], desc: str, unit: str) -> list:
        return self.executor.map(_apply, (fn, shared), units, desc, unit)

    def fold(self, fn, shared: dict, units: list[dict], desc: str):
        """The sum of the units' results over a tree fixed by the unit order: bit-identical for any
        window, backend or number of workers (:meth:`Executor.fold`)."""
        return self.executor.fold(_apply, (fn, shared), units, desc, "blocks")

    def one(self, fn, shared: dict, desc: str = ""):
        """One call off the driver."""
        return self.executor.map(_apply, (fn, shared), [{}], desc, "tasks")[0]


# --------------------------------------------------------------------------- one checkpoint
def _reduce_checkpoint(store, name: str, settings: ReduceConfig, out: ReduceOutput, so, passes: _Passes,
                       data_url: str) -> dict:
    started = time.monotonic()
    src = StoreRef(store.url, so, name)
    plan = BlockPlan(settings.block_rows, settings.tile_size, settings.tile_max)
    for _, part in passes.run(part_index, {"src": src, "settings": settings},
                              [{"shards": shards} for shards in shard_parts(store)], f"reduce {name}: plan", "parts"):
        plan.add(part)
    classes = tuple(sorted(plan.classes))
    n_times = plan.n_times
    lambdas = tuple(dict.fromkeys((settings.damping, *settings.lambdas)))
    perturbation_obs = tuple(sorted({p[1] for p in settings.pairs}))
    n_rows = store.n_rows
    reference_blocks = plan.reference_blocks(n_rows)

    mom = passes.fold(aggregates.moments_work, {"src": src, "reference_split": settings.reference_split,
                                                "observables": tuple(sorted({settings.metric, *perturbation_obs}))},
                      [{"span": span} for span in reference_blocks], f"reduce {name}: metric")
    source = f"checkpoint {name}: metric {settings.metric}"
    probe_metric = Metric.from_moments(mom[settings.metric], source)
    metric = probe_metric if settings.metric_estimator == "probes" else \
        Metric.from_moments(mom[settings.metric], source, settings.metric_estimator)
    layers = Layers.from_spec(store.spec.projector, store.spec.model, store.k) if settings.by_layer else None
    reducer = AggregateReducer({lam: metric.whitener(lam) for lam in lambdas},
                               {o: mom[o] for o in perturbation_obs}, settings.pairs, settings.normalize,
                               len(classes), layers)
    blocks = plan.trajectory_blocks(n_rows)
    shared = {"src": src, "settings": settings, "n_times": n_times, "reducer": reducer}
    pert = passes.fold(aggregates.perturbation_work, {**shared, "classes": classes},
                       [{"span": span} for span in blocks], f"reduce {name}: perturbation sums")
    resp = passes.fold(aggregates.response_work,
                       {**shared, "class_names": classes, "perturbation": pert, "out": out},
                       [{"span": span, "part": f"part-{i:06d}"} for i, span in enumerate(blocks)],
                       f"reduce {name}: response pass")
    arrays = aggregates.finalize_variants(reducer, resp, pert)
    labels = {"lambda": list(lambdas), "pair": list(settings.pairs), "normalization": list(settings.normalize),
              "relation": list(RELATIONS), "class": list(classes), "response_class": list(classes),
              "perturbation_class": list(classes), "t_response": list(range(n_times)),
              "t_perturbation": list(range(n_times))}
    dims = {
        "twotime": ("lambda", "pair", "normalization", "relation", "class", "t_response", "t_perturbation"),
        "twotime_pairs": ("pair", "relation", "class", "t_response", "t_perturbation"),
        "class_twotime": ("lambda", "pair", "normalization", "response_class", "perturbation_class",
                          "t_response", "t_perturbation"),
        "class_twotime_pairs": ("pair", "response_class", "perturbation_class", "t_response", "t_perturbation"),
        "transfer": ("lambda", "pair", "normalization", "response_class", "perturbation_class"),
        "transfer_pairs": ("pair", "response_class", "perturbation_class"),
    }
    for key, value in arrays.items():
        out.write_array(f"{name}/{key}", value, dims[key], coords={d: labels[d] for d in dims[key]})
    out.write_array(f"{name}/metric", metric.eta, ("proj", "proj_"), observable=settings.metric,
                    reference_split=settings.reference_split, reference_samples=mom[settings.metric].count,
                    estimator=settings.metric_estimator, shrinkage=metric.shrink,
                    description="η̃ = (1/probes) Σ_ref Σ_v φ_V φ_Vᵀ (or Σ φ_C φ_Cᵀ), float64")
    out.write_array(f"{name}/metric_eigenvalues", metric.eigenvalues, ("eigen",),
                    description="eigenvalues of η̃, descending (the k-space NTK spectrum)")
    out.write_table(f"lag_stats.parquet/checkpoint={name}/part-0.parquet",  # reads every lag curve: off the driver
                    passes.one(aggregates.lag_tables, {"out": out, "checkpoint": name, "reducer": reducer,
                                                       "class_names": classes}))

    summary = {"samples": plan.samples, "response_samples": plan.response,
               "perturbation_samples": plan.perturbation, "reference_samples": mom[settings.metric].count,
               "classes": list(classes), "n_times": n_times, "lambdas": list(lambdas),
               "metric_top_eigenvalue": float(metric.eigenvalues[0]), "metric_clipped": metric.clipped,
               "metric_vectors": mom[settings.metric].vectors,
               "metric_rank": numerical_rank(probe_metric.eigenvalues), "metric_shrinkage": metric.shrink,
               "warnings": metric_warnings(probe_metric, mom[settings.metric].count, mom[settings.metric].vectors),
               "skipped_nonfinite": {o: m.skipped for o, m in mom.items()}}
    for warning in summary["warnings"]:
        print(f"warning: reduce, checkpoint {name}: {warning['message']}. Remedy: {warning['remedy']}.",
              file=sys.stderr, flush=True)
    inverse = metric.inverse(settings.damping)
    summary["tiles"] = _tiles(name, src, settings, inverse, plan, out, passes)
    summary["topk"] = _topk_lists(name, src, settings, inverse, plan, reference_blocks, out, layers, passes)
    summary["distance"] = _distance_curve(name, src, settings, reducer, plan, out, data_url, passes)
    summary["seconds"] = round(time.monotonic() - started, 2)
    return summary


def _tiles(name, src, settings, inverse, plan: BlockPlan, out, passes: _Passes) -> dict:
    if settings.tile_max == 0:
        return {"skipped": "reduce.tile_max = 0"}
    rows_r, rows_c = plan.tile_rows, plan.tile_cols  # at most tile_max each
    if not len(rows_r) or not len(rows_c):
        return {"skipped": "a tile selection is empty"}
    size = settings.tile_size
    out.write_array(f"{name}/tiles/response_rows", rows_r, ("response",), where=settings.tile_rows)
    out.write_array(f"{name}/tiles/perturbation_rows", rows_c, ("perturbation",), where=settings.tile_cols)
    bands = []
    col_blocks = streaming.row_blocks(rows_c, size)
    for pair in settings.pairs:
        path = f"{name}/tiles/{pair}"
        chunks = (min(size, len(rows_r)), min(size, len(rows_c)))  # small selections: small chunks
        out.create_array(path, (len(rows_r), len(rows_c)), chunks, "float32", ("response", "perturbation"),
                         pair=pair, damping=settings.damping, normalization="none",
                         description="H_AB(i, j) for the response_rows x perturbation_rows samples")
        band = size * max(1, settings.block_rows // size)  # whole chunks per task: no shared writes
        for r in range(0, len(rows_r), band):
            bands.append({"pair": pair, "rows_a": rows_r[r:r + band], "array_path": path, "row0": r})
    entries = sum(passes.map(pairwise.tile_work,
                             {"src": src, "inverse": inverse, "col_blocks": col_blocks, "out": out}, bands,
                             f"reduce {name}: tiles", "row bands"))
    return {"response_rows": len(rows_r), "perturbation_rows": len(rows_c), "entries": int(entries)}


def _topk_lists(name, src, settings, inverse, plan: BlockPlan, reference_blocks, out, layers,
                passes: _Passes) -> dict:
    if settings.topk == 0:
        return {"skipped": "reduce.topk = 0"}
    if not plan.queries:
        return {"skipped": "reduce.topk_queries selects no sample"}
    shared = {"src": src, "pairs": settings.pairs, "inverse": inverse, "query_where": settings.topk_queries,
              "candidate_spans": reference_blocks, "reference_split": settings.reference_split, "k": settings.topk,
              "out": out, "layers": layers}
    passes.map(pairwise.topk_work, shared,
               [{"query_span": span, "path": f"topk.parquet/checkpoint={name}/part-{i:06d}.parquet"}
                for i, span in enumerate(plan.query_blocks(src.store.n_rows))],
               f"reduce {name}: top-k", "query blocks")
    return {"queries": plan.queries, "candidates": plan.reference, "k": settings.topk}


def _distance_curve(name, src, settings, reducer, plan: BlockPlan, out, dataset_url: str,
                    passes: _Passes) -> dict:
    if settings.distance_pairs == 0:
        return {"skipped": "reduce.distance_pairs = 0"}
    ranks = pair_ranks(plan.response, plan.perturbation, settings.distance_pairs, settings.seed)
    rows_i, rows_j = (_rows_of_ranks(src, plan, key, getattr(settings, key), r, passes) for key, r in
                      (("response", ranks[0]), ("perturbation", ranks[1])))
    keep = rows_i != rows_j
    rows_i, rows_j = rows_i[keep], rows_j[keep]
    try:
        pairs, curve = passes.one(pairwise.distance_work, {
            "src": src, "reducer": reducer, "damping": settings.damping, "rows_i": rows_i, "rows_j": rows_j,
            "dataset_url": dataset_url, "storage_options": src.storage_options, "n_bins": settings.distance_bins})
    except InputError as err:  # the dataset moved, changed or is unreachable: say so, go on
        return {"skipped": f"dataset {dataset_url!r} unavailable: {err}"}
    out.write_table(f"distance_pairs.parquet/checkpoint={name}/part-0.parquet", pairs)
    out.write_table(f"distance_curve.parquet/checkpoint={name}/part-0.parquet", curve)
    return {"pairs": len(rows_i), "dataset": dataset_url}


def _rows_of_ranks(src, plan: BlockPlan, key: str, where: str, ranks: np.ndarray, passes: _Passes) -> np.ndarray:
    """The rows at positions ``ranks`` of selection ``key`` (response or perturbation, of
    filter ``where``), looked up in the parts that hold them."""
    rows = np.zeros(len(ranks), np.int64)
    jobs, first = [], 0
    for part in plan.parts:
        count = part[key]
        inside = np.flatnonzero((ranks >= first) & (ranks < first + count))
        if len(inside):
            jobs.append((part["shards"], inside, ranks[inside] - first))
        first += count
    for (_, inside, _), (_, found) in zip(jobs, passes.run(rows_at, {"src": src, "where": where},
                                                           [{"shards": shards, "ranks": at} for shards, _, at in jobs],
                                                           "reduce: distance pairs", "parts")):
        rows[inside] = found
    return rows


# --------------------------------------------------------------------------- the stage
def tasks_in_flight() -> int:
    """Block tasks submitted at once: twice the cluster's CPUs. Scheduling only: the results
    do not depend on it (see Executor.fold)."""
    return max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))


def run_reduce(store_url: str, settings: ReduceConfig, ray_config: RayConfig,
               storage_options: dict[str, Any] | None = None, overwrite: bool = False,
               data_url: str = "", executor: Executor | None = None) -> dict[str, Any]:
    """The reduce stage (see reduce/__init__.py for what it writes). Restartable: checkpoints
    finished with the same settings are kept; summary.json is written last. The settings
    are checked first, then the driver takes the lease on the output folder (a second reduce
    of the same name is refused with InputError, nothing written). Results of the same name
    made with other settings are replaced whole with ``overwrite``, else refused (InputError).
    ``data_url``: where the store's dataset is now (checked by its fingerprint first); default
    the URL store.json records. ``executor``: where the units run (default: Ray tasks on the Ray
    of ``ray_config``); the results are the same bits on any."""
    from gradlake.store import Lease

    spec = stage.ReduceSpec(store_url, settings, dict(storage_options or {}), data_url, overwrite)
    store, names, data_url, out = stage.open_checked(spec)
    with Lease(out, f"reduce {settings.name!r}") as lease:
        return _run(spec, store, names, ray_config, out, lease, data_url, executor)


def _run(spec: stage.ReduceSpec, store, names: list[str], ray_config: RayConfig, out: ReduceOutput, lease,
         data_url: str, executor: Executor | None) -> dict[str, Any]:
    started = time.monotonic()
    settings, so = spec.settings, spec.storage_options
    done = stage.plan(spec, store, out)
    if executor is None:
        ensure_ray(ray_config.address, ray_config.num_cpus)
        executor = Executor(RayTasks(), window=tasks_in_flight())
    passes = _Passes(executor)
    checkpoints = {}
    for name in names:
        if name in done:
            checkpoints[name] = done[name]
            continue
        if lease.lost:
            raise GradlakeError(f"reduce: {lease.lost}; stopping (finished checkpoints are kept)")
        stage.start_unit(out, name)
        checkpoints[name] = _reduce_checkpoint(store, name, settings, out, so, passes, data_url)
        stage.finish_unit(spec, store, out, name, checkpoints[name])
    out.write_table("lag_checkpoints.parquet", stage.checkpoint_lag_table(out))
    exact = _exact(store, settings, out, so, data_url) if settings.exact.enabled else None
    summary = stage.finish(spec, store, out, checkpoints, exact, time.monotonic() - started)
    if lease.lost:
        raise GradlakeError(f"reduce: {lease.lost}; summary.json not written")
    out.write_json(SUMMARY, summary)
    return summary


def _exact(store, settings: ReduceConfig, out: ReduceOutput, so, data_url: str) -> dict:
    name = store.checkpoint(settings.exact.checkpoint or None)
    path = store.provenance["checkpoints"][name].get("path")
    if not path:
        raise InputError(f"reduce.exact.checkpoint: store {store.url} does not record where checkpoint "
                         f"{name!r} lives; run `gradlake exact --checkpoint PATH` instead")
    if out.exists(EXACT_JSON):
        return out.read_json(EXACT_JSON)
    return run_exact(path, data_url, out.url, settings.exact, settings.damping, settings.lambdas, settings.pairs,
                     settings.normalize, so or None, identity={"store_checkpoint": name})
