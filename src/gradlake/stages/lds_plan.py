"""The LDS stage's shape (no Ray): its spec, its plan (the α-subsets, the predictions, resume).

Layout under ``<out>/lds/``: ``subsets/s-<m>/started.json`` (its settings, written first),
``checkpoints/`` (the retraining, by gradlake.train.train with the job's [train] settings and
init seed on the subset's trajectories) and ``record.json`` (the subset, its test samples'
observables, written last). A subset with a record of the same settings is never retrained; a
unit that runs twice resumes from the run's checkpoints and rewrites the same record
(at-least-once delivery is harmless); an interrupted retraining of the same settings resumes
from its last checkpoint; a folder of other settings is removed and redone.
Then ``lds.parquet`` (per subset, test sample and observable: actual and predicted changes)
and ``lds.json`` (the scores, M, α, the seeds, the subsets), written last.

Here: :class:`LdsSpec`, :func:`plan` (checks, subsets, the attribution's predictions, the
full model's observables, resume). One unit, a retraining: gradlake.stages.lds_unit; the
scores: gradlake.stages.lds_finish; the numerics: gradlake.lds; the driver that runs the units
on the executor: gradlake.distributed.lds_tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from gradlake import fsio, lds
from gradlake.config import JobConfig, settings_hash
from gradlake.errors import InputError
from gradlake.stages.records import Records

LDS_JSON, LDS_PARQUET = "lds.json", "lds.parquet"
METHODS = ("projected", "inner_product")  # (a) φᵀ(η̃ + λI)⁻¹φ from the store, (c) φᵀφ; (b) exact: see exact_status


@dataclass(frozen=True)
class LdsSpec:
    """One LDS run: the job (its data, [train], model, task, store, [reduce] metric and [eval.lds])."""

    job: JobConfig

    @property
    def storage_options(self) -> dict[str, Any] | None:
        return self.job.store.storage_options or None

    def folder(self) -> fsio.Folder:
        return fsio.Folder(self.job.lds_dir, self.storage_options)


@dataclass(frozen=True)
class Retrainings:
    """What every retraining reads: the job, the test rows and observables, the record's settings."""

    job: JobConfig
    rows: np.ndarray
    names: tuple[str, ...]
    record: dict[str, Any]


@dataclass(frozen=True)
class Subset:
    """One unit: α-subset ``index`` and its training trajectories."""

    index: int
    trajectories: list[int]


@dataclass(frozen=True)
class LdsPlan:
    """What :func:`plan` found: the units' spec, the subsets left to retrain (``units``) and those
    done (subset -> record), and what the finish reads (the subsets, the test samples, the
    predictions τ, the full model's observables, the metric's record, the checkpoint)."""

    retrainings: Retrainings
    units: list[Subset]
    done: dict[int, dict[str, Any]]
    store: Any
    name: str
    checkpoint: str
    train_ids: np.ndarray
    masks: np.ndarray
    test: pa.Table
    tau: dict[str, dict[str, np.ndarray]]
    full: dict[str, list[float]]
    metric_record: dict[str, Any]


def observables_at(checkpoint: str, data_url: str, rows: np.ndarray, names: tuple[str, ...], task_path: str,
                   task_kwargs: dict, storage_options: dict | None, batch: int = 64) -> dict[str, list[float]]:
    """O_A(i) of the model at ``checkpoint`` on the dataset samples ``rows``, for every name (the
    full model's here, each retraining's in its unit)."""
    import torch

    from gradlake import physics
    from gradlake.data import Dataset
    from gradlake.models.checkpoint import load_checkpoint

    ds = Dataset.open(data_url, storage_options=storage_options)
    task = physics.load_task(task_path, task_kwargs)
    model, _ = load_checkpoint(checkpoint, storage_options)
    model.eval()
    out: dict[str, list[float]] = {name: [] for name in names}
    with torch.no_grad():
        for start in range(0, len(rows), batch):
            x, y = (torch.from_numpy(a) for a in ds.samples(rows[start:start + batch]))
            pred = model(x)
            for name in names:
                out[name] += physics.observable(name, pred, x, y, ds.channels, task).double().tolist()
    return out


def subset_records(job: JobConfig, m: int) -> Records:
    """Subset ``m``'s records: ``subsets/s-<m>/started.json`` (written first) and ``record.json`` (last)."""
    return Records(fsio.Folder(job.lds_dir, job.store.storage_options or None), f"subsets/s-{m:04d}")


def record_settings(job: JobConfig, fingerprint: str, rows: np.ndarray) -> str:
    """What a subset's record depends on besides its trajectories: training, model, task, data, test rows."""
    return settings_hash(job.train, job.model, job.task, fingerprint, np.asarray(rows).tolist())


def _same(found: dict[str, Any], identity: dict[str, Any]) -> bool:
    return all(found.get(key) == value for key, value in identity.items())


def full_checkpoint(job: JobConfig, store) -> tuple[str, str]:
    """(store name, path) of the last checkpoint of the job's training run (the first seed's)."""
    from gradlake.models.checkpoint import list_checkpoints

    seed, run_dir = job.training_runs()[0]
    found = list_checkpoints(run_dir, job.store.storage_options or None)
    if not found:
        raise InputError(f"eval.lds: no checkpoint in {run_dir}; run the train stage first")
    name = ("" if not job.train.seeds else f"seed-{seed}-") + found[-1].rstrip("/").rsplit("/", 1)[-1]
    if name not in store.checkpoints:
        raise InputError(f"eval.lds: the store {store.url} has no gradients of the trained model {name!r} "
                         f"(it holds {', '.join(store.checkpoints) or 'none'}); run the grads stage for it")
    return name, found[-1]


def _trajectory_phi(store, name: str, observable: str, rows: np.ndarray, groups: np.ndarray, n: int) -> np.ndarray:
    """[n, k]: φ of the training rows summed per training trajectory (streamed)."""
    total = np.zeros((n, store.k))
    position = {int(r): g for r, g in zip(rows, groups)}
    for block, phi in store.iter_blocks(name, observable, rows, 4096):
        total += lds.group_sums(phi, np.array([position[int(r)] for r in block]), n)
    return total


def _predictions(job: JobConfig, store, ds, name: str, test: pa.Table, train_ids: np.ndarray,
                 names: tuple[str, ...]) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    """τ [T, G] per method and response observable (perturbation: the loss C), and the metric's record."""
    from gradlake.reduce.metric import Metric, Moments

    settings = job.reduce
    train_rows = store.rows(name, splits=["train"])
    trajectory = store.samples(name, splits=["train"], columns=["trajectory"]).column("trajectory").to_numpy()
    expected = len(train_ids) * (ds.n_times - 1)
    if len(train_rows) != expected or not np.isin(trajectory, train_ids).all():
        raise InputError(f"eval.lds: checkpoint {name} of store {store.url} holds {len(train_rows)} of the "
                         f"{expected} training samples; the predictions need all (grads.splits with 'train', "
                         "the grads stage complete)")
    groups = np.searchsorted(train_ids, trajectory)
    phi_c = _trajectory_phi(store, name, "C", train_rows, groups, len(train_ids))
    moments = Moments(store.k)
    for _, phi in store.iter_blocks(name, settings.metric, store.rows(name, splits=[settings.reference_split]), 4096):
        moments.add(phi)
    metric = Metric.from_moments(moments, f"eval.lds: metric {settings.metric}", settings.metric_estimator)
    inverse = metric.inverse(settings.damping)
    rows = test.column("row").to_numpy()
    tau = {method: {a: lds.influence(store.read(name, a, rows), phi_c, inverse if method == "projected" else None)
                    for a in names} for method in METHODS}
    isotropic = metric.shrink * float(np.trace(moments.outer)) / store.k
    record = {"k": store.k, "metric": settings.metric, "metric_estimator": settings.metric_estimator,
              "reference_split": settings.reference_split, "reference_samples": moments.count,
              "damping": settings.damping, "effective_ridge": settings.damping + isotropic,
              "metric_top_eigenvalue": float(metric.eigenvalues[0])}
    return tau, record


def _resume(spec: LdsSpec, record: dict[str, Any], subsets: list[Subset]) -> dict[int, dict[str, Any]]:
    """Subset -> record of those finished with these settings; lds.json and the folders of
    other settings go (a started one of these settings stays: its training resumes)."""
    spec.folder().remove(LDS_JSON)
    done = {}
    for subset in subsets:
        records = subset_records(spec.job, subset.index)
        identity = {**record, "trajectories": subset.trajectories}
        found = records.load()
        if "record" in found and _same(found["record"], identity):
            done[subset.index] = found["record"]
        elif "record" in found or not _same(found.get("started", {}), identity):
            records.folder.remove(records.directory)  # another run's; one of these settings resumes its training
    return done


def plan(spec: LdsSpec) -> LdsPlan:
    """Check the inputs, draw the subsets, predict each one's change (τ), evaluate the full
    model on the test samples and find the subsets done (needs the job's train and grads stages)."""
    from gradlake.data import Dataset
    from gradlake.store import GradientStore

    job, so = spec.job, spec.storage_options
    settings = job.eval.lds
    store = GradientStore.open(job.store_url, so)
    name, checkpoint = full_checkpoint(job, store)
    ds = Dataset.open(job.data_url, storage_options=so)
    train_ids = np.flatnonzero(ds.splits == "train")
    masks = lds.sample_subsets(len(train_ids), settings.subsets, settings.alpha, settings.seed)
    store.check_observable("C")
    names = tuple(o for o in store.observables if o != "V")
    test = store.samples(name, settings.test, columns=["row", "trajectory", "t", "class"])
    if test.num_rows == 0:
        raise InputError(f"eval.lds.test: {settings.test!r} selects no sample of checkpoint {name} in {store.url}")
    rows = test.column("row").to_numpy()
    tau, metric_record = _predictions(job, store, ds, name, test, train_ids, names)
    full = observables_at(checkpoint, job.data_url, rows, names, job.task.path, job.task.kwargs, so)
    record = {"settings": record_settings(job, ds.fingerprint, rows)}
    subsets = [Subset(m, train_ids[masks[m]].tolist()) for m in range(settings.subsets)]
    done = _resume(spec, record, subsets)
    return LdsPlan(Retrainings(job, rows, names, record), [s for s in subsets if s.index not in done], done, store,
                   name, checkpoint, train_ids, masks, test, tau, full, metric_record)
