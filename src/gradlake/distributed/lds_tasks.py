"""The LDS stage on Ray: one retraining per α-subset of the training trajectories (numerics in gradlake.lds).

Layout under ``<out>/lds/``: ``subsets/s-<m>/started.json`` (its settings, written first),
``checkpoints/`` (the retraining, by gradlake.train.train with the job's [train] settings and
init seed on the subset's trajectories) and ``record.json`` (the subset, its test samples'
observables, written last). A subset with a record of the same settings is never retrained; a
task that runs twice resumes from the run's checkpoints and rewrites the same record
(at-least-once delivery is harmless); an interrupted retraining of the same settings resumes
from its last checkpoint; a folder of other settings is removed and redone.
Then ``lds.parquet`` (per subset, test sample and observable: actual and predicted changes)
and ``lds.json`` (the scores, M, α, the seeds, the subsets), written last.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from gradlake import fsio, lds
from gradlake.config import JobConfig, settings_hash
from gradlake.distributed.executor import Executor, RayTasks
from gradlake.errors import InputError

LDS_JSON, LDS_PARQUET = "lds.json", "lds.parquet"
METHODS = ("projected", "inner_product")  # (a) φᵀ(η̃ + λI)⁻¹φ from the store, (c) φᵀφ; (b) exact: see exact_status
CITATION = ("Park, Georgiev, Ilyas, Leclerc, Madry: TRAK: Attributing Model Behavior at Scale, ICML 2023 "
            "(arXiv:2303.14186), Definition 2.3")


def observables_at(checkpoint: str, data_url: str, rows: np.ndarray, names: tuple[str, ...], task_path: str,
                   task_kwargs: dict, storage_options: dict | None, batch: int = 64) -> dict[str, list[float]]:
    """O_A(i) of the model at ``checkpoint`` on the dataset samples ``rows``, for every name."""
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


@dataclass(frozen=True)
class Retrainings:
    """What every retraining reads: the job, the test rows and observables, the record's settings."""

    job: JobConfig
    rows: np.ndarray
    names: tuple[str, ...]
    record: dict[str, Any]


def _retrain(spec: Retrainings, unit: tuple[int, list[int]]) -> dict[str, Any]:
    """Retrain on subset ``m`` (the unit: m, its trajectories), evaluate the test samples, write
    the subset's record (last)."""
    import torch

    from gradlake.plugins import use_paths
    from gradlake.train import train

    job, rows, names, record = spec.job, spec.rows, spec.names, spec.record
    m, trajectories = unit
    torch.set_num_threads(max(1, job.eval.lds.cpus))
    use_paths(job.python_path)
    so = job.store.storage_options or None
    started, cpu = time.monotonic(), time.process_time()
    run_dir = fsio.join(job.lds_dir, "subsets", f"s-{m:04d}")
    fsio.Folder(run_dir, so).write_json("started.json", {**record, "trajectories": trajectories})
    checkpoint = train(job.data_url, job.model, job.train, run_dir, so, job.task, np.asarray(trajectories))[-1]
    values = observables_at(checkpoint, job.data_url, rows, names, job.task.path, job.task.kwargs, so)
    result = {**record, "subset": m, "trajectories": trajectories, "checkpoint": checkpoint, "values": values,
              "seconds": round(time.monotonic() - started, 2), "cpu_seconds": round(time.process_time() - cpu, 2)}
    fsio.Folder(run_dir, so).write_json("record.json", result)
    return result


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


def exact_status(job: JobConfig, store) -> dict[str, Any]:
    """Whether the exact minibatch H applies, and why not (it never predicts a removal so far)."""
    url = job.eval.lds.exact or store.reduce_url(job.reduce.name)
    folder = fsio.Folder(url, job.store.storage_options or None)
    if not folder.exists("exact.json"):
        return {"skipped": f"no exact minibatch output at {url} (reduce.exact.enabled or `gradlake exact`)"}
    split = folder.read_json("exact.json").get("split")
    return {"skipped": f"the exact minibatches at {url} hold samples of split {split!r} only, so none holds "
                       "both a test sample and a training trajectory: the exact minibatch H predicts no change "
                       "from removing training trajectories", "url": url}


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


def run_lds(job: JobConfig) -> dict[str, Any]:
    """The LDS of the job's influence (needs its train and grads stages and a running Ray); returns lds.json."""
    from gradlake.data import Dataset
    from gradlake.store import GradientStore

    started = time.monotonic()
    settings, so = job.eval.lds, job.store.storage_options or None
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
    folder = fsio.Folder(job.lds_dir, so)
    folder.remove(LDS_JSON)
    done = {}
    for m in range(settings.subsets):
        identity = {**record, "trajectories": train_ids[masks[m]].tolist()}
        found = {kind: folder.read_json(f"subsets/s-{m:04d}/{kind}.json")
                 for kind in ("record", "started") if folder.exists(f"subsets/s-{m:04d}/{kind}.json")}
        if "record" in found and _same(found["record"], identity):
            done[m] = found["record"]
        elif "record" in found or not _same(found.get("started", {}), identity):
            folder.remove(f"subsets/s-{m:04d}")  # another run's; one of these settings resumes its training
    gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 and job.train.device != "cpu" else 0
    window = max(1, int(ray.cluster_resources().get("CPU", 1)) // settings.cpus + 1)
    executor = Executor(RayTasks(num_cpus=settings.cpus, num_gpus=gpus), window=window)
    todo = [(m, train_ids[masks[m]].tolist()) for m in range(settings.subsets) if m not in done]
    for _, result in executor.run(_retrain, Retrainings(job, rows, names, record), todo, "lds: retrainings",
                                  "subset", ordered=False, skipped=len(done),
                                  postfix=lambda result: {"seconds": result["seconds"]}):
        done[result["subset"]] = result

    actual = {a: np.array([done[m]["values"][a] for m in range(settings.subsets)]) - np.array(full[a])
              for a in names}
    predicted = {a: {method: lds.predicted_change(tau[method][a], masks) for method in METHODS} for a in names}
    scores, defined = {method: {} for method in METHODS}, {method: {} for method in METHODS}
    for method in METHODS:
        for a in names:
            scores[method][a], per_sample = lds.lds(actual[a], predicted[a][method])
            defined[method][a] = int(np.isfinite(per_sample).sum())
    table = _table(test, masks, actual, predicted)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    folder.write_bytes(LDS_PARQUET, buffer.getvalue())
    summary = {
        "lds": scores, "methods": list(METHODS), "observables": list(names), "perturbation": "C",
        "defined_samples": defined,
        "test_samples": int(len(rows)), "subsets": settings.subsets, "alpha": settings.alpha,
        "subset_size": int(masks[0].sum()), "training_trajectories": int(len(train_ids)),
        "subset_seed": settings.seed, "train_seed": job.train.seed, "train_epochs": job.train.epochs,
        "subset_trajectories": [train_ids[mask].tolist() for mask in masks],
        "checkpoint": name, "checkpoint_path": checkpoint, **metric_record,
        "exact": exact_status(job, store), "prediction": "Δ̂_i(S) = Σ_{n∉S} Σ_{j∈n} H_AC(i, j) (gradlake.lds)",
        "citation": CITATION, "retraining_seconds_median": float(np.median([r["seconds"] for r in done.values()])),
        "retraining_cpu_seconds_median": float(np.median([r.get("cpu_seconds", np.nan) for r in done.values()])),
        "seconds": round(time.monotonic() - started, 2),
    }
    folder.write_json(LDS_JSON, summary)
    return summary


def _table(test: pa.Table, masks: np.ndarray, actual: dict[str, np.ndarray],
           predicted: dict[str, dict[str, np.ndarray]]) -> pa.Table:
    """One row per (subset, test sample, observable): actual and predicted changes per method."""
    m_count, t_count = masks.shape[0], test.num_rows
    tables = []
    for a, values in actual.items():
        columns = {"subset": np.repeat(np.arange(m_count, dtype=np.int32), t_count),
                   **{c: np.tile(test.column(c).to_numpy(zero_copy_only=False), m_count)
                      for c in ("row", "trajectory", "t", "class")},
                   "observable": np.full(m_count * t_count, a), "actual": values.reshape(-1)}
        columns.update({f"predicted_{method}": p.reshape(-1) for method, p in predicted[a].items()})
        tables.append(pa.table(columns))
    return pa.concat_tables(tables)
