"""The one top-k table (gradlake.topk_table): columns, rank base, short lists, extra columns."""

import numpy as np
import pyarrow as pa

from gradlake.reduce.pairwise import TopK
from gradlake.topk_table import topk_table

COLUMNS = ["pair", "kind", "query_row", "query_trajectory", "query_t", "query_class", "rank", "row", "trajectory",
           "t", "class", "influence"]


def test_columns_ranks_and_short_lists():
    best = TopK(np.array([0, 1]), k=3)
    best.update(np.array([[np.nan, 2.0], [5.0, np.nan]]), np.array([0, 7]))  # each query has one candidate
    queries = pa.table({"row": [0, 1], "trajectory": pa.array([0, 0], pa.int32()), "t": pa.array([0, 1], pa.int32()),
                        "class": ["a", "a"]})
    labels = pa.table({"row": [0, 7], "trajectory": [0, 3], "t": [0, 2], "class": ["a", "b"]})
    table = topk_table("CC", best.result(), queries, labels,
                       {"share:x": {kind: np.full((2, 3), 0.5) for kind in ("top", "bottom")}})
    assert table.column_names == [*COLUMNS, "share:x"]
    assert table.schema.field("rank").type == pa.int64() and table.schema.field("query_t").type == pa.int64()
    rows = table.to_pylist()
    assert len(rows) == 4  # one candidate per list: no -1 placeholder rows
    assert [(r["kind"], r["query_row"], r["rank"], r["row"], r["influence"]) for r in rows] == [
        ("top", 0, 1, 7, 2.0), ("top", 1, 1, 0, 5.0), ("bottom", 0, 1, 7, 2.0), ("bottom", 1, 1, 0, 5.0)]
    assert rows[0]["class"] == "b" and rows[0]["t"] == 2 and rows[1]["query_t"] == 1 and rows[0]["share:x"] == 0.5
