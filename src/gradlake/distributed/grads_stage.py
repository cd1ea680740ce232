"""The grads stage: plan shards, create the store, drive a pool of Ray actors over them.

The driver checks every input and the store's compatibility before any work, skips
committed shards, hands one shard at a time to each actor of the executor
(gradlake.distributed.executor: each actor holds a ShardWorker with its models), which
retries failed shards with backoff on any actor; a shard that keeps failing is reported
once the others are done (GradlakeError). It holds
the store's lease from before it writes anything until the end, and compacts the committed
shards' sample rows into samples.parquet: each compaction group as soon as its shards are
all committed, the rest when the shards are done (also after failures).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradlake.config import GradsConfig, RayConfig, TaskConfig
from gradlake.data.index import SPLIT_NAMES
from gradlake.distributed.plan import ShardTask, plan_shards
from gradlake.distributed.shard_work import FAULT_ENV, Fault, WorkerSettings, open_worker, run_shard
from gradlake.errors import GradlakeError, InputError
from gradlake.progress import progress
from gradlake.store import GradientStore, Lease, StoreSpec, compact, create_store
from gradlake.store.layout import StoreFiles, check_name, checkpoint_name, group_shards
from gradlake.store.store import read_metadata
from gradlake.store.spec import chunk_rows_for, shard_rows_for
from gradlake.reduce.metric import full_rank_probes
from gradlake.store.verify import check_missing, check_parquet, repair
from gradlake.store.writer import set_stage_status

STAGE = "grads"
BACKOFF_S = 0.5  # the first retry's delay; it doubles per attempt


def run_grads(data_url: str, checkpoints: Mapping[str, str] | list[str], store_url: str, settings: GradsConfig,
              ray: RayConfig | None = None, storage_options: dict[str, Any] | None = None,
              task: TaskConfig | None = None, python_path: tuple[str, ...] = ()) -> dict[str, Any]:
    """Projected gradients of every held sample for each checkpoint, into the store at ``store_url``.

    ``checkpoints`` maps store names to checkpoint paths, or is a list of paths named by
    their directory names. ``task`` names the loss and observables (default: the task the
    checkpoints were trained with, else the paper's);
    ``python_path`` lists folders the workers import user models and tasks from. Resumes:
    committed shards are never recomputed. Returns a
    JSON-able summary; raises InputError for bad input (before any work) and
    GradlakeError when shards keep failing.
    """
    ray_settings = ray or RayConfig()
    options = dict(storage_options or {})
    fault = os.environ.get(FAULT_ENV, "")
    Fault.parse(fault)
    inputs = check_inputs(data_url, checkpoints, settings, options, task)  # before the lease: no write
    with Lease(StoreFiles(store_url, options or None), f"grads stage {STAGE!r}") as lease:
        return _run(data_url, checkpoints, store_url, settings, ray_settings, options, fault, lease, inputs,
                    python_path)


def _run(data_url, checkpoints, store_url, settings: GradsConfig, ray_settings: RayConfig,
         options: dict[str, Any], fault: str, lease: Lease, inputs: Inputs,
         python_path: tuple[str, ...]) -> dict[str, Any]:
    plan = prepare(data_url, checkpoints, store_url, settings, options, inputs=inputs)
    store, skipped = plan.store, plan.skipped
    total = store.spec.n_shards * len(plan.names)
    set_stage_status(store, STAGE, {"status": "running", "checkpoints": plan.names,
                                    "shards_total": total})
    started = time.monotonic()
    outcome = _Outcome()
    compacted: Counter = Counter()  # checkpoint -> shards compacted by this run
    if plan.tasks:
        from gradlake.distributed.cluster import ensure_ray

        try:
            ensure_ray(ray_settings.address, ray_settings.num_cpus)
            worker = WorkerSettings(data_url, store_url, dataclasses.replace(settings, probes=store.spec.probes),
                                    options, fault, store.spec.projector, task=plan.task,
                                    python_path=tuple(python_path))
            outcome = _drive(plan.tasks, worker, settings, total, skipped, lease,
                             group_shards(store.spec.shard_rows),
                             lambda checkpoint, group: compacted.update(compact(store, {checkpoint: {group}})))
        except BaseException as err:  # Ray down, Ctrl-C, bad input: say so; committed shards stay committed
            status = "failed" if isinstance(err, InputError) else "interrupted"
            set_stage_status(store, STAGE, {"status": status, "error": _first_line(err)})
            raise
    compacted.update(compact(store))
    seconds = time.monotonic() - started
    computed = [r for r in outcome.results if not r["skipped"]]  # skipped: committed meanwhile
    summary = {
        "store": store_url, "checkpoints": plan.names, "k": store.spec.k,
        "dtype": store.spec.dtype, "observables": list(store.spec.observables),
        "samples_per_checkpoint": store.spec.n_samples, "shards_total": total,
        "shards_skipped": skipped + len(outcome.results) - len(computed),
        "shards_computed": len(computed),
        "shards_failed": len(outcome.failures), "retries": outcome.retries,
        "samples_computed": int(sum(r["samples"] for r in outcome.results)),
        "mb_written": round(sum(r["bytes"] for r in outcome.results) / 1e6, 3),
        "seconds": round(seconds, 2), "startup_s": round(outcome.startup_s, 2),
        "workers": outcome.workers,
        "samples_per_s": round(sum(r["samples"] for r in outcome.results) / max(seconds, 1e-9), 2),
        "worker_peak_rss_mb": max((r["peak_rss_mb"] for r in outcome.results), default=0.0),
        "shards_compacted": int(sum(compacted.values())),
    }
    if outcome.failures:
        errors = {f"{t.checkpoint}/shard-{t.shard}": msg for t, msg in outcome.failures}
        set_stage_status(store, STAGE, {"status": "failed", **summary, "errors": errors})
        lines = "\n".join(f"  {name}: {msg}" for name, msg in errors.items())
        raise GradlakeError(
            f"grads: {len(errors)} of {total} shards failed after {settings.retries} retries "
            f"(the others are committed; re-run to retry only these):\n{lines}"
        )
    set_stage_status(store, STAGE, {"status": "complete", **summary})
    return summary


@dataclass
class StagePlan:
    store: GradientStore
    names: list[str]  # the run's checkpoint names, in order
    tasks: list[ShardTask]  # uncommitted shards
    skipped: int  # committed shards
    task: TaskConfig  # the loss and observables


@dataclass
class Inputs:
    """The stage's inputs, checked (nothing written yet)."""

    names: list[str]
    checkpoints: list[str]
    dataset: Any
    held: np.ndarray
    model_config: dict[str, Any]
    provenance: dict[str, Any]
    task: TaskConfig


def check_inputs(data_url: str, checkpoints: Mapping[str, str] | list[str], settings: GradsConfig,
                 storage_options: dict[str, Any], task: TaskConfig | None = None) -> Inputs:
    """Check settings, dataset, checkpoints and task before anything is written."""
    from gradlake.data import Dataset

    _check_settings(settings)
    options = storage_options or None
    names, checkpoints = _checkpoint_names(checkpoints)
    dataset = Dataset.open(data_url, options)
    held = dataset.index().select(splits=settings.splits)
    model_config, provenance, trained_task = _describe_checkpoints(names, checkpoints, dataset, options)
    task = task or TaskConfig(**trained_task)
    _check_dataset(dataset, settings, task, held)
    if len(held) == 0:
        raise InputError(f"grads.splits: {data_url} has no samples in splits {list(settings.splits)}")
    _check_weights(names, checkpoints, dataset, held, settings, task, options)
    return Inputs(names, checkpoints, dataset, held, model_config, provenance, task)


def prepare(data_url: str, checkpoints: Mapping[str, str] | list[str], store_url: str, settings: GradsConfig,
            storage_options: dict[str, Any], task: TaskConfig | None = None,
            inputs: Inputs | None = None) -> StagePlan:
    """Check every input (unless ``inputs`` were), then create (or extend) the store, drop the
    shards of sample files that cannot be read (their footers) or whose data objects are
    missing (they are recomputed), and list the uncommitted shards."""
    inputs = inputs or check_inputs(data_url, checkpoints, settings, storage_options, task)
    options = storage_options or None
    names, checkpoints, dataset, held = inputs.names, inputs.checkpoints, inputs.dataset, inputs.held
    model_config, provenance, task = inputs.model_config, inputs.provenance, inputs.task
    existing = read_metadata(StoreFiles(store_url, options))
    projector = _projector_spec(existing, dataset, held, model_config, checkpoints[-1], settings, options, task)
    spec = _store_spec(dataset, model_config, projector, settings, held,
                       existing["spec"]["shard_rows"] if existing and not settings.shard_rows else None, task)
    shards = plan_shards(held, spec.shard_rows)
    store = create_store(store_url, spec, provenance, options, index=dataset.index().table)
    damaged = check_parquet(store) + check_missing(store)
    for finding in damaged:
        print(f"grads: {finding}: dropped; shard(s) {', '.join(map(str, finding.shards))} recomputed", file=sys.stderr)
    repair(store, damaged)
    tasks, skipped = [], 0
    for name, path in zip(names, checkpoints):
        committed = store.committed_shards(name)
        skipped += len(committed & set(shards))
        tasks += [ShardTask(name, path, shard, rows) for shard, rows in shards.items()
                  if shard not in committed]
    return StagePlan(store, names, tasks, skipped, task)


def _checkpoint_names(checkpoints: Mapping[str, str] | list[str]) -> tuple[list[str], list[str]]:
    """(store names, paths): a mapping gives both, a list of paths is named by directory."""
    if not checkpoints:
        raise InputError("grads checkpoints: expected at least one checkpoint path")
    if isinstance(checkpoints, Mapping):  # store name -> path
        names = [check_name(name, "grads checkpoints") for name in checkpoints]
        checkpoints = list(checkpoints.values())
    else:
        names = [checkpoint_name(path) for path in checkpoints]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise InputError(f"grads checkpoints: two checkpoints are named {duplicate!r}; names must be unique")
    return names, list(checkpoints)


def _check_dataset(dataset, settings: GradsConfig, task_config: TaskConfig, held: np.ndarray) -> None:
    """The task's observables exist for the dataset's channels and work on two of its samples."""
    from gradlake.physics import available_observables, check_task, load_task

    task = load_task(task_config.path, task_config.kwargs)
    available = available_observables(dataset.channels, task)
    missing = [o for o in settings.observables if o not in available]
    if missing:
        raise InputError(f"grads.observables: {missing[0]!r} is not defined for channels "
                         f"{list(dataset.channels)} of {dataset.url} by task "
                         f"{task_config.path or 'default'}; available: {', '.join(available)}")
    if len(held):
        inputs, targets = dataset.samples(held[:2])
        check_task(task, dataset.channels, settings.observables, inputs, targets,
                   source=f"task {task_config.path or 'default'}")
    present = set(dataset.splits.tolist())
    unknown = sorted(set(settings.splits) - present - set(SPLIT_NAMES))
    if unknown:  # a standard split may be empty in a small dataset; another name is a typo
        raise InputError(f"grads.splits: {dataset.url} has no split {unknown[0]!r}; it has "
                         f"{', '.join(sorted(present))}")


def _check_weights(names: list[str], paths: list[str], dataset, held: np.ndarray, settings: GradsConfig,
                   task: TaskConfig, options) -> None:
    """Each checkpoint's weights load into its model and are finite, and (a float16 store) the
    φ's of the first held samples fit float16: failures that every attempt of a shard would repeat."""
    from gradlake.distributed.shard_work import Capture
    from gradlake.models.checkpoint import load_checkpoint

    rows = held[:2]
    inputs, targets = dataset.samples(rows)
    capture = Capture(dataclasses.replace(settings, device="cpu", probes=max(settings.probes, 1)), dataset.channels,
                      options, task=task)
    limit = float(np.finfo(settings.storage_dtype).max)
    for name, path in zip(names, paths):
        model, _ = load_checkpoint(path, options, device="cpu")
        if settings.storage_dtype != "float16":
            continue
        phis, _ = capture(model, inputs, targets, rows)
        over = next((obs for obs, phi in phis.items() if np.abs(phi).max(initial=0) > limit), None)
        if over:
            raise InputError(f"checkpoint {name}: phi_{over} of sample rows {rows.tolist()} overflows float16 "
                             f"(|phi| up to {np.abs(phis[over]).max():.3g} > {limit:g}); use --storage-dtype float32 "
                             "(grads.storage_dtype)")


def _describe_checkpoints(names: list[str], paths: list[str], dataset, options
                          ) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, Any]]:
    """(the shared model config, provenance per checkpoint, the task they were trained with:
    {"path", "kwargs"} or {}); InputError if they do not fit."""
    from gradlake.models.checkpoint import checkpoint_sha256, read_meta

    metas = {name: read_meta(path, options) for name, path in zip(names, paths)}
    first = names[0]
    for name, meta in metas.items():
        if list(meta.get("channels", dataset.channels)) != list(dataset.channels):
            raise InputError(f"checkpoint {name}: trained on channels {meta['channels']}, "
                             f"but {dataset.url} has {list(dataset.channels)}")
        if meta["model"] != metas[first]["model"] or meta.get("task", {}) != metas[first].get("task", {}):
            raise InputError(f"checkpoints {first} and {name} have different model configs or tasks; "
                             "one store holds the checkpoints of one training run")
    provenance = {name: {"sha256": checkpoint_sha256(path, options), "path": path,
                         "epoch": metas[name].get("epoch"),
                         "trained_on": (metas[name].get("dataset") or {}).get("fingerprint"),
                         **({"source": metas[name]["source"]} if metas[name].get("source") else {})}
                  for name, path in zip(names, paths)}
    return metas[first]["model"], provenance, dict(metas[first].get("task", {}))


def _projector_spec(existing: dict[str, Any] | None, dataset, held: np.ndarray, model_config: dict[str, Any],
                    checkpoint: str, settings: GradsConfig, options, task: TaskConfig) -> dict[str, Any]:
    """The projector's spec; an energy allocation is calibrated once, on ``checkpoint`` (the run's
    last) and ``calibration_samples`` held rows evenly spaced over the train split (else all held
    rows), and an existing store's calibration is kept when its settings are these."""
    from gradlake.grads import Projector
    from gradlake.grads.allocation import calibrate, calibration_rows
    from gradlake.models import from_config
    from gradlake.models.checkpoint import load_checkpoint
    from gradlake.physics import load_task

    uniform = Projector.from_config(settings)
    if settings.allocation == "uniform":
        return uniform.spec(from_config(model_config))
    k_total = settings.k_total or uniform.k(from_config(model_config))
    stored = (existing or {}).get("spec", {}).get("projector", {})
    wanted = {"allocation": "energy", "k_total": k_total, "seed": settings.seed, "kind": settings.projection}
    if all(stored.get(key) == value for key, value in wanted.items()) and \
            (stored.get("calibration") or {}).get("samples") == settings.calibration_samples:
        return stored
    pool = np.intersect1d(held, dataset.index().select(splits=["train"]))
    pool = pool if len(pool) else held
    rows = calibration_rows(pool, settings.calibration_samples)
    bar = progress(1, f"grads: energy allocation of k = {k_total} on {len(rows)} samples", unit="calibration")
    model, _ = load_checkpoint(checkpoint, options, device="cpu")
    inputs, targets = dataset.samples(rows)
    spec = calibrate(model, inputs, targets, k_total, seed=settings.seed, kind=settings.projection,
                     observables=settings.observables, channels=dataset.channels, rows=rows.tolist(),
                     task=load_task(task.path, task.kwargs)).spec(model)
    bar.update(1)
    bar.close()
    return spec


def _store_spec(dataset, model_config: dict[str, Any], projector: dict[str, Any], settings: GradsConfig,
                held: np.ndarray, store_shard_rows: int | None, task: TaskConfig) -> StoreSpec:
    """The run's store spec; shard_rows 0 takes an existing store's, else sizes them."""
    k = int(projector["k"])
    itemsize = np.dtype(settings.storage_dtype).itemsize
    n_rows = len(dataset.index())
    train = np.intersect1d(held, dataset.index().select(splits=["train"]))
    probes = settings.probes or full_rank_probes(k, len(train))
    widest = k * itemsize * (probes if "V" in settings.observables else 1)
    shard_rows = settings.shard_rows or store_shard_rows or shard_rows_for(n_rows, widest)
    return StoreSpec(
        dataset={"url": dataset.url, "fingerprint": dataset.fingerprint, "family": dataset.family,
                 "channels": list(dataset.channels), "n_trajectories": dataset.n_trajectories,
                 "n_times": dataset.n_times},
        model=model_config, projector=projector, observables=tuple(settings.observables),
        probes=probes, probe_seed=settings.seed, k=k, dtype=settings.storage_dtype,
        n_rows=n_rows, shard_rows=shard_rows, chunk_rows=chunk_rows_for(shard_rows, k * itemsize),
        splits=tuple(settings.splits), n_samples=len(held),
        n_shards=len(np.unique(np.asarray(held, dtype=np.int64) // shard_rows)),
        task={"path": task.path, "kwargs": dict(task.kwargs)} if task.path else {},
    )


def _check_settings(settings: GradsConfig) -> None:
    import torch

    if not settings.observables or len(set(settings.observables)) != len(settings.observables):
        raise InputError(f"grads.observables: expected distinct observables, got {list(settings.observables)}")
    if not settings.splits:
        raise InputError("grads.splits: expected at least one split")
    if settings.device != "auto":
        try:
            torch.device(settings.device)
        except (RuntimeError, ValueError):
            raise InputError(f"grads.device: expected 'auto', 'cpu' or 'cuda[:n]', got {settings.device!r}") from None


@dataclass
class _Outcome:
    results: list[dict[str, Any]] = field(default_factory=list)
    failures: list[tuple[ShardTask, str]] = field(default_factory=list)
    retries: int = 0
    workers: int = 0
    startup_s: float = 0.0  # start until the first result, less that shard's own work


def _actor_plan(settings: GradsConfig, n_tasks: int) -> tuple[int, dict[str, Any]]:
    """(number of actors, their Ray resource options): one per GPU, else per CPU slot."""
    import ray

    resources = ray.cluster_resources()
    threads = settings.threads_per_worker
    if resources.get("GPU", 0) >= 1 and settings.device != "cpu":
        count, options = settings.workers or int(resources["GPU"]), {"num_gpus": 1, "num_cpus": 1}
    else:
        count, options = settings.workers or max(1, int(resources.get("CPU", 1) // threads)), {"num_cpus": threads}
    return max(1, min(count, n_tasks)), options


def _drive(tasks: list[ShardTask], worker: WorkerSettings, settings: GradsConfig, total: int,
           skipped: int, lease: Lease, per_group: int, group_done: Callable[[str, int], Any]) -> _Outcome:
    """Run the tasks on a pool of actors holding a ShardWorker each (the executor,
    gradlake.distributed.executor); ``group_done(checkpoint, group)`` is called once the last
    task of a compaction group (``per_group`` shards) has committed."""
    from gradlake.distributed.executor import Executor, RayActors

    count, options = _actor_plan(settings, len(tasks))
    pool = RayActors(open_worker, count, max_restarts=settings.retries + 1, **options)
    outcome = _Outcome()
    started = time.monotonic()
    samples = written = 0
    pending = Counter((t.checkpoint, t.shard // per_group) for t in tasks)
    with Executor(pool, window=count, retries=settings.retries, keep_going=True, backoff_s=BACKOFF_S) as executor:
        run = executor.run(run_shard, (worker, settings.threads_per_worker), tasks, "grads", "shard", ordered=False,
                           skipped=skipped, stop=lambda: lease.lost and f"{lease.lost} (committed shards stay committed)",
                           label=lambda task: f"{task.checkpoint} shard {task.shard}")
        try:
            for index, result in run:
                task = tasks[index]
                if not outcome.results:
                    outcome.startup_s = max(0.0, time.monotonic() - started - result.get("compute_seconds", 0.0))
                outcome.results.append(result)
                samples += result["samples"]
                written += result["bytes"]
                elapsed = time.monotonic() - started
                remaining = total - skipped - len(outcome.results) - len(run.failures)
                run.bar.set_postfix(checkpoint=task.checkpoint, shard=task.shard,
                                    samples_s=round(samples / elapsed, 1), mb=round(written / 1e6, 2),
                                    eta_s=round(remaining * elapsed / len(outcome.results), 1))
                group = (task.checkpoint, task.shard // per_group)
                pending[group] -= 1
                if not pending[group]:
                    group_done(*group)
        except InputError as err:  # every attempt would fail alike: stop, once
            raise InputError(f"grads: {_first_line(err)}") from None
    outcome.failures = [(failure.unit, failure.error) for failure in run.failures]
    outcome.retries, outcome.workers = run.retries, run.workers
    return outcome


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(err).__name__
