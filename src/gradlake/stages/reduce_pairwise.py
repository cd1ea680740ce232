"""The reduce's pairwise units on store rows: row bands of dense H_AB tiles, top-k lists per
block of queries, and H of sampled pairs against the distance of their inputs (the paper's
Fig. 5). The numerics: gradlake.reduce.pairwise; the driver: gradlake.distributed.reduce_tasks."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from gradlake.reduce.aggregates import AggregateReducer
from gradlake.reduce.layers import Layers, pair_shares
from gradlake.reduce.output import ReduceOutput
from gradlake.reduce.pairwise import TopK, precondition, tile, whiten
from gradlake.stages.reduce_source import StoreRef, reference_rows
from gradlake.streaming import prefetched
from gradlake.topk_table import topk_table


def tile_work(src: StoreRef, pair: str, inverse: np.ndarray, rows_a: np.ndarray, col_blocks: list,
              out: ReduceOutput, array_path: str, row0: int) -> int:
    """One row band of dense H_AB tiles, written at row ``row0`` of a zarr array; the
    response rows are preconditioned once, each column block costs one matmul."""
    a = precondition(src.read(pair[0], rows_a), inverse)
    array = out.open_array(array_path)
    col0 = 0
    for phi_b in prefetched(lambda rows: src.read(pair[1], rows), col_blocks):
        h = tile(a, phi_b)
        array[row0:row0 + h.shape[0], col0:col0 + h.shape[1]] = h
        col0 += h.shape[1]
    return a.shape[0] * col0


def topk_work(src: StoreRef, pairs: tuple[str, ...], inverse: np.ndarray, query_span: tuple[int, int],
              query_where: str, candidate_spans: list, reference_split: str, k: int, out: ReduceOutput,
              path: str, layers: Layers | None = None) -> int:
    """Top-k / bottom-k of H_AB(query, ·) over the reference samples (candidates), for the
    queries in rows [lo, hi), merged block by block; written as the Parquet file ``path``
    (:mod:`gradlake.topk_table`, with the layer shares of the listed pairs given
    ``layers``). Returns the number of queries."""
    query_labels = src.span_samples(query_span, query_where, ["row", "trajectory", "t", "class"])
    queries = query_labels.column("row").to_numpy().astype(np.int64)
    labels = [query_labels]  # of the queries and of the candidates listed so far

    def read(span):
        table = reference_rows(src, span, reference_split)
        return table, {obs: src.read(obs, table.column("row").to_numpy()) for obs in {p[1] for p in pairs}}

    tops = {pair: TopK(queries, k) for pair in pairs}
    heads = {pair: precondition(src.read(pair[0], queries), inverse) for pair in pairs}
    for table, phis in prefetched(read, candidate_spans):
        rows = table.column("row").to_numpy().astype(np.int64)
        for pair in pairs:
            tops[pair].update(tile(heads[pair], phis[pair[1]]), rows)
        listed = np.concatenate([res[f"{kind}_ids"].ravel() for res in (top.result() for top in tops.values())
                                 for kind in ("top", "bottom")])
        candidates = pa.concat_tables([*labels[1:], table])  # keep the labels of listed ones only
        labels = [labels[0], candidates.filter(pa.array(np.isin(candidates.column("row").to_numpy(), listed)))]
    results = {pair: top.result() for pair, top in tops.items()}
    index = pa.concat_tables(labels)
    _, first = np.unique(index.column("row").to_numpy(), return_index=True)  # queries may be candidates
    labels = index.take(pa.array(first))
    out.write_table(path, pa.concat_tables([
        topk_table(pair, result, query_labels, labels, _shares(src, layers, pair, inverse, queries, result))
        for pair, result in results.items()]))
    return len(queries)


def _shares(src: StoreRef, layers: Layers | None, pair: str, inverse: np.ndarray, queries: np.ndarray,
            result: dict[str, np.ndarray]) -> dict | None:
    """The layer shares of a top-k result's listed pairs (None without ``layers``)."""
    if layers is None:
        return None
    listed = np.unique(np.concatenate([result["top_ids"].ravel(), result["bottom_ids"].ravel()]))
    listed = listed[listed >= 0]
    w_phi_b = np.asarray(src.read(pair[1], listed), np.float64) @ inverse
    return pair_shares(layers, np.asarray(src.read(pair[0], queries), np.float64), w_phi_b, result, listed)


def distance_work(src: StoreRef, reducer: AggregateReducer, damping: float, rows_i: np.ndarray,
                  rows_j: np.ndarray, dataset_url: str, storage_options, n_bins: int):
    """H(i, j) of sampled pairs against the RMS distance of their inputs (the paper's Fig. 5);
    the dataset at ``dataset_url`` must be the store's (its fingerprint is checked).

    Returns (pairs table: pair, normalization, row_i, row_j, distance, h;
    curve table: pair, normalization, bin, lo, hi, pairs, distance, mean, median, q25, q75).
    """
    from gradlake.data import open_checked
    from gradlake.reduce.aggregates import normalized
    from gradlake.reduce.pairwise import distance_curve, input_distance

    ds = open_checked(dataset_url, src.store.spec.dataset["fingerprint"], storage_options or None)
    unique, inverse = np.unique(np.r_[rows_i, rows_j], return_inverse=True)
    inputs, _ = ds.samples(unique)
    distance = input_distance(inputs[inverse[:len(rows_i)]], inputs[inverse[len(rows_i):]])
    w = reducer.whiteners[damping]
    pair_parts, curve_parts = [], []
    for pair in reducer.pairs:
        psi_a = whiten(src.read(pair[0], rows_i), w, np.float64)
        psi_b = whiten(src.read(pair[1], rows_j), w, np.float64)
        mean_b, second_b = reducer.ref[damping, pair[1]]
        for norm in reducer.norms:
            a, b = normalized(psi_a, psi_b, norm, mean_b, second_b)
            h = (a * b).sum(1)
            n = len(h)
            pair_parts.append(pa.table({"pair": [pair] * n, "normalization": [norm] * n, "row_i": rows_i,
                                        "row_j": rows_j, "distance": distance, "h": h}))
            curve = distance_curve(h, distance, n_bins)
            m = len(curve["mean"])
            curve_parts.append(pa.table({"pair": [pair] * m, "normalization": [norm] * m,
                                         "bin": np.arange(m, dtype=np.int32), **curve}))
    return pa.concat_tables(pair_parts), pa.concat_tables(curve_parts)
