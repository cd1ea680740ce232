"""The exact minibatch mode on Ray: one executor task per minibatch (a GPU each where the cluster has them).

The driver plans the minibatches, skips those with a completion record from a run with the
same settings, runs the others on the executor (gradlake.distributed.executor: a bounded window
in flight, retries), and aggregates once every minibatch is done (gradlake.stages.exact_plan,
exact_unit, exact_finish).
"""

from __future__ import annotations

import time
from typing import Any

import ray

from gradlake.config import ExactConfig
from gradlake.distributed.executor import Executor, RayTasks
from gradlake.reduce.output import ReduceOutput
from gradlake.stages import exact_plan
from gradlake.stages.exact_finish import finish
from gradlake.stages.exact_unit import run_unit


def _minibatch(spec: exact_plan.ExactSpec, unit: exact_plan.Minibatch) -> dict[str, Any]:
    import torch

    torch.set_num_threads(max(1, spec.settings.cpus))
    return run_unit(spec, unit)


def _postfix(record: dict[str, Any]) -> dict[str, Any]:
    solve = record["solve"]
    bound = solve["h_error_bound"]
    return {"method": solve["method"], "products": solve["products"], "seconds": record["seconds"],
            **({"bound": f"{bound:.1e}"} if bound is not None else {})}


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
    channels = Dataset.open(data_url, storage_options=so).channels
    spec = exact_plan.ExactSpec(
        checkpoint, data_url, ReduceOutput(out_url, so).url, settings, damping,
        tuple(lam for lam in dict.fromkeys(lambdas) if lam != damping), exact_plan.check_pairs(channels, pairs),
        tuple(normalize), so, {"checkpoint": checkpoint, "dataset": data_url, **(identity or {})})
    units = exact_plan.plan(spec)
    done = exact_plan.resume(spec, units)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 and settings.device != "cpu" else 0
    window = max(1, int(ray.cluster_resources().get("CPU", 1)) // settings.cpus + 1)
    executor = Executor(RayTasks(num_cpus=settings.cpus, num_gpus=gpus), window=window)
    for _ in executor.run(_minibatch, spec, [u for u in units if u.index not in done], "exact: minibatches",
                          "minibatch", ordered=False, skipped=len(done), postfix=_postfix):
        pass
    return finish(spec, units, exact_plan.completed(spec), started)
