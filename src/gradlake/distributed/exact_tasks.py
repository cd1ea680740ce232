"""The exact minibatch mode on Ray: one task per minibatch (a GPU each where the cluster has them).

The driver plans the minibatches, skips those with a completion record from a run with the
same settings, keeps a bounded window of tasks in flight (``ray.wait``), lets Ray retry a
failed task, and aggregates once every minibatch is done (gradlake.stages.exact).
"""

from __future__ import annotations

import time
from typing import Any

import ray

from gradlake.config import ExactConfig
from gradlake.progress import progress
from gradlake.reduce import minibatch
from gradlake.stages import exact as exact_stage
from gradlake.reduce.output import ReduceOutput


@ray.remote(max_retries=2)
def _minibatch(cpus: int, *args):
    import torch

    torch.set_num_threads(max(1, cpus))
    return exact_stage.minibatch_work(*args)


def run_exact(checkpoint: str, data_url: str, out_url: str, settings: ExactConfig, damping: float,
              lambdas=(), pairs=("CC", "MC", "EC"), normalize=("none", "row-std", "cosine"),
              storage_options: dict[str, Any] | None = None, identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """Exact H on the planned minibatches, their statistics and the agreement report, under ``out_url``.

    Needs a running Ray (gradlake.distributed.cluster.ensure_ray). Restartable: finished
    minibatches are kept. Returns the summary written to exact.json.
    """
    from gradlake.data import Dataset

    started = time.monotonic()
    so = storage_options or None
    ds = Dataset.open(data_url, storage_options=so)
    pairs = exact_stage.check_pairs(ds.channels, pairs)
    batches = minibatch.plan(ds.trajectories, ds.n_times, settings.split, settings.classes, settings.per_class,
                             settings.minibatches)
    identity = {"checkpoint": checkpoint, "dataset": data_url, **(identity or {})}
    out = ReduceOutput(out_url, so, provenance=identity)
    lambdas = tuple(lam for lam in dict.fromkeys(lambdas) if lam != damping)
    record, done = exact_stage.prepare(out, batches, settings, damping, lambdas, pairs, normalize, identity)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 and settings.device != "cpu" else 0
    task = _minibatch.options(num_cpus=settings.cpus, num_gpus=gpus)
    window = max(1, int(ray.cluster_resources().get("CPU", 1)) // settings.cpus + 1)
    todo = [m for m in range(len(batches)) if m not in done]
    bar = progress(len(batches), "exact: minibatches", "minibatch")
    bar.update(len(done))
    pending = []
    while todo or pending:
        while todo and len(pending) < window:
            m = todo.pop(0)
            pending.append(task.remote(settings.cpus, checkpoint, data_url, out.url, m, batches[m], settings,
                                       damping, lambdas, pairs, normalize, so, record))
        finished, pending = ray.wait(pending, num_returns=1)
        for result in ray.get(finished):
            solve = result["solve"]
            bound = solve["h_error_bound"]
            bar.set_postfix(method=solve["method"], products=solve["products"], seconds=result["seconds"],
                            **({"bound": f"{bound:.1e}"} if bound is not None else {}))
            bar.update(1)
    bar.close()
    return exact_stage.finish(out, batches, settings, damping, lambdas, pairs, normalize, identity, started)
