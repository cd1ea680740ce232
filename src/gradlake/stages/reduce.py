"""The units of work of the reduce stage: store rows in, small results or written parts out.

Each function reads what it needs from the gradient store, calls the pure numerics
(gradlake.reduce: metric, aggregates, pairwise) and returns small, additive results; the Ray
tasks of gradlake.distributed.reduce_tasks only call these. Nothing here imports Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from gradlake.errors import GradlakeError
from gradlake.reduce.aggregates import (RELATIONS, AggregateReducer, Sums, TrajectoryBlock, complete,
                                        finalize, lag_statistics, lag_values)
from gradlake.reduce.layers import Layers, pair_shares
from gradlake.reduce.metric import Moments
from gradlake.reduce.output import ReduceOutput
from gradlake.reduce.pairwise import TopK, precondition, tile, whiten
from gradlake.topk_table import topk_table
from gradlake.streaming import prefetched

BLOCK_COLUMNS = ("row", "trajectory", "t", "class", "split", "class_index", "response", "perturbation")


@dataclass
class StoreRef:
    """Where a task reads from: store URL, options, checkpoint. The store is opened on
    first use in each task (never shared across tasks, so never stale)."""

    url: str
    storage_options: dict[str, Any]
    checkpoint: str
    _store: Any = field(default=None, repr=False, compare=False)

    def __getstate__(self):
        return {**self.__dict__, "_store": None}

    @property
    def store(self):
        if self._store is None:
            from gradlake.store import GradientStore

            self._store = GradientStore.open(self.url, self.storage_options or None)
        return self._store

    def read(self, observable: str, rows: np.ndarray) -> np.ndarray:
        return self.store.read(self.checkpoint, observable, rows)

    def samples(self, shards: tuple[int, int], where: str = "", columns=None) -> pa.Table:
        """Committed samples of shards [first, stop) matching ``where`` (filter language,
        pushed into the scan of only those shards' files)."""
        return self.store.samples(self.checkpoint, where or None, shards=shards, columns=columns)

    def span_samples(self, span: tuple[int, int], where: str = "", columns=None) -> pa.Table:
        """Committed samples of rows [lo, hi) matching ``where``."""
        lo, hi = span
        shard_rows = self.store.spec.shard_rows
        rows = f"row >= {lo} and row < {hi}"
        return self.samples((lo // shard_rows, (hi - 1) // shard_rows + 1),
                            f"({where}) and {rows}" if where.strip() else rows, columns)


# --------------------------------------------------------------------------- planning
def matches(table: pa.Table, where: str) -> np.ndarray:
    """Boolean mask of the rows of a samples ``table`` selected by ``where`` ("" = all)."""
    if not where.strip():
        return np.ones(table.num_rows, dtype=bool)
    from gradlake.store.filters import parse_where

    rows = table.column("row").to_numpy()
    return np.isin(rows, table.filter(parse_where(where, table.schema)).column("row").to_numpy())


@dataclass
class PartIndex:
    """What the planner needs of one part (a shard range) of the samples table: selected
    rows per selection, sorted (transient: the driver folds it into a :class:`BlockPlan`)."""

    shards: tuple[int, int]
    samples: int
    classes: tuple[str, ...]
    max_t: int
    reference: np.ndarray
    response: int  # counts of the aggregate selections
    perturbation: int
    kept: np.ndarray  # rows in the response or perturbation selection ...
    kept_trajectory: np.ndarray  # ... and their trajectories
    queries: np.ndarray  # top-k query rows
    tile_rows: np.ndarray  # at most tile_max rows of each tile selection
    tile_cols: np.ndarray


def part_index(src: StoreRef, shards: tuple[int, int], settings) -> PartIndex:
    """Scan one part's sample rows (filters applied in memory on the part) for the planner."""
    table = src.samples(shards)
    rows = table.column("row").to_numpy().astype(np.int64)
    response, perturbation = matches(table, settings.response), matches(table, settings.perturbation)
    keep = response | perturbation

    def selected(where: str, limit=None) -> np.ndarray:
        return rows[matches(table, where)][:limit]

    return PartIndex(
        shards=shards, samples=len(rows),
        classes=tuple(np.unique(table.column("class").to_numpy(zero_copy_only=False)).tolist()),
        max_t=int(table.column("t").to_numpy().max()) if len(rows) else -1,
        reference=rows[matches(table, f"split == '{settings.reference_split}'")],
        response=int(response.sum()), perturbation=int(perturbation.sum()), kept=rows[keep],
        kept_trajectory=table.column("trajectory").to_numpy()[keep],
        queries=selected(settings.topk_queries) if settings.topk else rows[:0],
        tile_rows=selected(settings.tile_rows, settings.tile_max),
        tile_cols=selected(settings.tile_cols, settings.tile_max))


class BlockPlan:
    """The reduce's blocks, planned from the parts of the samples table fed in row order,
    holding O(blocks) numbers (never a row per sample):

    - ``reference_blocks``: row spans [lo, hi) of ``block_rows`` reference rows each (the
      metric pass and the top-k candidates), as :func:`row_blocks` cuts the reference rows;
    - ``trajectory_blocks``: row spans of the aggregate passes' blocks of whole trajectories,
      about ``block_rows`` selected rows each, cut only where a trajectory starts: a block
      ends at the first trajectory start at least ``block_rows`` selected rows after its own;
    - ``query_blocks``: row spans of ``query_rows`` top-k queries each;
    - the first ``tile_max`` rows of each tile selection, the counts, classes and n_times.
    """

    def __init__(self, block_rows: int, query_rows: int, tile_max: int):
        self.block_rows, self.query_rows, self.tile_max = block_rows, query_rows, tile_max
        self.samples = self.response = self.perturbation = self.queries = 0
        self.parts: list[dict] = []  # per part: shards, response and perturbation counts
        self.classes: set[str] = set()
        self.n_times = 0
        self._reference = _RankCuts(block_rows)
        self._query = _RankCuts(query_rows)
        self._cuts: list[int] = []  # first row of each trajectory block
        self._kept = 0  # selected rows so far
        self._begin = 0  # position (among them) of the block being filled
        self._last_trajectory = None
        self.tile_rows, self.tile_cols = np.zeros(0, np.int64), np.zeros(0, np.int64)

    def add(self, part: PartIndex) -> None:
        """Fold in the next part (parts in row order)."""
        self.samples += part.samples
        self.response += part.response
        self.perturbation += part.perturbation
        self.parts.append({"shards": part.shards, "response": part.response, "perturbation": part.perturbation})
        self.classes.update(part.classes)
        self.n_times = max(self.n_times, part.max_t + 1)
        self._reference.add(part.reference)
        self._query.add(part.queries)
        self.queries += len(part.queries)
        self.tile_rows = np.r_[self.tile_rows, part.tile_rows][: self.tile_max]
        self.tile_cols = np.r_[self.tile_cols, part.tile_cols][: self.tile_max]
        trajectory = np.asarray(part.kept_trajectory)
        if not len(trajectory):
            return
        new = np.r_[trajectory[0] != self._last_trajectory, trajectory[1:] != trajectory[:-1]]
        for position in np.flatnonzero(new):
            start = self._kept + int(position)
            if not self._cuts:
                self._cuts.append(int(part.kept[position]))
            elif start - self._begin >= self.block_rows:
                self._cuts.append(int(part.kept[position]))
                self._begin = start
        self._kept += len(trajectory)
        self._last_trajectory = trajectory[-1]

    @property
    def reference(self) -> int:
        return self._reference.count

    def reference_blocks(self, n_rows: int) -> list[tuple[int, int]]:
        return self._reference.spans(n_rows)

    def query_blocks(self, n_rows: int) -> list[tuple[int, int]]:
        return self._query.spans(n_rows)

    def trajectory_blocks(self, n_rows: int) -> list[tuple[int, int]]:
        return _spans(self._cuts, n_rows)


class _RankCuts:
    """Row spans holding ``size`` selected rows each, from the selected rows fed in order."""

    def __init__(self, size: int):
        self.size, self.count, self.starts = size, 0, []

    def add(self, rows: np.ndarray) -> None:
        first = (-self.count) % self.size  # position of the next block's first row in ``rows``
        self.starts.extend(int(r) for r in rows[first::self.size])
        self.count += len(rows)

    def spans(self, n_rows: int) -> list[tuple[int, int]]:
        return _spans(self.starts, n_rows)


def _spans(starts: list[int], n_rows: int) -> list[tuple[int, int]]:
    return [(lo, hi) for lo, hi in zip(starts, [*starts[1:], n_rows])]


def rows_at(src: StoreRef, shards: tuple[int, int], where: str, ranks: np.ndarray) -> np.ndarray:
    """The rows at positions ``ranks`` among the rows of ``where`` in ``shards``."""
    rows = src.samples(shards)
    return rows.column("row").to_numpy()[matches(rows, where)][np.asarray(ranks, dtype=np.int64)]


# --------------------------------------------------------------------------- passes
def reference_rows(src: StoreRef, span: tuple[int, int], reference_split: str) -> pa.Table:
    """Row, trajectory, t and class of the reference samples in rows [lo, hi)."""
    return src.span_samples(span, f"split == '{reference_split}'", ["row", "trajectory", "t", "class"])


def moments_work(src: StoreRef, span: tuple[int, int], reference_split: str,
                 observables: tuple[str, ...]) -> dict[str, Moments]:
    """Reference-set moments of each observable over the reference rows in ``span``."""
    rows = reference_rows(src, span, reference_split).column("row").to_numpy().astype(np.int64)
    out = {}
    for obs in observables:
        phi = src.read(obs, rows)
        out[obs] = Moments(phi.shape[-1]).add(phi)
    return out


def block_table(src: StoreRef, span: tuple[int, int], settings, classes: tuple[str, ...]) -> pa.Table:
    """The samples of an aggregate block (rows [lo, hi) in the response or perturbation
    selection) with their class index and selection flags (columns BLOCK_COLUMNS)."""
    import pyarrow.compute as pc

    table = src.span_samples(span)
    response, perturbation = matches(table, settings.response), matches(table, settings.perturbation)
    class_index = pc.index_in(table.column("class"), value_set=pa.array(classes)).to_numpy()
    return table.select(["row", "trajectory", "t", "class", "split"]) \
                .append_column("class_index", pa.array(class_index)) \
                .append_column("response", pa.array(response)) \
                .append_column("perturbation", pa.array(perturbation)).filter(pa.array(response | perturbation))


def _block(table: pa.Table, n_times: int) -> TrajectoryBlock:
    col = {name: table.column(name).to_numpy(zero_copy_only=False) for name in
           ("row", "trajectory", "t", "class_index", "response", "perturbation")}
    return TrajectoryBlock.build(col["row"], col["trajectory"], col["t"], col["class_index"],
                                 col["response"], col["perturbation"], n_times)


def _phis(src: StoreRef, block: TrajectoryBlock, observables) -> dict[str, np.ndarray]:
    return {obs: src.read(obs, block.rows) for obs in observables}


def perturbation_work(src: StoreRef, span: tuple[int, int], settings, classes: tuple[str, ...], n_times: int,
                      reducer: AggregateReducer) -> dict:
    """Aggregate pass 1 on one block (rows [lo, hi)): perturbation group sums per variant."""
    block = _block(block_table(src, span, settings, classes), n_times)
    return reducer.perturbation(block, _phis(src, block, reducer.observables))


def response_work(src: StoreRef, span: tuple[int, int], settings, class_names: tuple[str, ...], n_times: int,
                  reducer: AggregateReducer, perturbation: dict, out: ReduceOutput, part: str) -> dict[Any, Sums]:
    """Aggregate pass 2 on one block (rows [lo, hi)): returns its Sums per variant; writes the
    block's per-trajectory lag curves and per-sample self-influence as Parquet parts ``part``."""
    table = block_table(src, span, settings, class_names)
    block = _block(table, n_times)
    results, diagonal = reducer.response(block, _phis(src, block, reducer.observables), perturbation)
    L = 2 * n_times - 1
    lag_axis = np.arange(L) - (n_times - 1)
    lag_parts = []
    for (lam, pair, norm), (_, lag_s, lag_n, share_s) in results.items():
        values = lag_values(lag_s, lag_n)  # [n, 3, L]
        shape = values.shape
        shares = {f"share:{g}": lag_values(share, lag_n).ravel()
                  for g, share in zip(reducer.layers.groups, share_s)} if reducer.layers else {}
        lag_parts.append(pa.table({
            "lambda": np.full(values.size, lam), "pair": _labels([pair], np.zeros(values.size, np.int32)),
            "normalization": _labels([norm], np.zeros(values.size, np.int32)),
            "relation": _labels(RELATIONS, np.broadcast_to(np.arange(3, dtype=np.int32)[None, :, None], shape).ravel()),
            "trajectory": np.broadcast_to(block.trajectories[:, None, None], shape).ravel(),
            "class": _labels(class_names, np.broadcast_to(block.classes[:, None, None].astype(np.int32), shape).ravel()),
            "lag": np.broadcast_to(lag_axis[None, None, :], shape).ravel().astype(np.int32),
            "value": values.ravel(), **shares, "pairs": lag_n.ravel(),
        }))
    out.write_table(f"lags.parquet/checkpoint={src.checkpoint}/{part}.parquet", pa.concat_tables(lag_parts))
    slot_rows = table.take(np.argsort(block.slots, kind="stable"))  # reading order -> slot order
    slots = np.sort(block.slots)
    self_parts = []
    for (lam, pair), (h_self, sigma) in diagonal.items():
        m = len(slots)
        self_parts.append(pa.table({
            "row": slot_rows.column("row"), "trajectory": slot_rows.column("trajectory"),
            "t": slot_rows.column("t"), "class": slot_rows.column("class"),
            "split": slot_rows.column("split"), "lambda": np.full(m, lam), "pair": np.full(m, pair),
            "h_self": h_self.ravel()[slots], "row_std": sigma.ravel()[slots],
        }))
    out.write_table(f"self_influence.parquet/checkpoint={src.checkpoint}/{part}.parquet",
                    pa.concat_tables(self_parts))
    return {key: value[0] for key, value in results.items()}


def _labels(names, codes: np.ndarray) -> pa.DictionaryArray:
    """A dictionary-encoded string column (small on disk and in memory when read back)."""
    return pa.DictionaryArray.from_arrays(pa.array(codes, pa.int32()), pa.array(list(names), pa.string()))


def finalize_variants(reducer: AggregateReducer, response: dict, perturbation: dict) -> dict[str, np.ndarray]:
    """Stack every variant's finalized aggregates into arrays with leading axes
    [lambda, pair, normalization] (pair counts: [pair])."""
    lams, pairs, norms = list(reducer.whiteners), reducer.pairs, reducer.norms
    done = {key: finalize(complete([response[key]], perturbation[key])) for key in reducer.variants}
    out = {}
    for name in ("twotime", "class_twotime", "transfer"):
        out[name] = np.stack([np.stack([np.stack([done[lam, p, n][name] for n in norms]) for p in pairs])
                              for lam in lams])
        out[name + "_pairs"] = np.stack([done[lams[0], p, norms[0]][name + "_pairs"] for p in pairs])
    return out


def lag_tables(out: ReduceOutput, checkpoint: str, reducer: AggregateReducer,
               class_names: tuple[str, ...]) -> pa.Table:
    """Median and quartiles over trajectories of one checkpoint's per-trajectory lag curves
    (all trajectories, then per response class), plus the pair-weighted pooled mean (and,
    by layer, each layer group's pooled share ``pooled_share:<g>``, summing to it)."""
    import pyarrow.compute as pc

    rows = []
    share_names = [f"share:{g}" for g in reducer.layers.groups] if reducer.layers else []
    for lam, pair, norm in reducer.variants:
        expr = (pc.field("lambda") == lam) & (pc.field("pair") == pair) & (pc.field("normalization") == norm)
        t = out.read_tables(f"lags.parquet/checkpoint={checkpoint}", filters=expr, partitioned=False,
                            columns=["trajectory", "relation", "class", "lag", "value", *share_names, "pairs"])
        rank = pc.index_in(pc.cast(t.column("relation"), pa.string()), value_set=pa.array(RELATIONS))
        t = t.append_column("relation_rank", rank)
        t = t.sort_by([("trajectory", "ascending"), ("relation_rank", "ascending"), ("lag", "ascending")])
        lags = t.column("lag").to_numpy()
        L = len(np.unique(lags))
        values = t.column("value").to_numpy().reshape(-1, len(RELATIONS), L)
        shares = {n: t.column(n).to_numpy().reshape(values.shape) for n in share_names}
        counts = t.column("pairs").to_numpy().reshape(-1, len(RELATIONS), L)
        per_trajectory = np.arange(0, t.num_rows, len(RELATIONS) * L)
        classes = pc.cast(t.column("class").take(per_trajectory), pa.string()).to_numpy(zero_copy_only=False)
        lag_axis = lags[:L]
        for group in ("all", *class_names):
            sel = np.ones(len(classes), bool) if group == "all" else classes == group
            if not sel.any():
                continue
            stats = lag_statistics(values[sel])
            weights = counts[sel]
            pooled = _pooled(values[sel], weights)
            pooled_shares = {"pooled_" + n: _pooled(v[sel], weights) for n, v in shares.items()}
            for r, rel in enumerate(RELATIONS):
                rows.append(pa.table({
                    "lambda": np.full(L, lam), "pair": [pair] * L,
                    "normalization": [norm] * L, "relation": [rel] * L, "class": [group] * L,
                    "lag": lag_axis.astype(np.int32), "median": stats["median"][r], "q25": stats["q25"][r],
                    "q75": stats["q75"][r], "trajectories": stats["n"][r].astype(np.int64),
                    "pooled_mean": pooled[r], **{n: v[r] for n, v in pooled_shares.items()},
                    "pairs": weights.sum(0)[r],
                }))
    return pa.concat_tables(rows)


def _pooled(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Pair-weighted mean over trajectories (axis 0) of per-trajectory means."""
    pooled_sum = np.nansum(np.where(weights > 0, values * weights, 0), 0)
    return np.divide(pooled_sum, weights.sum(0), out=np.full(pooled_sum.shape, np.nan), where=weights.sum(0) > 0)


# --------------------------------------------------------------------------- pairwise
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


def check_complete(store, checkpoint: str) -> None:
    store.check_complete(checkpoint)
    for observable, shards in store.missing_data(checkpoint).items():
        start, stop = store.spec.shard_range(shards[0])
        raise GradlakeError(f"store {store.url}, checkpoint {checkpoint}, array grads.zarr/{checkpoint}/"
                            f"{observable}: the data of committed shard {shards[0]} (rows {start}..{stop - 1}) "
                            f"is missing from storage ({len(shards)} shard(s)); the store is damaged")


# --------------------------------------------------------------------------- influence vs distance
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
