"""The grads stage: plan shards, create the store, drive a pool of Ray actors over them.

The driver checks every input (gradlake.stages.grads_inputs) and the store's
compatibility (gradlake.stages.grads_plan) before any work, skips committed shards, hands
one shard at a time to each actor of the executor (gradlake.distributed.executor: each actor
holds a ShardWorker with its models, gradlake.stages.grads_unit), which retries failed shards with backoff on any actor; a
shard that keeps failing is reported once the others are done (GradlakeError). It holds the
store's lease from before it writes anything until the end, and compacts the committed shards'
sample rows into samples.parquet: each compaction group as soon as its shards are all
committed, the rest when the shards are done (also after failures).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gradlake.config import GradsConfig, RayConfig, TaskConfig
from gradlake.errors import GradlakeError, InputError
from gradlake.stages.grads_inputs import Inputs, check_inputs
from gradlake.stages.grads_plan import prepare
from gradlake.stages.grads_unit import FAULT_ENV, Fault, ShardTask, WorkerSettings, open_worker, run_shard
from gradlake.store import Lease, compact
from gradlake.store.layout import StoreFiles, group_shards
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
