"""Queries on a gradient store: selected samples with their φ rows, and top-k influence.

Both stream over the store in blocks of rows, so any store size works in bounded memory.

Top-k scores any number of queries in one pass: their preconditioned rows
a = φ_A (η̃ + λI)⁻¹ [Q, k] stay in memory and each block of candidate rows costs one GEMM
a φ_Bᵀ and a :class:`TopK` merge. The candidates are cut into parts of whole shards; each
part selects its own candidates (the filter runs in its Parquet scan), so no process ever
holds every candidate row. A *mapper* runs a function over the parts: in this process by
default, as Ray tasks with :func:`gradlake.distributed.query_tasks.ray_mapper`. Parts are
merged in part order, so the answer does not depend on who ran them.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
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
from gradlake.reduce.pairwise import TopK, precondition, tile
from gradlake.streaming import OrderedSum, prefetched, row_blocks
from gradlake.store import GradientStore

SAMPLE_COLUMNS = ["row", "trajectory", "t", "class", "split"]
BLOCK_BYTES = 16 * 2**20  # φ of one block of a pass, as float32
READ_AHEAD = 1  # blocks read ahead of the one being scored (more in flight scatter a disk's reads)
PART_ROWS = 2**18  # rows of one part of a pass by default (its candidates' labels stay in memory)


def block_rows_for(store: GradientStore, observable: str) -> int:
    """Rows per block of a streamed pass: about BLOCK_BYTES of float32 φ."""
    return max(16, BLOCK_BYTES // (4 * int(np.prod(store.spec.row_shape(observable)))))


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


# --------------------------------------------------------------------------- parts of a pass
Mapper = Callable[[Callable[..., Any], list[tuple]], list]
"""``mapper(fn, args)`` returns ``[fn(store, *a) for a in args]`` in order, run anywhere."""


def in_process(store: GradientStore, workers: int | None = None, desc: str | None = None) -> Mapper:
    """The mapper that runs the parts here, ``workers`` at a time (default: one per core) in
    threads. Reads, casts and GEMMs release the GIL, so parts overlap on the cores. With
    ``desc``, a progress bar counts the parts done."""
    workers = workers or os.cpu_count() or 1

    def run(fn, args):
        bar = progress(len(args), desc, "parts") if desc else None
        results = []
        with one_thread_per_call(), ThreadPoolExecutor(workers) as pool:
            for result in pool.map(lambda a: fn(store, *a), args):
                results.append(result)
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        return results

    return run


@contextmanager
def one_thread_per_call():
    """BLAS and torch held to one thread per call, process-wide, while parts run in threads:
    their pools' spinning threads would otherwise fight the parts for the cores."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(before)


def shard_parts(store: GradientStore, parts: int | None = None) -> list[tuple[int, int]]:
    """[first, stop) shard ranges cutting the store into at most ``parts`` contiguous parts
    (None: parts of about PART_ROWS rows, so memory does not grow with the store, and at
    least one per core)."""
    parts = parts or max(-(-store.n_rows // PART_ROWS), os.cpu_count() or 1)
    bounds = np.linspace(0, store.spec.n_shards, max(1, min(parts, store.spec.n_shards)) + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def part_moments(store: GradientStore, checkpoint: str, observable: str, where: str,
                 shards: tuple[int, int], block_rows: int) -> Moments:
    """Moments of the ``observable`` φ's of the rows of ``where`` in ``shards``."""
    moments = Moments(store.k)
    rows = store.rows(checkpoint, where.strip() or None, shards=shards)
    for _, phi in store.iter_blocks(checkpoint, observable, rows, block_rows):
        moments.add(phi)
    return moments


def metric_of(store: GradientStore, where: str, observable: str = "V", checkpoint: str | None = None,
              block_rows: int | None = None, mapper: Mapper | None = None, parts: int | None = None,
              source: str = "the reference selection") -> Metric:
    """η̃ from the ``observable`` φ's of the samples selected by ``where`` (streamed, by
    parts); InputError naming ``source`` when it selects no sample with finite φ."""
    name = store.checkpoint(checkpoint)
    results = (mapper or in_process(store))(
        part_moments, [(name, observable, where, p, block_rows or block_rows_for(store, observable))
                       for p in shard_parts(store, parts)])
    total = OrderedSum()
    for moments in results:
        total.push(moments)
    moments = total.result()
    if moments.count == 0:
        raise InputError(f"{source} {where!r} selects no sample with finite φ to build the metric from")
    return Metric.from_moments(moments, source=f"metric from {observable}")


@dataclass(frozen=True)
class TopKPlan:
    """What a part of a top-k pass needs: the preconditioned queries and the candidates' filter."""

    checkpoint: str
    candidates: str  # filter of the candidate samples
    observable: str  # perturbation observable B
    query_rows: np.ndarray  # [Q]
    queries: np.ndarray  # φ_A (η̃ + λI)⁻¹ of the query rows, float32 [Q, k]
    k: int
    block_rows: int
    exclude_self: bool = True


LABELS = ["row", "trajectory", "t", "class"]


def part_topk(store: GradientStore, plan: TopKPlan, shards: tuple[int, int]) -> tuple[dict[str, np.ndarray], pa.Table, int]:
    """Top-k lists of every query over the candidates in ``shards``, the labels (row,
    trajectory, t, class) of the candidates in them, and how many candidates there were.

    Reads up to READ_AHEAD blocks of candidate rows in threads while one is scored."""
    best = TopK(plan.query_rows, plan.k, plan.exclude_self)
    candidates = store.samples(plan.checkpoint, plan.candidates.strip() or None, shards=shards, columns=LABELS)
    rows = candidates.column("row").to_numpy().astype(np.int64)
    store.load_indices(plan.checkpoint, plan.observable, rows)
    blocks = row_blocks(rows, plan.block_rows)
    read = lambda block: store.read(plan.checkpoint, plan.observable, block, dtype=store.spec.dtype)  # noqa: E731
    for block, phi in zip(blocks, prefetched(read, blocks, READ_AHEAD)):
        best.update(tile(plan.queries, phi), block)
    result = best.result()
    listed = np.unique(np.concatenate([result["top_ids"].ravel(), result["bottom_ids"].ravel()]))
    return result, candidates.take(pa.array(np.searchsorted(rows, listed[listed >= 0]))), len(rows)


def topk(store: GradientStore, query_where: str, train_where: str = "split == 'train'",
         k: int = 10, pair: str = "CC", checkpoint: str | None = None, metric: str | Metric = "V",
         damping: float = 1e-4, block_rows: int | None = None, mapper: Mapper | None = None,
         parts: int | None = None, exclude_self: bool = True) -> pa.Table:
    """The k most and least influential ``train_where`` samples for each ``query_where`` sample.

    H(i, j) = φ_{A,i}ᵀ (η̃ + λI)⁻¹ φ_{B,j} with pair = "AB" (response A on the query i,
    perturbation B on the training sample j); η̃ from the ``metric`` φ's of the training
    selection (or a given :class:`Metric`). All queries are scored in one pass over the
    candidates, cut into ``parts`` (default: of about PART_ROWS rows) run by ``mapper``, in
    blocks of ``block_rows`` rows (default: about BLOCK_BYTES of φ). One row per (query,
    kind, rank), with both samples' trajectory, t and class; a sample is never its own
    candidate unless ``exclude_self`` is False. The schema metadata (:func:`description_of`)
    names the checkpoint, the pair, the normalisation (none: raw H) and the metric and λ.
    """
    if len(pair) != 2:
        raise InputError(f"--pair: expected two observable letters like 'CC', got {pair!r}")
    response, perturbation = pair
    name = store.checkpoint(checkpoint)
    for observable in (response, perturbation, *([metric] if isinstance(metric, str) else [])):
        store.check_observable(observable)
    queries = store.samples(name, query_where, columns=SAMPLE_COLUMNS)
    if queries.num_rows == 0:
        raise InputError(f"--query-where {query_where!r} selects no sample; {known_values(store, checkpoint)}")
    mapper = mapper or in_process(store)
    metric_name = metric if isinstance(metric, str) else "given"
    if isinstance(metric, str):
        metric = metric_of(store, train_where, metric, name, block_rows, mapper, parts, "--train-where")
    query_rows = queries.column("row").to_numpy().astype(np.int64)
    plan = TopKPlan(name, train_where, perturbation, query_rows,
                    precondition(store.read(name, response, query_rows), metric.inverse(damping)),
                    k, block_rows or block_rows_for(store, perturbation), exclude_self)
    results = mapper(part_topk, [(plan, p) for p in shard_parts(store, parts)])
    if sum(n for _, _, n in results) == 0:
        raise InputError(f"--train-where {train_where!r} selects no sample; {known_values(store, checkpoint)}")
    best = TopK(query_rows, k, exclude_self)
    for result, _, _ in results:
        best.merge(result)
    description = describe(store, name, kind="topk", pair=pair, response=response, perturbation=perturbation,
                           normalization="none", metric=metric_name, damping=damping, query_where=query_where,
                           train_where=train_where, k=k)
    table = topk_table(best.result(), queries, pa.concat_tables([t for _, t, _ in results]).sort_by("row"))
    return with_description(table, description)


def topk_table(result: dict[str, np.ndarray], queries: pa.Table, labels: pa.Table) -> pa.Table:
    """One row per (query, kind, rank) with both samples' trajectory, t and class
    (``labels``: the listed candidates' rows, sorted)."""
    label_rows = labels.column("row").to_numpy()
    columns: dict[str, Any] = {}
    for kind in ("top", "bottom"):
        ids, values = result[f"{kind}_ids"], result[kind]
        qi, rank = np.nonzero(ids >= 0)
        rows = ids[qi, rank]
        at = np.searchsorted(label_rows, rows)
        part = {"query_row": queries.column("row").take(pa.array(qi)),
                "query_trajectory": queries.column("trajectory").take(pa.array(qi)),
                "query_t": queries.column("t").take(pa.array(qi)).cast(pa.int64()),
                "query_class": queries.column("class").take(pa.array(qi)),
                "kind": pa.array([kind] * len(qi), pa.string()),
                "rank": pa.array(rank + 1, pa.int64()),
                "row": pa.array(rows, pa.int64()),
                "trajectory": labels.column("trajectory").take(pa.array(at)),
                "t": labels.column("t").take(pa.array(at)).cast(pa.int64()),
                "class": labels.column("class").take(pa.array(at)),
                "influence": pa.array(values[qi, rank], pa.float64())}
        for key, value in part.items():
            columns.setdefault(key, []).append(value)
    return pa.table({key: pa.concat_arrays([c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c
                                             for c in value]) for key, value in columns.items()})
