"""The reduce stage on Ray: tasks over row blocks, results combined in a tree.

Per checkpoint: (0) the plan: tasks scan the samples table part by part (shard ranges) and
the driver folds their selected rows, in order, into row spans of blocks (work.BlockPlan),
so it holds O(blocks) numbers, never a row per sample; every later task reads its own
block's sample rows with the row range pushed into the scan; (1) reference-set moments
(the metric η̃ and the row-std moments) over row blocks; (2) perturbation group sums over
blocks of whole trajectories; (3) the response pass over the same blocks (group sums,
same-trajectory T×T sums, per-trajectory lag curves and self-influence written by the
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

import dataclasses
import sys
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from gradlake import __version__, fsio, streaming
from gradlake.config import RayConfig, ReduceConfig, settings_hash
from gradlake.distributed.cluster import ensure_ray
from gradlake.distributed.executor import Executor, RayTasks
from gradlake.errors import GradlakeError, InputError
from gradlake.query import shard_parts
from gradlake.stages import reduce as work
from gradlake.stages.records import Records, other_settings
from gradlake.reduce.aggregates import RELATIONS, AggregateReducer
from gradlake.reduce.layers import Layers
from gradlake.distributed.exact_tasks import run_exact
from gradlake.stages.exact import EXACT_JSON
from gradlake.reduce.metric import Metric, metric_warnings, numerical_rank
from gradlake.reduce.output import SUMMARY, ReduceOutput
from gradlake.store.layout import LEASE
from gradlake.reduce.pairwise import pair_ranks

PER_CHECKPOINT = ("lags.parquet", "self_influence.parquet", "lag_stats.parquet", "topk.parquet",
                  "distance_pairs.parquet", "distance_curve.parquet")


def _apply(context: tuple, unit: dict[str, Any]):
    """A unit of a pass: the stage function ``fn(**shared, **unit)``; the pass's shared arguments
    (the context) reach each worker once."""
    fn, shared = context
    return fn(**shared, **unit)


class _Passes:
    """The passes of one reduce on the executor: each unit a call of a gradlake.stages.reduce
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


# --------------------------------------------------------------------------- checks
def _settings_hash(store, settings: ReduceConfig) -> str:
    return settings_hash(settings, store.spec.to_json(),
                         {c: store.provenance["checkpoints"][c]["sha256"] for c in store.checkpoints})


def check_settings(store, settings: ReduceConfig) -> list[str]:
    """Everything about the settings that can be checked before work; the checkpoints."""
    if not fsio.is_path_name(settings.name):
        raise InputError(f"reduce.name: expected letters, digits, '.', '_' or '-', got {settings.name!r}")
    held = store.observables
    if settings.metric not in held:
        raise InputError(f"reduce.metric: observable {settings.metric!r} is not in store {store.url} "
                         f"(it holds {', '.join(held)})")
    for pair in settings.pairs:
        if len(pair) != 2 or not set(pair) <= set(held) or "V" in pair:
            raise InputError(f"reduce.pairs: {pair!r} needs two observables of {', '.join(o for o in held if o != 'V')} "
                             f"held by store {store.url}")
    for lam in (settings.damping, *settings.lambdas):
        if not lam > 0:
            raise InputError(f"reduce.lambdas: expected values > 0, got {lam!r}")
    if settings.by_layer:
        try:
            Layers.from_spec(store.spec.projector, store.spec.model, store.k)
        except InputError as err:
            raise InputError(f"reduce.by_layer: {err}") from None
    names = [store.checkpoint(c) for c in settings.checkpoints] or store.checkpoints
    if not names:
        raise InputError(f"{store.url}: the store holds no checkpoint; run `gradlake grads` first")
    for name in names:
        work.check_complete(store, name)
    first, *rest = shard_parts(store)
    table = store.samples(names[0], shards=first)  # every filter is checked on the first part
    reference = f"split == '{settings.reference_split}'"
    for key in ("response", "perturbation", "topk_queries", "tile_rows", "tile_cols", "reference_split"):
        where = reference if key == "reference_split" else getattr(settings, key)
        try:
            found = work.matches(table, where).any()
        except InputError as err:
            raise InputError(f"reduce.{key}: {err}") from None
        if key in ("response", "perturbation", "reference_split") and not found \
                and not any(store.samples(names[0], where, shards=p, columns=["row"]).num_rows for p in rest):
            if key == "reference_split":
                raise InputError(f"reduce.reference_split: no sample of split {settings.reference_split!r} in "
                                 f"store {store.url} (it holds splits {', '.join(store.spec.splits)})")
            raise InputError(f"reduce.{key}: {where!r} selects no sample of store {store.url}")
    return names


# --------------------------------------------------------------------------- one checkpoint
def _reduce_checkpoint(store, name: str, settings: ReduceConfig, out: ReduceOutput, so, passes: _Passes,
                       data_url: str) -> dict:
    started = time.monotonic()
    src = work.StoreRef(store.url, so, name)
    plan = work.BlockPlan(settings.block_rows, settings.tile_size, settings.tile_max)
    for _, part in passes.run(work.part_index, {"src": src, "settings": settings},
                              [{"shards": shards} for shards in shard_parts(store)], f"reduce {name}: plan", "parts"):
        plan.add(part)
    classes = tuple(sorted(plan.classes))
    n_times = plan.n_times
    lambdas = tuple(dict.fromkeys((settings.damping, *settings.lambdas)))
    perturbation_obs = tuple(sorted({p[1] for p in settings.pairs}))
    n_rows = store.n_rows
    reference_blocks = plan.reference_blocks(n_rows)

    mom = passes.fold(work.moments_work, {"src": src, "reference_split": settings.reference_split,
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
    pert = passes.fold(work.perturbation_work, {**shared, "classes": classes},
                       [{"span": span} for span in blocks], f"reduce {name}: perturbation sums")
    resp = passes.fold(work.response_work, {**shared, "class_names": classes, "perturbation": pert, "out": out},
                       [{"span": span, "part": f"part-{i:06d}"} for i, span in enumerate(blocks)],
                       f"reduce {name}: response pass")
    arrays = work.finalize_variants(reducer, resp, pert)
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
                    passes.one(work.lag_tables, {"out": out, "checkpoint": name, "reducer": reducer,
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


def _tiles(name, src, settings, inverse, plan: work.BlockPlan, out, passes: _Passes) -> dict:
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
    entries = sum(passes.map(work.tile_work, {"src": src, "inverse": inverse, "col_blocks": col_blocks, "out": out},
                             bands, f"reduce {name}: tiles", "row bands"))
    return {"response_rows": len(rows_r), "perturbation_rows": len(rows_c), "entries": int(entries)}


def _topk_lists(name, src, settings, inverse, plan: work.BlockPlan, reference_blocks, out, layers,
                passes: _Passes) -> dict:
    if settings.topk == 0:
        return {"skipped": "reduce.topk = 0"}
    if not plan.queries:
        return {"skipped": "reduce.topk_queries selects no sample"}
    shared = {"src": src, "pairs": settings.pairs, "inverse": inverse, "query_where": settings.topk_queries,
              "candidate_spans": reference_blocks, "reference_split": settings.reference_split, "k": settings.topk,
              "out": out, "layers": layers}
    passes.map(work.topk_work, shared, [{"query_span": span, "path": f"topk.parquet/checkpoint={name}/part-{i:06d}.parquet"}
                                        for i, span in enumerate(plan.query_blocks(src.store.n_rows))],
               f"reduce {name}: top-k", "query blocks")
    return {"queries": plan.queries, "candidates": plan.reference, "k": settings.topk}


def _distance_curve(name, src, settings, reducer, plan: work.BlockPlan, out, dataset_url: str,
                    passes: _Passes) -> dict:
    if settings.distance_pairs == 0:
        return {"skipped": "reduce.distance_pairs = 0"}
    ranks = pair_ranks(plan.response, plan.perturbation, settings.distance_pairs, settings.seed)
    rows_i, rows_j = (_rows_of_ranks(src, plan, key, getattr(settings, key), r, passes) for key, r in
                      (("response", ranks[0]), ("perturbation", ranks[1])))
    keep = rows_i != rows_j
    rows_i, rows_j = rows_i[keep], rows_j[keep]
    try:
        pairs, curve = passes.one(work.distance_work, {
            "src": src, "reducer": reducer, "damping": settings.damping, "rows_i": rows_i, "rows_j": rows_j,
            "dataset_url": dataset_url, "storage_options": src.storage_options, "n_bins": settings.distance_bins})
    except InputError as err:  # the dataset moved, changed or is unreachable: say so, go on
        return {"skipped": f"dataset {dataset_url!r} unavailable: {err}"}
    out.write_table(f"distance_pairs.parquet/checkpoint={name}/part-0.parquet", pairs)
    out.write_table(f"distance_curve.parquet/checkpoint={name}/part-0.parquet", curve)
    return {"pairs": len(rows_i), "dataset": dataset_url}


def _rows_of_ranks(src, plan: work.BlockPlan, key: str, where: str, ranks: np.ndarray, passes: _Passes) -> np.ndarray:
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
    for (_, inside, _), (_, found) in zip(jobs, passes.run(work.rows_at, {"src": src, "where": where},
                                                           [{"shards": shards, "ranks": at} for shards, _, at in jobs],
                                                           "reduce: distance pairs", "parts")):
        rows[inside] = found
    return rows


# --------------------------------------------------------------------------- across checkpoints
def _checkpoint_lag_table(out: ReduceOutput) -> pa.Table:
    """Median and quartiles over checkpoints of each checkpoint's pooled lag curve: over all
    checkpoints (group "*") and, for seed-prefixed names "seed-<s>-<rest>", over the seeds of
    each <rest> (e.g. one epoch across seeds)."""
    t = out.read_tables("lag_stats.parquet", filters=pc.field("class") == "all")
    keys = ["lambda", "pair", "normalization", "relation", "lag"]
    t = t.sort_by([(k, "ascending") for k in [*keys, "checkpoint"]])
    names = np.asarray(t.column("checkpoint").to_pylist())
    groups = np.array([n.split("-", 2)[2] if n.startswith("seed-") and n.count("-") >= 2 else "*" for n in names])
    values = t.column("pooled_mean").to_numpy(zero_copy_only=False)
    key_cols = {k: t.column(k).to_numpy(zero_copy_only=False) if k in ("lambda", "lag") else
                np.asarray(t.column(k).to_pylist()) for k in keys}
    key_id = np.unique(np.stack([np.unique(v, return_inverse=True)[1] for v in key_cols.values()], 1),
                       axis=0, return_inverse=True)[1].ravel()
    rows = []
    for group in ["*", *sorted(set(groups) - {"*"})]:
        sel_group = np.ones(len(names), bool) if group == "*" else groups == group
        for kid in np.unique(key_id):
            sel = sel_group & (key_id == kid)
            if not sel.any():
                continue
            vals = values[sel]
            finite = vals[np.isfinite(vals)]
            q25, med, q75 = np.percentile(finite, [25, 50, 75]) if len(finite) else (np.nan,) * 3
            first = np.flatnonzero(sel)[0]
            rows.append({"group": group, **{k: key_cols[k][first].item() if hasattr(key_cols[k][first], "item")
                                            else key_cols[k][first] for k in keys},
                         "median": med, "q25": q25, "q75": q75, "checkpoints": int(sel.sum())})
    return pa.Table.from_pylist(rows)


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
    from gradlake.store import GradientStore, Lease

    so = dict(storage_options or {})
    store = GradientStore.open(store_url, so or None)
    names = check_settings(store, settings)
    if data_url:
        from gradlake.data import open_checked

        open_checked(data_url, store.spec.dataset["fingerprint"], so or None)
    data_url = data_url or store.spec.dataset.get("url", "")
    out = ReduceOutput(store.reduce_url(settings.name), so, provenance={
        "store": store.url, "reduce": settings.name, "dataset": store.spec.dataset,
        "checkpoints": {name: store.provenance["checkpoints"][name].get("sha256", "") for name in names}})
    with Lease(out, f"reduce {settings.name!r}") as lease:
        return _run(store, names, settings, ray_config, out, so, lease, overwrite, data_url, executor)


def _run(store, names: list[str], settings: ReduceConfig, ray_config: RayConfig, out: ReduceOutput, so,
         lease, overwrite: bool, data_url: str, executor: Executor | None) -> dict[str, Any]:
    started = time.monotonic()
    settings_hash = _settings_hash(store, settings)
    records = Records(out, "done")  # one per checkpoint
    done = {record["checkpoint"]: record for record in records.load().values()}
    replace = other_settings(done, settings_hash)
    if replace and not overwrite:
        raise InputError(f"reduce.name: {out.url} holds the results of a reduce {settings.name!r} with other "
                         "settings; pass --overwrite to replace them, or choose another --name")
    out.remove(SUMMARY)
    if replace:
        for entry in out.ls(""):  # another reduce's results under this name: replace them whole
            if entry != LEASE:
                out.remove(entry)
        done = {}
    if executor is None:
        ensure_ray(ray_config.address, ray_config.num_cpus)
        executor = Executor(RayTasks(), window=tasks_in_flight())
    passes = _Passes(executor)
    checkpoints = {}
    for name in names:
        if name in done:
            checkpoints[name] = done[name]["summary"]
            continue
        if lease.lost:
            raise GradlakeError(f"reduce: {lease.lost}; stopping (finished checkpoints are kept)")
        records.remove(name)
        for folder in PER_CHECKPOINT:
            out.remove(f"{folder}/checkpoint={name}")
        out.remove(f"results.zarr/{name}")
        checkpoints[name] = _reduce_checkpoint(store, name, settings, out, so, passes, data_url)
        records.write(name, {"checkpoint": name, "settings": settings_hash, "summary": checkpoints[name]})
    out.write_table("lag_checkpoints.parquet", _checkpoint_lag_table(out))

    exact = None
    if settings.exact.enabled:
        exact = _exact(store, settings, out, so, data_url)
    out.consolidate()  # after every array of results.zarr (the exact mode's too)
    summary = {
        "complete": True, "name": settings.name, "store": store.url, "settings_hash": settings_hash,
        "gradlake_version": __version__, "settings": dataclasses.asdict(settings),
        "checkpoints": checkpoints, "exact": exact,
        "warnings": [{"checkpoint": name, **w} for name, info in checkpoints.items() for w in info.get("warnings", [])],
        "seconds": round(time.monotonic() - started, 2), "url": out.url,
    }
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
