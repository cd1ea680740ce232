"""The reduce's metric and aggregate passes on store rows: reference-set moments per row block,
the perturbation and response passes per block of whole trajectories (the response pass writes
its lag curves and self-influence as Parquet parts), the variants' finalized arrays and a
checkpoint's lag statistics. Each returns small, additive results (gradlake.reduce.aggregates
holds the numerics); the driver is gradlake.distributed.reduce_tasks."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from gradlake.reduce.aggregates import (RELATIONS, AggregateReducer, Sums, TrajectoryBlock, complete,
                                        finalize, lag_statistics, lag_values)
from gradlake.reduce.metric import Moments
from gradlake.reduce.output import ReduceOutput
from gradlake.stages.reduce_source import StoreRef, matches, reference_rows

BLOCK_COLUMNS = ("row", "trajectory", "t", "class", "split", "class_index", "response", "perturbation")


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
