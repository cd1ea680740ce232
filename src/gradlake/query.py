"""Queries on a gradient store: selected samples with their φ rows, and top-k influence.

Both stream over the store in blocks of rows, so any store size works in bounded memory.

Top-k scores any number of queries in one pass: their preconditioned rows
a = φ_A (η̃ + λI)⁻¹ [Q, k] stay in memory and each block of candidate rows costs one GEMM
a φ_Bᵀ and a :class:`TopK` merge. The candidates are cut into parts of whole shards; each
part selects its own candidates (the filter runs in its Parquet scan), so no process ever
holds every candidate row. The passes (the metric's, the top-k's) have the stages' shape
(gradlake.stages.query: a frozen spec, the parts as units, a part's work, the merge in part
order); a *mapper* runs a pass's parts on the executor (gradlake.distributed.executor): in
this process by default, as Ray tasks with :func:`gradlake.distributed.query_tasks.ray_mapper`.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gradlake import fsio
from gradlake.errors import InputError
from gradlake.progress import progress
from gradlake.reduce.layers import Layers, pair_shares
from gradlake.provenance import METADATA_KEY, description_of, with_description  # noqa: F401 (public here too)
from gradlake.reduce.metric import Metric
from gradlake.reduce.pairwise import precondition
from gradlake.stages.query import (MomentsPass, TopKPass, merge_topk, part_moments, part_topk, shard_parts,
                                   sum_moments)
from gradlake.stages.reduce_source import StoreRef
from gradlake.store import GradientStore
from gradlake.topk_table import topk_table

SAMPLE_COLUMNS = ["row", "trajectory", "t", "class", "split"]
BLOCK_BYTES = 16 * 2**20  # φ of one block of a pass, as float32


def block_rows_for(store: GradientStore, observable: str) -> int:
    """Rows per block of a streamed pass: about BLOCK_BYTES of float32 φ."""
    return max(16, BLOCK_BYTES // (4 * int(np.prod(store.spec.row_shape(observable)))))


def open_store(url: str, storage_options: dict[str, Any] | None = None, allow_partial: bool = False) -> GradientStore:
    """Open a gradient store read-only (any fsspec URL); ``allow_partial`` answers from the
    committed shards of a checkpoint whose shards are not all committed."""
    return GradientStore.open(url, storage_options=storage_options, allow_partial=allow_partial)


OUTPUT_FORMAT = "gradlake-query/1"


def describe(store: GradientStore, checkpoint: str | None, **settings: Any) -> dict[str, Any]:
    """What an output was computed from: the store, its checkpoint (name and weights sha256),
    gradlake's version, ``settings`` (observable, filters, pair, ...), and "partial" (shards
    committed and total) when it was answered from some of the checkpoint's shards only."""
    from gradlake import __version__

    name = store.checkpoint(checkpoint)
    partial = store.partial(name)
    return {"format": OUTPUT_FORMAT, "store": store.url, "checkpoint": name,
            "checkpoint_sha256": store.provenance["checkpoints"][name].get("sha256", ""),
            **settings, **({"partial": partial} if partial else {}), "gradlake_version": __version__}


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
    fsio.check_output(out, storage_options, folder=False)
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
Mapper = Callable[[Callable[[Any, Any], Any], Any, list], list]
"""``mapper(fn, spec, units)`` returns ``[fn(spec, u) for u in units]`` in order, run anywhere
(``fn``: a pass's unit of work, gradlake.stages.query)."""


def in_process(workers: int | None = None, desc: str | None = None) -> Mapper:
    """The mapper that runs the parts here, ``workers`` at a time (default: one per core) in
    threads of the executor (gradlake.distributed.executor). Reads, casts and GEMMs release the
    GIL, so parts overlap on the cores. With ``desc``, a progress bar counts the parts done."""
    from gradlake.distributed.executor import Executor, InProcess

    executor = Executor(InProcess(threads=workers or os.cpu_count() or 1), retries=0)

    def run(fn, spec, units):
        with one_thread_per_call():
            return executor.map(fn, spec, units, desc or "", "parts")

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


def check_metric(store: GradientStore, observable: str) -> None:
    """InputError saying how to choose the metric when the store lacks its observable's φ's."""
    if observable not in store.spec.observables:
        raise InputError(f"--metric {observable}: store {store.url} holds no φ of {observable} to build the metric "
                         f"from (it holds {', '.join(store.spec.observables)}); choose the metric with --metric, "
                         "e.g. --metric C (the empirical Fisher)")


def metric_of(store: GradientStore, where: str, observable: str = "V", checkpoint: str | None = None,
              block_rows: int | None = None, mapper: Mapper | None = None, parts: int | None = None,
              source: str = "the reference selection") -> Metric:
    """η̃ from the ``observable`` φ's of the samples selected by ``where`` (streamed, by
    parts); InputError naming ``source`` when it selects no sample with finite φ."""
    spec = MomentsPass(StoreRef.of(store, store.checkpoint(checkpoint)), observable, where,
                       block_rows or block_rows_for(store, observable))
    moments = sum_moments((mapper or in_process())(part_moments, spec, shard_parts(store, parts)))
    if moments.count == 0:
        raise InputError(f"{source} {where!r} selects no sample with finite φ to build the metric from")
    return Metric.from_moments(moments, source=f"metric from {observable}")


GROUP_BY = ("trajectory", "class", "t")
AGGREGATES = ("mean", "sum")


def query_groups(queries: pa.Table, phi: np.ndarray, group_by: str | None,
                 aggregate: str) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """The query groups of ``group_by`` (None: one group, "all"): a table with a row per
    group (row null; trajectory, t, class where all its members share them, else null;
    group, group_size), the groups' φ [G, k] (``aggregate`` "mean" or "sum" of their
    members' finite φ rows, float64; NaN for none) and each query's group index."""
    keys = queries.column(group_by).to_numpy(zero_copy_only=False) if group_by else np.zeros(queries.num_rows)
    values, member_of = np.unique(keys, return_inverse=True)
    phi = np.asarray(phi, dtype=np.float64)
    finite = np.isfinite(phi).all(axis=1)
    sums = np.zeros((len(values), phi.shape[1]))
    np.add.at(sums, member_of[finite], phi[finite])
    counts = np.bincount(member_of[finite], minlength=len(values))
    scale = 1.0 / np.maximum(counts, 1) if aggregate == "mean" else np.ones(len(values))
    group_phi = np.where(counts[:, None] > 0, sums * scale[:, None], np.nan)
    columns = {}
    for name in ("trajectory", "t", "class"):
        column = queries.column(name).to_numpy(zero_copy_only=False)
        shared = [column[member_of == g].tolist() for g in range(len(values))]
        columns[name] = [v[0] if v.count(v[0]) == len(v) else None for v in shared]
    table = pa.table({"row": pa.nulls(len(values), pa.int64()),
                      "trajectory": pa.array(columns["trajectory"], pa.int64()),
                      "t": pa.array(columns["t"], pa.int64()), "class": pa.array(columns["class"], pa.string()),
                      "group": [f"{group_by}={v}" if group_by else "all" for v in values.tolist()],
                      "group_size": pa.array(counts, pa.int64())})
    return table, group_phi, member_of


def topk(store: GradientStore, query_where: str, train_where: str = "split == 'train'",
         k: int = 10, pair: str = "CC", checkpoint: str | None = None, metric: str | Metric = "V",
         damping: float = 1e-4, block_rows: int | None = None, mapper: Mapper | None = None,
         parts: int | None = None, exclude_self: bool = True, group_by: str | None = None,
         aggregate: str | None = None, by_layer: bool = False) -> pa.Table:
    """The k most and least influential ``train_where`` samples for each ``query_where`` sample
    (or query group).

    H(i, j) = φ_{A,i}ᵀ (η̃ + λI)⁻¹ φ_{B,j} with pair = "AB" (response A on the query i,
    perturbation B on the training sample j); η̃ from the ``metric`` φ's of the training
    selection (or a given :class:`Metric`). All queries are scored in one pass over the
    candidates, cut into ``parts`` (default: of about PART_ROWS rows) run by ``mapper``, in
    blocks of ``block_rows`` rows (default: about BLOCK_BYTES of φ). The table is
    :mod:`gradlake.topk_table`'s; a sample is never its own candidate unless ``exclude_self``
    is False. The schema metadata (:func:`description_of`) names the checkpoint, the pair,
    the normalisation (none: raw H) and the metric and λ.

    ``group_by`` ("trajectory", "class" or "t") and/or ``aggregate`` ("mean" or "sum", the
    default mean; alone: one group of every query) score each group's aggregated φ_A in
    the same pass: by linearity its H row is the mean or sum of its members' rows; a
    group's members are never its candidates (unless ``exclude_self`` is False).
    ``by_layer`` adds the listed pairs' shares per layer group and parameter block
    (:mod:`gradlake.reduce.layers`).
    """
    if len(pair) != 2:
        raise InputError(f"--pair: expected two observable letters like 'CC', got {pair!r}")
    if group_by is not None and group_by not in GROUP_BY:
        raise InputError(f"--group-by: expected one of {', '.join(GROUP_BY)}, got {group_by!r}")
    if aggregate is not None and aggregate not in AGGREGATES:
        raise InputError(f"--aggregate: expected one of {', '.join(AGGREGATES)}, got {aggregate!r}")
    try:
        layers = Layers.from_spec(store.spec.projector, store.spec.model, store.k) if by_layer else None
    except InputError as err:
        raise InputError(f"--by-layer: {err}") from None
    response, perturbation = pair
    name = store.checkpoint(checkpoint)
    for observable in (response, perturbation):
        store.check_observable(observable)
    if isinstance(metric, str):
        check_metric(store, metric)
    queries = store.samples(name, query_where, columns=SAMPLE_COLUMNS)
    if queries.num_rows == 0:
        raise InputError(f"--query-where {query_where!r} selects no sample; {known_values(store, checkpoint)}")
    mapper = mapper or in_process()
    metric_name = metric if isinstance(metric, str) else "given"
    if isinstance(metric, str):
        metric = metric_of(store, train_where, metric, name, block_rows, mapper, parts, "--train-where")
    query_rows = queries.column("row").to_numpy().astype(np.int64)
    phi_a = store.read(name, response, query_rows)
    grouped = group_by is not None or aggregate is not None
    if grouped:
        aggregate = aggregate or "mean"
        queries, phi_a, member_of = query_groups(queries, phi_a, group_by, aggregate)
    else:
        member_of = np.arange(len(query_rows))
    order = np.argsort(query_rows, kind="stable") if exclude_self else np.zeros(0, np.int64)
    inverse = metric.inverse(damping)
    spec = TopKPass(StoreRef.of(store, name), train_where, perturbation, precondition(phi_a, inverse),
                    query_rows[order], member_of[order], k, block_rows or block_rows_for(store, perturbation))
    results = mapper(part_topk, spec, shard_parts(store, parts))
    if sum(n for _, _, n in results) == 0:
        raise InputError(f"--train-where {train_where!r} selects no sample; {known_values(store, checkpoint)}")
    (result, labels), extra, about = merge_topk(spec, results), None, {}
    if grouped:
        about["groups"] = {"by": group_by or "all", "aggregate": aggregate, "of": f"phi_{response} of the members",
                           "groups": len(spec.queries)}
    if layers is not None:
        listed = np.unique(np.concatenate([result["top_ids"].ravel(), result["bottom_ids"].ravel()]))
        listed = listed[listed >= 0]
        w_phi_b = np.asarray(store.read(name, perturbation, listed), np.float64) @ inverse
        extra = pair_shares(layers, np.asarray(phi_a, np.float64), w_phi_b, result, listed)
        about["by_layer"] = layers.describe()
    description = describe(store, name, kind="topk", pair=pair, response=response, perturbation=perturbation,
                           normalization="none", metric=metric_name, damping=damping, query_where=query_where,
                           train_where=train_where, k=k, **about)
    table = topk_table(pair, result, queries, labels, extra)
    return with_description(table, description)
