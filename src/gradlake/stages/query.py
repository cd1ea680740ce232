"""The query's passes in the stage shape (no Ray): the candidates cut into parts of whole
shards, each part a unit.

A top-k query (gradlake.query.topk) makes two passes over the store: the metric's moments over
its reference selection (:class:`MomentsPass`) and the top-k lists over its candidates
(:class:`TopKPass`); the approximate index's metric (gradlake.approximate_index) is the first.
Each pass is a frozen spec (what every part reads: the store, by StoreRef, and the pass's
settings), its units the parts (:func:`shard_parts`), its unit of work a function of (spec,
part) that reads its part in bounded memory and returns a small result (:func:`part_moments`,
:func:`part_topk`), and its finish merges those in part order (:func:`sum_moments`,
:func:`merge_topk`), so the answer does not depend on who ran the parts.

The query itself is no stage: it is asked interactively (the CLI, a notebook) and answers its
caller with a table; it writes no output of its own, so it has no completion records and
nothing to resume, and its second pass needs the first's metric. gradlake.query drives its
passes through a mapper: the executor in this process, or on Ray tasks
(gradlake.distributed.query_tasks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from gradlake.reduce.metric import Moments
from gradlake.reduce.pairwise import TopK, tile
from gradlake.stages.reduce_source import StoreRef
from gradlake.streaming import OrderedSum, prefetched, row_blocks

READ_AHEAD = 1  # blocks read ahead of the one being scored (more in flight scatter a disk's reads)
PART_ROWS = 2**18  # rows of one part of a pass by default (its candidates' labels stay in memory)
LABELS = ["row", "trajectory", "t", "class"]


def shard_parts(store, parts: int | None = None) -> list[tuple[int, int]]:
    """The units of a pass: [first, stop) shard ranges cutting the store into at most ``parts``
    contiguous parts (None: parts of about PART_ROWS rows, so memory does not grow with the
    store, and at least one per core)."""
    parts = parts or max(-(-store.n_rows // PART_ROWS), os.cpu_count() or 1)
    bounds = np.linspace(0, store.spec.n_shards, max(1, min(parts, store.spec.n_shards)) + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


@dataclass(frozen=True)
class MomentsPass:
    """The metric's pass: moments of the ``observable`` φ's of the rows of ``where``."""

    src: StoreRef
    observable: str
    where: str
    block_rows: int


def part_moments(spec: MomentsPass, shards: tuple[int, int]) -> Moments:
    """Moments of the pass's φ's in ``shards``."""
    store, checkpoint = spec.src.store, spec.src.checkpoint
    moments = Moments(store.k)
    rows = store.rows(checkpoint, spec.where.strip() or None, shards=shards)
    for _, phi in store.iter_blocks(checkpoint, spec.observable, rows, spec.block_rows):
        moments.add(phi)
    return moments


def sum_moments(records: list[Moments]) -> Moments:
    """The parts' moments summed in part order."""
    total = OrderedSum()
    for moments in records:
        total.push(moments)
    return total.result()


@dataclass(frozen=True)
class TopKPass:
    """The top-k pass: the preconditioned queries and the candidates' filter."""

    src: StoreRef
    candidates: str  # filter of the candidate samples
    observable: str  # perturbation observable B
    queries: np.ndarray  # φ_A (η̃ + λI)⁻¹ of the queries (samples or groups), float32 [Q, k]
    members: np.ndarray  # sorted rows never listed for ...
    member_of: np.ndarray  # ... the query at this index (the query itself, a group's members)
    k: int
    block_rows: int


def part_topk(spec: TopKPass, shards: tuple[int, int]) -> tuple[dict[str, np.ndarray], pa.Table, int]:
    """Top-k lists of every query over the candidates in ``shards``, the labels (row,
    trajectory, t, class) of the candidates in them, and how many candidates there were.

    Reads up to READ_AHEAD blocks of candidate rows in threads while one is scored."""
    store, checkpoint = spec.src.store, spec.src.checkpoint
    best = TopK(np.arange(len(spec.queries)), spec.k, exclude_self=False)
    candidates = store.samples(checkpoint, spec.candidates.strip() or None, shards=shards, columns=LABELS)
    rows = candidates.column("row").to_numpy().astype(np.int64)
    store.load_indices(checkpoint, spec.observable, rows)
    blocks = row_blocks(rows, spec.block_rows)
    read = lambda block: store.read(checkpoint, spec.observable, block, dtype=store.spec.dtype)  # noqa: E731
    for block, phi in zip(blocks, prefetched(read, blocks, READ_AHEAD)):
        best.update(_without_members(tile(spec.queries, phi), block, spec), block)
    result = best.result()
    listed = np.unique(np.concatenate([result["top_ids"].ravel(), result["bottom_ids"].ravel()]))
    return result, candidates.take(pa.array(np.searchsorted(rows, listed[listed >= 0]))), len(rows)


def _without_members(h: np.ndarray, rows: np.ndarray, spec: TopKPass) -> np.ndarray:
    """``h`` (a fresh tile) with NaN where candidate ``rows[j]`` is a member of query i."""
    if len(spec.members):
        at = np.clip(np.searchsorted(spec.members, rows), 0, len(spec.members) - 1)
        hit = np.flatnonzero(spec.members[at] == rows)
        h[spec.member_of[at[hit]], hit] = np.nan
    return h


def merge_topk(spec: TopKPass, records: list) -> tuple[dict[str, np.ndarray], pa.Table]:
    """The parts' lists merged in part order, and the listed candidates' labels (by row)."""
    best = TopK(np.arange(len(spec.queries)), spec.k, exclude_self=False)
    for result, _, _ in records:
        best.merge(result)
    return best.result(), pa.concat_tables([t for _, t, _ in records]).sort_by("row")
