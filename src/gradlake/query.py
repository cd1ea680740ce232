"""Queries on a gradient store: selected samples with their φ rows, and top-k influence.

Both stream over the store in blocks of rows, so any store size works in bounded memory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gradlake.errors import InputError
from gradlake.reduce.metric import Metric, Moments
from gradlake.reduce.pairwise import TopK, whiten
from gradlake.store import GradientStore

SAMPLE_COLUMNS = ["row", "trajectory", "t", "class", "split"]


def open_store(url: str, storage_options: dict[str, Any] | None = None) -> GradientStore:
    """Open a gradient store read-only (any fsspec URL)."""
    return GradientStore.open(url, storage_options=storage_options)


def export(store: GradientStore, out: str | Path, where: str | None = None, observable: str = "C",
           checkpoint: str | None = None, block_rows: int = 4096) -> int:
    """Write the selected samples and their φ rows to ``out`` (.parquet or .npy); returns N.

    Parquet: the samples columns plus ``phi`` (fixed-size list of float32, [k] or
    [probes * k] for V). npy: the φ array alone, float32 [N, k] (or [N, probes, k]), in
    row order, with the rows in ``<out>.rows.npy``.
    """
    out = Path(out)
    if out.suffix not in (".parquet", ".npy"):
        raise InputError(f"--out: expected a .parquet or .npy file, got {str(out)!r}")
    samples = store.samples(checkpoint, where)
    rows = samples.column("row").to_numpy().astype(np.int64)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")  # renamed into place when complete
    if out.suffix == ".npy":
        shape = (len(rows), *store.spec.row_shape(observable))
        target = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=shape)
        for start, (_, phi) in zip(range(0, len(rows), block_rows),
                                   store.iter_blocks(checkpoint, observable, rows, block_rows)):
            target[start:start + len(phi)] = phi
        target.flush()
        del target
        np.save(out.with_suffix(".rows.npy"), rows)
        os.replace(partial, out)
        return len(rows)
    width = int(np.prod(store.spec.row_shape(observable)))
    schema = samples.select(SAMPLE_COLUMNS).schema.append(
        pa.field("phi", pa.list_(pa.float32(), width)))
    with pq.ParquetWriter(partial, schema) as writer:
        for start, (_, phi) in zip(range(0, len(rows), block_rows),
                                   store.iter_blocks(checkpoint, observable, rows, block_rows)):
            part = samples.slice(start, len(phi)).select(SAMPLE_COLUMNS)
            values = pa.array(phi.reshape(len(phi), -1).ravel(), pa.float32())
            part = part.append_column("phi", pa.FixedSizeListArray.from_arrays(values, width))
            writer.write_table(part.cast(schema))
    os.replace(partial, out)
    return len(rows)


def metric_of(store: GradientStore, rows: np.ndarray, observable: str = "V",
              checkpoint: str | None = None, block_rows: int = 4096) -> Metric:
    """η̃ from the ``observable`` φ's of ``rows`` (streamed)."""
    moments = Moments(store.k)
    for _, phi in store.iter_blocks(checkpoint, observable, rows, block_rows):
        moments.add(phi)
    if moments.count == 0:
        raise InputError("the reference selection has no samples with finite φ to build the metric from")
    return Metric.from_moments(moments, source=f"metric from {observable}")


def topk(store: GradientStore, query_where: str, train_where: str = "split == 'train'",
         k: int = 10, pair: str = "CC", checkpoint: str | None = None, metric: str = "V",
         damping: float = 1e-4, block_rows: int = 4096) -> pa.Table:
    """The k most and least influential ``train_where`` samples for each ``query_where`` sample.

    H(i, j) = φ_{A,i}ᵀ (η̃ + λI)⁻¹ φ_{B,j} with pair = "AB" (response A on the query i,
    perturbation B on the training sample j); η̃ from the ``metric`` φ's of the training
    selection. One row per (query, kind, rank), with both samples' trajectory, t and class.
    """
    if len(pair) != 2:
        raise InputError(f"--pair: expected two observable letters like 'CC', got {pair!r}")
    response, perturbation = pair
    queries = store.samples(checkpoint, query_where, columns=SAMPLE_COLUMNS)
    train = store.samples(checkpoint, train_where, columns=SAMPLE_COLUMNS)
    if queries.num_rows == 0:
        raise InputError(f"--query-where {query_where!r} selects no sample")
    if train.num_rows == 0:
        raise InputError(f"--train-where {train_where!r} selects no sample")
    query_rows = queries.column("row").to_numpy().astype(np.int64)
    train_rows = train.column("row").to_numpy().astype(np.int64)

    whitener = metric_of(store, train_rows, metric, checkpoint, block_rows).whitener(damping)
    psi_q = whiten(store.read(checkpoint, response, query_rows), whitener)
    best = TopK(query_rows, k)
    for rows, phi in store.iter_blocks(checkpoint, perturbation, train_rows, block_rows):
        best.update(psi_q @ whiten(phi, whitener).T, rows)
    return _topk_table(best.result(), queries, train, k)


def _topk_table(result: dict[str, np.ndarray], queries: pa.Table, train: pa.Table, k: int) -> pa.Table:
    q = {c: queries.column(c).to_numpy(zero_copy_only=False) for c in ("row", "trajectory", "t", "class")}
    train_rows = train.column("row").to_numpy().astype(np.int64)
    lookup = {c: train.column(c).to_numpy(zero_copy_only=False) for c in ("trajectory", "t", "class")}
    columns: dict[str, list] = {name: [] for name in (
        "query_row", "query_trajectory", "query_t", "query_class", "kind", "rank",
        "row", "trajectory", "t", "class", "influence")}
    for kind in ("top", "bottom"):
        ids, values = result[f"{kind}_ids"], result[kind]
        for qi in range(len(q["row"])):
            for rank in range(k):
                row = int(ids[qi, rank])
                if row < 0:
                    continue
                pos = int(np.searchsorted(train_rows, row))
                columns["query_row"].append(int(q["row"][qi]))
                columns["query_trajectory"].append(int(q["trajectory"][qi]))
                columns["query_t"].append(int(q["t"][qi]))
                columns["query_class"].append(str(q["class"][qi]))
                columns["kind"].append(kind)
                columns["rank"].append(rank + 1)
                columns["row"].append(row)
                columns["trajectory"].append(int(lookup["trajectory"][pos]))
                columns["t"].append(int(lookup["t"][pos]))
                columns["class"].append(str(lookup["class"][pos]))
                columns["influence"].append(float(values[qi, rank]))
    return pa.table(columns)
