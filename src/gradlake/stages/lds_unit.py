"""One unit of the LDS stage: retrain on an α-subset, evaluate the test samples, write its record."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from gradlake import fsio
from gradlake.stages.lds_plan import Retrainings, Subset, observables_at, subset_records


def run_unit(spec: Retrainings, unit: Subset) -> dict[str, Any]:
    """Retrain on subset ``unit`` (gradlake.train.train, the job's [train] settings, resumed from
    the run's last checkpoint), evaluate the test samples, write the subset's record (last)."""
    from gradlake.plugins import use_paths
    from gradlake.train import train

    job, rows, names, record = spec.job, spec.rows, spec.names, spec.record
    m, trajectories = unit.index, unit.trajectories
    use_paths(job.python_path)
    so = job.store.storage_options or None
    started, cpu = time.monotonic(), time.process_time()
    records = subset_records(job, m)
    run_dir = fsio.join(job.lds_dir, records.directory)
    records.write("started", {**record, "trajectories": trajectories})
    checkpoint = train(job.data_url, job.model, job.train, run_dir, so, job.task, np.asarray(trajectories))[-1]
    values = observables_at(checkpoint, job.data_url, rows, names, job.task.path, job.task.kwargs, so)
    result = {**record, "subset": m, "trajectories": trajectories, "checkpoint": checkpoint, "values": values,
              "seconds": round(time.monotonic() - started, 2), "cpu_seconds": round(time.process_time() - cpu, 2)}
    records.write("record", result)
    return result
