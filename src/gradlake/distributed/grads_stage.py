"""The grads stage: plan shards, create the store, drive a pool of Ray actors over them.

The driver checks every input and the store's compatibility before any work, skips
committed shards, hands one shard at a time to each actor (a ``ray.wait`` loop, so it
knows exactly which shard is where), retries failed shards with backoff on any actor,
and reports a shard that keeps failing once the others are done (GradlakeError).
"""

from __future__ import annotations

import heapq
import itertools
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradlake.config import GradsConfig, RayConfig, TaskConfig
from gradlake.data.index import SPLIT_NAMES
from gradlake.distributed.plan import ShardTask, plan_shards
from gradlake.distributed.shard_work import FAULT_ENV, Fault, WorkerSettings
from gradlake.errors import GradlakeError, InputError
from gradlake.progress import progress
from gradlake.store import GradientStore, StoreSpec, create_store
from gradlake.store.layout import check_name, checkpoint_name
from gradlake.store.spec import chunk_rows_for
from gradlake.store.writer import set_stage_status

STAGE = "grads"
BACKOFF_S, BACKOFF_MAX_S = 0.5, 30.0


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
    plan = prepare(data_url, checkpoints, store_url, settings, options, task)
    store, skipped = plan.store, plan.skipped
    total = store.spec.n_shards * len(plan.names)
    set_stage_status(store, STAGE, {"status": "running", "checkpoints": plan.names,
                                    "shards_total": total})
    started = time.monotonic()
    outcome = _Outcome()
    if plan.tasks:
        from gradlake.distributed.cluster import ensure_ray

        try:
            ensure_ray(ray_settings.address, ray_settings.num_cpus)
            worker = WorkerSettings(data_url, store_url, settings, options, fault,
                                    task=plan.task, python_path=tuple(python_path))
            outcome = _drive(plan.tasks, worker, settings, total, skipped)
        except BaseException as err:  # Ray down, Ctrl-C: say so; committed shards stay committed
            set_stage_status(store, STAGE, {"status": "interrupted", "error": _first_line(err)})
            raise
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


def prepare(data_url: str, checkpoints: Mapping[str, str] | list[str], store_url: str, settings: GradsConfig,
            storage_options: dict[str, Any], task: TaskConfig | None = None) -> StagePlan:
    """Check every input, then create (or extend) the store and list the uncommitted shards."""
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
    shards = plan_shards(held, settings.shard_rows)
    spec = _store_spec(dataset, model_config, settings, n_samples=len(held), n_shards=len(shards), task=task)
    store = create_store(store_url, spec, provenance, options)
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


def _store_spec(dataset, model_config: dict[str, Any], settings: GradsConfig, n_samples: int,
                n_shards: int, task: TaskConfig) -> StoreSpec:
    from gradlake.grads import Projector
    from gradlake.models import from_config

    projector = Projector.from_config(settings).spec(from_config(model_config))
    k = int(projector["k"])
    return StoreSpec(
        dataset={"url": dataset.url, "fingerprint": dataset.fingerprint, "family": dataset.family,
                 "channels": list(dataset.channels), "n_trajectories": dataset.n_trajectories,
                 "n_times": dataset.n_times},
        model=model_config, projector=projector, observables=tuple(settings.observables),
        probes=settings.probes, probe_seed=settings.seed, k=k, dtype=settings.dtype,
        n_rows=len(dataset.index()), shard_rows=settings.shard_rows,
        chunk_rows=chunk_rows_for(settings.shard_rows, k * np.dtype(settings.dtype).itemsize),
        splits=tuple(settings.splits), n_samples=n_samples, n_shards=n_shards,
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


@dataclass
class _Slot:
    actor: Any
    deaths: int = 0


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
           skipped: int) -> _Outcome:
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    from gradlake.distributed.actors import GradsActor

    count, options = _actor_plan(settings, len(tasks))
    max_restarts = settings.retries + 1
    slots = [_Slot(GradsActor.options(max_restarts=max_restarts, max_task_retries=0, **options)
                   .remote(worker, settings.threads_per_worker)) for _ in range(count)]
    outcome = _Outcome(workers=count)
    order = itertools.count()
    queue = [(0.0, next(order), task, 0) for task in tasks]  # (ready at, tie, task, attempt)
    heapq.heapify(queue)
    idle = list(slots)
    inflight: dict[Any, tuple[_Slot, ShardTask, int]] = {}
    bar = progress(total, "grads", unit="shard")
    if skipped:
        bar.set_postfix(skipped=skipped)
        bar.update(skipped)
    started = time.monotonic()
    samples = written = 0

    def retry(task: ShardTask, attempt: int, error: str) -> None:
        if attempt < settings.retries:
            delay = min(BACKOFF_MAX_S, BACKOFF_S * 2 ** attempt)
            bar.write(f"grads: {task.checkpoint} shard {task.shard} failed (attempt {attempt + 1}): "
                      f"{error}; retrying in {delay:.1f} s")
            outcome.retries += 1
            heapq.heappush(queue, (time.monotonic() + delay, next(order), task, attempt + 1))
        else:
            outcome.failures.append((task, error))

    try:
        while queue or inflight:
            now = time.monotonic()
            while idle and queue and queue[0][0] <= now:
                _, _, task, attempt = heapq.heappop(queue)
                slot = idle.pop()
                inflight[slot.actor.run.remote(task)] = (slot, task, attempt)
            if not inflight:
                if not idle:  # every worker is gone
                    outcome.failures += [(t, "no worker left (every actor died)") for _, _, t, _ in queue]
                    break
                time.sleep(max(0.0, queue[0][0] - now))
                continue
            timeout = max(0.0, queue[0][0] - now) if queue and idle else None
            done, _ = ray.wait(list(inflight), num_returns=1, timeout=timeout)
            for ref in done:
                slot, task, attempt = inflight.pop(ref)
                try:
                    result = ray.get(ref)
                except RayActorError as err:
                    slot.deaths += 1
                    if slot.deaths <= max_restarts:
                        idle.append(slot)
                    retry(task, attempt, f"worker died ({_first_line(err)})")
                    continue
                except RayTaskError as err:
                    idle.append(slot)
                    retry(task, attempt, _first_line(err.cause if err.cause is not None else err))
                    continue
                idle.append(slot)
                if not outcome.results:
                    outcome.startup_s = max(0.0, time.monotonic() - started - result.get("compute_seconds", 0.0))
                outcome.results.append(result)
                samples += result["samples"]
                written += result["bytes"]
                elapsed = time.monotonic() - started
                remaining = total - skipped - len(outcome.results) - len(outcome.failures)
                bar.set_postfix(checkpoint=task.checkpoint, shard=task.shard,
                                samples_s=round(samples / elapsed, 1), mb=round(written / 1e6, 2),
                                eta_s=round(remaining * elapsed / len(outcome.results), 1))
                bar.update(1)
    finally:
        bar.close()
        for slot in slots:
            ray.kill(slot.actor)
    return outcome


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(err).__name__
