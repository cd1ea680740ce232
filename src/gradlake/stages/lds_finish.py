"""The LDS stage's finish: every subset's actual change against the predicted ones, the scores
(gradlake.lds), ``lds.parquet`` and then ``lds.json``, written last."""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gradlake import fsio, lds
from gradlake.config import JobConfig
from gradlake.stages.lds_plan import LDS_JSON, LDS_PARQUET, METHODS, LdsPlan, LdsSpec

CITATION = ("Park, Georgiev, Ilyas, Leclerc, Madry: TRAK: Attributing Model Behavior at Scale, ICML 2023 "
            "(arXiv:2303.14186), Definition 2.3")


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


def finish(spec: LdsSpec, planned: LdsPlan, records: dict[int, dict[str, Any]], started: float) -> dict[str, Any]:
    """The scores of every subset (``records``: subset -> its record), lds.parquet, then
    lds.json (last); returns the summary."""
    job, names, masks, train_ids = spec.job, planned.retrainings.names, planned.masks, planned.train_ids
    settings, rows = job.eval.lds, planned.retrainings.rows
    actual = {a: np.array([records[m]["values"][a] for m in range(settings.subsets)]) - np.array(planned.full[a])
              for a in names}
    predicted = {a: {method: lds.predicted_change(planned.tau[method][a], masks) for method in METHODS}
                 for a in names}
    scores, defined = {method: {} for method in METHODS}, {method: {} for method in METHODS}
    for method in METHODS:
        for a in names:
            scores[method][a], per_sample = lds.lds(actual[a], predicted[a][method])
            defined[method][a] = int(np.isfinite(per_sample).sum())
    folder = spec.folder()
    buffer = io.BytesIO()
    pq.write_table(change_table(planned.test, masks, actual, predicted), buffer)
    folder.write_bytes(LDS_PARQUET, buffer.getvalue())
    summary = {
        "lds": scores, "methods": list(METHODS), "observables": list(names), "perturbation": "C",
        "defined_samples": defined,
        "test_samples": int(len(rows)), "subsets": settings.subsets, "alpha": settings.alpha,
        "subset_size": int(masks[0].sum()), "training_trajectories": int(len(train_ids)),
        "subset_seed": settings.seed, "train_seed": job.train.seed, "train_epochs": job.train.epochs,
        "subset_trajectories": [train_ids[mask].tolist() for mask in masks],
        "checkpoint": planned.name, "checkpoint_path": planned.checkpoint, **planned.metric_record,
        "exact": exact_status(job, planned.store),
        "prediction": "Δ̂_i(S) = Σ_{n∉S} Σ_{j∈n} H_AC(i, j) (gradlake.lds)",
        "citation": CITATION, "retraining_seconds_median": float(np.median([r["seconds"] for r in records.values()])),
        "retraining_cpu_seconds_median": float(np.median([r.get("cpu_seconds", np.nan) for r in records.values()])),
        "seconds": round(time.monotonic() - started, 2),
    }
    folder.write_json(LDS_JSON, summary)
    return summary


def change_table(test: pa.Table, masks: np.ndarray, actual: dict[str, np.ndarray],
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
