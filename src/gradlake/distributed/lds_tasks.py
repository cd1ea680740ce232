"""The LDS stage on Ray: one executor task per α-subset's retraining (a GPU each where the
cluster has them and [train] asks for one).

The driver plans (gradlake.stages.lds_plan: the subsets, the predictions, the subsets done with
the same settings), runs the others' retrainings on the executor (gradlake.distributed.executor:
a bounded window in flight, retries; gradlake.stages.lds_unit) and scores them once every subset
is done (gradlake.stages.lds_finish).
"""

from __future__ import annotations

import time
from typing import Any

import ray

from gradlake.config import JobConfig
from gradlake.distributed.executor import Executor, RayTasks
from gradlake.stages import lds_plan
from gradlake.stages.lds_finish import finish
from gradlake.stages.lds_unit import run_unit


def _retrain(spec: lds_plan.Retrainings, unit: lds_plan.Subset) -> dict[str, Any]:
    import torch

    torch.set_num_threads(max(1, spec.job.eval.lds.cpus))
    return run_unit(spec, unit)


def run_lds(job: JobConfig) -> dict[str, Any]:
    """The LDS of the job's influence (needs its train and grads stages and a running Ray); returns lds.json."""
    started = time.monotonic()
    spec = lds_plan.LdsSpec(job)
    planned = lds_plan.plan(spec)
    settings = job.eval.lds
    gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 and job.train.device != "cpu" else 0
    window = max(1, int(ray.cluster_resources().get("CPU", 1)) // settings.cpus + 1)
    executor = Executor(RayTasks(num_cpus=settings.cpus, num_gpus=gpus), window=window)
    records = dict(planned.done)
    for _, result in executor.run(_retrain, planned.retrainings, planned.units, "lds: retrainings", "subset",
                                  ordered=False, skipped=len(planned.done),
                                  postfix=lambda result: {"seconds": result["seconds"]}):
        records[result["subset"]] = result
    return finish(spec, planned, records, started)
