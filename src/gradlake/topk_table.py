"""The one top-k table: what ``gradlake topk``, the approximate index and the reduce's
``topk.parquet`` write.

One row per listed candidate of each (pair, kind, query), in that order, ranks ascending:

    pair                 "AB": response A on the query, perturbation B on the candidate
    kind                 "top" (most influential, H descending) or "bottom" (least, ascending)
    query_row            the query sample's row (null for a query group)
    query_trajectory     the query's trajectory, t and class (for a group: the value all its
    query_t, query_class members share, else null)
    rank                 1, 2, ... within the list
    row, trajectory, t, class   the candidate's
    influence            H_AB(query, candidate), float64

A list with fewer than k candidates has fewer rows (no placeholders). Optional columns:

    group, group_size    query groups: the group's label ("trajectory=3", "all") and how
                         many members its φ was aggregated from (query_row is then null)
    share:<g>            by layer: the share of ``influence`` carried by layer group g
    block_shares         by layer: list of the shares of every parameter block (names in
                         the table's metadata); shares sum to ``influence``
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

KINDS = ("top", "bottom")
QUERY_COLUMNS = ("row", "trajectory", "t", "class")  # of ``queries`` and ``labels``


def _int64(column) -> pa.Array:
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return column.cast(pa.int64())


def topk_table(pair: str, result: dict[str, np.ndarray], queries: pa.Table, labels: pa.Table,
               extra: dict[str, dict[str, np.ndarray]] | None = None) -> pa.Table:
    """The top-k table of one pair from :meth:`gradlake.reduce.pairwise.TopK.result`.

    ``queries``: one row per query in the result's order, columns row (null for a group),
    trajectory, t, class, and optionally group and group_size; ``labels``: the listed
    candidates' row, trajectory, t and class, sorted by row. ``extra``: more columns per
    listed entry, {name: {kind: array [queries, k] or [queries, k, n]}} (n: a list column).
    """
    label_rows = labels.column("row").to_numpy()
    group = [c for c in ("group", "group_size") if c in queries.column_names]
    parts = []
    for kind in KINDS:
        ids, values = result[f"{kind}_ids"], result[kind]
        qi, rank = np.nonzero(ids >= 0)
        rows = ids[qi, rank]
        at, take = np.searchsorted(label_rows, rows), pa.array(qi, pa.int64())
        columns: dict[str, Any] = {
            "pair": pa.array([pair] * len(qi), pa.string()), "kind": pa.array([kind] * len(qi), pa.string()),
            "query_row": _int64(queries.column("row").take(take)),
            "query_trajectory": _int64(queries.column("trajectory").take(take)),
            "query_t": _int64(queries.column("t").take(take)),
            "query_class": queries.column("class").take(take).cast(pa.string()),
            **{name: queries.column(name).take(take) for name in group},
            "rank": pa.array(rank + 1, pa.int64()), "row": pa.array(rows, pa.int64()),
            "trajectory": _int64(labels.column("trajectory").take(pa.array(at))),
            "t": _int64(labels.column("t").take(pa.array(at))),
            "class": labels.column("class").take(pa.array(at)).cast(pa.string()),
            "influence": pa.array(values[qi, rank], pa.float64())}
        for name, by_kind in (extra or {}).items():
            value = np.asarray(by_kind[kind], dtype=np.float64)[qi, rank]
            columns[name] = pa.array(value) if value.ndim == 1 else pa.FixedSizeListArray.from_arrays(
                pa.array(value.ravel()), value.shape[1])
        parts.append(pa.table(columns))
    return pa.concat_tables(parts)
