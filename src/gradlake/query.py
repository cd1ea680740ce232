"""Queries on a gradient store: selected samples with their φ rows, and top-k influence.

Both stream over the store in blocks of rows, so any store size works in bounded memory.
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gradlake import fsio
from gradlake.errors import InputError
from gradlake.progress import progress
from gradlake.reduce.metric import Metric, Moments
from gradlake.reduce.pairwise import TopK, whiten
from gradlake.store import GradientStore

SAMPLE_COLUMNS = ["row", "trajectory", "t", "class", "split"]


def open_store(url: str, storage_options: dict[str, Any] | None = None) -> GradientStore:
    """Open a gradient store read-only (any fsspec URL)."""
    return GradientStore.open(url, storage_options=storage_options)


OUTPUT_FORMAT = "gradlake-query/1"
METADATA_KEY = b"gradlake"  # Parquet schema metadata: what the table holds (JSON)


def describe(store: GradientStore, checkpoint: str | None, **settings: Any) -> dict[str, Any]:
    """What an output was computed from: the store, its checkpoint (name and weights sha256),
    gradlake's version, and ``settings`` (observable, filters, pair, ...)."""
    from gradlake import __version__

    name = store.checkpoint(checkpoint)
    return {"format": OUTPUT_FORMAT, "store": store.url, "checkpoint": name,
            "checkpoint_sha256": store.provenance["checkpoints"][name].get("sha256", ""),
            **settings, "gradlake_version": __version__}


def with_description(table: pa.Table, description: dict[str, Any]) -> pa.Table:
    """``table`` with ``description`` as its schema metadata (key ``gradlake``, JSON)."""
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(description).encode()})


def description_of(table_or_schema: pa.Table | pa.Schema) -> dict[str, Any]:
    """The description a query or top-k table carries ({} when it has none)."""
    schema = table_or_schema.schema if isinstance(table_or_schema, pa.Table) else table_or_schema
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def known_values(store: GradientStore, checkpoint: str | None = None) -> str:
    """The classes and splits a checkpoint's samples have, for a note on an empty selection."""
    table = store.samples(checkpoint, columns=["class", "split"])
    if table.num_rows == 0:
        return f"checkpoint {store.checkpoint(checkpoint)} has no committed samples yet"
    classes = sorted(pc.unique(table["class"]).to_pylist())
    splits = sorted(pc.unique(table["split"]).to_pylist())
    return f"known classes are {', '.join(classes)}; splits are {', '.join(splits)}"


def _sibling(url: str, suffix: str) -> str:
    """``x.npy`` -> ``x<suffix>`` at the same place (any fsspec URL)."""
    return posixpath.splitext(url)[0] + suffix


def export(store: GradientStore, out: str | Path, where: str | None = None, observable: str = "C",
           checkpoint: str | None = None, block_rows: int = 4096,
           storage_options: dict[str, Any] | None = None) -> int:
    """Write the selected samples and their φ rows to ``out`` (.parquet or .npy, any fsspec URL);
    returns N.

    Parquet: the samples columns plus ``phi`` (fixed-size list of float32, [k] or
    [probes * k] for V); the schema metadata ``gradlake`` (JSON, :func:`description_of`) names
    the store, checkpoint (and its sha256), observable and filter. npy: the φ array alone,
    float32 [N, k] (or [N, probes, k]), in row order, with the rows in ``<x>.rows.npy`` and the
    same description in ``<x>.meta.json``. Each file appears whole or not at all; the φ file
    is written last.
    """
    out = str(out)
    suffix = posixpath.splitext(out)[1]
    if suffix not in (".parquet", ".npy"):
        raise InputError(f"--out: expected a .parquet or .npy file, got {out!r}")
    fsio.check_access(out, storage_options, "--out")
    samples = store.samples(checkpoint, where)
    rows = samples.column("row").to_numpy().astype(np.int64)
    description = describe(store, checkpoint, observable=observable, where=where or "",
                           samples=len(rows))
    blocks = store.iter_blocks(checkpoint, observable, rows, block_rows)
    bar = progress(total=len(rows), desc="query", unit="sample")
    if suffix == ".npy":
        shape = (len(rows), *store.spec.row_shape(observable))
        with fsio.open_output(_sibling(out, ".rows.npy"), storage_options) as f:
            np.save(f, rows)
        with fsio.open_output(_sibling(out, ".meta.json"), storage_options) as f:
            f.write(json.dumps({**description, "array": posixpath.basename(out), "shape": list(shape),
                                "dtype": "float32", "rows": posixpath.basename(_sibling(out, ".rows.npy"))},
                               indent=2).encode())
        with fsio.open_output(out, storage_options) as f, bar:
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                                                     "fortran_order": False, "shape": shape})
            for _, phi in blocks:
                f.write(np.ascontiguousarray(phi, dtype=np.float32).tobytes())
                bar.update(len(phi))
        return len(rows)
    width = int(np.prod(store.spec.row_shape(observable)))
    schema = samples.select(SAMPLE_COLUMNS).schema.append(
        pa.field("phi", pa.list_(pa.float32(), width)))
    schema = schema.with_metadata({METADATA_KEY: json.dumps(description).encode()})
    with fsio.open_output(out, storage_options) as f, pq.ParquetWriter(f, schema) as writer, bar:
        for start, (_, phi) in zip(range(0, len(rows), block_rows), blocks):
            part = samples.slice(start, len(phi)).select(SAMPLE_COLUMNS)
            values = pa.array(phi.reshape(len(phi), -1).ravel(), pa.float32())
            part = part.append_column("phi", pa.FixedSizeListArray.from_arrays(values, width))
            writer.write_table(part.cast(schema))
            bar.update(len(phi))
    return len(rows)


def write_table(table: pa.Table, out: str, storage_options: dict[str, Any] | None = None) -> None:
    """A table to a Parquet file at any fsspec URL (whole or not at all), metadata included."""
    if not out.endswith(".parquet"):
        raise InputError(f"--out: expected a .parquet file, got {out!r}")
    with fsio.open_output(out, storage_options) as f:
        pq.write_table(table, f)


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
    selection. One row per (query, kind, rank), with both samples' trajectory, t and class;
    the schema metadata (:func:`description_of`) names the checkpoint, the pair, the
    normalisation (none: raw H) and the metric and λ.
    """
    if len(pair) != 2:
        raise InputError(f"--pair: expected two observable letters like 'CC', got {pair!r}")
    response, perturbation = pair
    queries = store.samples(checkpoint, query_where, columns=SAMPLE_COLUMNS)
    train = store.samples(checkpoint, train_where, columns=SAMPLE_COLUMNS)
    if queries.num_rows == 0:
        raise InputError(f"--query-where {query_where!r} selects no sample; {known_values(store, checkpoint)}")
    if train.num_rows == 0:
        raise InputError(f"--train-where {train_where!r} selects no sample; {known_values(store, checkpoint)}")
    query_rows = queries.column("row").to_numpy().astype(np.int64)
    train_rows = train.column("row").to_numpy().astype(np.int64)

    whitener = metric_of(store, train_rows, metric, checkpoint, block_rows).whitener(damping)
    psi_q = whiten(store.read(checkpoint, response, query_rows), whitener)
    best = TopK(query_rows, k)
    for rows, phi in store.iter_blocks(checkpoint, perturbation, train_rows, block_rows):
        best.update(psi_q @ whiten(phi, whitener).T, rows)
    description = describe(store, checkpoint, kind="topk", pair=pair, response=response,
                           perturbation=perturbation, normalization="none", metric=metric,
                           damping=damping, query_where=query_where, train_where=train_where, k=k)
    return with_description(_topk_table(best.result(), queries, train, k), description)


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
