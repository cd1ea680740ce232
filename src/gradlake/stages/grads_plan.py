"""The grads stage's plan: its units (:class:`~gradlake.stages.grads_unit.ShardTask`, one shard
of one checkpoint) and its store: the projector's spec (an energy allocation calibrated once),
the store spec sized from the settings, the store created (or extended) and repaired, and the
uncommitted shards listed (:func:`prepare`).

Gradlake shard s is the row range [s * shard_rows, (s + 1) * shard_rows) of the dataset's
sample index, which is exactly one zarr shard of every array in the store: one writer per
zarr shard, ever. A shard is planned when it holds at least one sample of the store's splits.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradlake.config import GradsConfig, TaskConfig
from gradlake.progress import progress
from gradlake.reduce.metric import full_rank_probes
from gradlake.stages.grads_inputs import Inputs, check_inputs
from gradlake.stages.grads_unit import ShardTask
from gradlake.store import GradientStore, StoreSpec, create_store
from gradlake.store.layout import StoreFiles
from gradlake.store.spec import chunk_rows_for, shard_rows_for
from gradlake.store.store import read_metadata
from gradlake.store.verify import check_missing, check_parquet, repair


def plan_shards(held_rows: np.ndarray, shard_rows: int) -> dict[int, np.ndarray]:
    """Shard number -> its sorted held rows, for every shard with at least one."""
    rows = np.unique(np.asarray(held_rows, dtype=np.int64))
    shard = rows // shard_rows
    cuts = np.flatnonzero(np.diff(shard)) + 1
    return {int(part[0] // shard_rows): part for part in np.split(rows, cuts) if len(part)}


@dataclass
class StagePlan:
    """The store, created or extended, and what is left to compute in it."""

    store: GradientStore
    names: list[str]  # the run's checkpoint names, in order
    tasks: list[ShardTask]  # uncommitted shards
    skipped: int  # committed shards
    task: TaskConfig  # the loss and observables


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
        probes=probes, probe_seed=settings.effective_probe_seed, k=k, dtype=settings.storage_dtype,
        n_rows=n_rows, shard_rows=shard_rows, chunk_rows=chunk_rows_for(shard_rows, k * itemsize),
        splits=tuple(settings.splits), n_samples=len(held),
        n_shards=len(np.unique(np.asarray(held, dtype=np.int64) // shard_rows)),
        task={"path": task.path, "kwargs": dict(task.kwargs)} if task.path else {},
    )
