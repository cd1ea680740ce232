"""The train stage (no Ray): one unit per training run of the job.

The units are the job's runs (JobConfig.training_runs): one per seed of ``train.seeds``, each
in ``<out>/train/seed-<s>``, or the one run of ``train.seed`` in ``<out>/train``. A unit trains
its run with gradlake.train.train (the numerics, its checkpoints and their resume: a run
directory's last complete checkpoint), so the stage keeps no records of its own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from gradlake.config import JobConfig, ModelConfig, TaskConfig, TrainConfig


@dataclass(frozen=True)
class TrainSpec:
    """What every run reads: the dataset, the model, the [train] settings, the task; the runs."""

    data_url: str
    model: ModelConfig
    settings: TrainConfig
    runs: tuple[tuple[int, str], ...]  # (seed, run directory)
    storage_options: dict[str, Any] | None = None
    task: TaskConfig | None = None

    @classmethod
    def of(cls, job: JobConfig) -> TrainSpec:
        return cls(job.data_url, job.model, job.train, tuple(job.training_runs()),
                   job.store.storage_options or None, job.task)


@dataclass(frozen=True)
class TrainRun:
    """One unit: a run's seed and directory."""

    seed: int
    run_dir: str


def plan(spec: TrainSpec) -> list[TrainRun]:
    return [TrainRun(seed, run_dir) for seed, run_dir in spec.runs]


def run_unit(spec: TrainSpec, unit: TrainRun) -> list[str]:
    """Train (or resume) the run; its checkpoint paths, oldest first."""
    from gradlake.train import train

    return train(spec.data_url, spec.model, dataclasses.replace(spec.settings, seed=unit.seed), unit.run_dir,
                 storage_options=spec.storage_options, task=spec.task)


def finish(spec: TrainSpec, units: list[TrainRun], records: list[list[str]]) -> dict[str, Any]:
    """Every run's checkpoints, run by run."""
    return {"checkpoints": [path for paths in records for path in paths]}
