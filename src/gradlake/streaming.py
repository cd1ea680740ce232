"""Streaming over row blocks, shared by the reduce and the query: cut rows into blocks, read
blocks ahead in threads, and sum the blocks' results in an order that depends only on how
many there are (so the sum is the same bits however the blocks ran).
"""

from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from gradlake.errors import GradlakeError
from gradlake.reduce.metric import Moments


def row_blocks(rows: np.ndarray, block_rows: int) -> list[np.ndarray]:
    return [rows[i:i + block_rows] for i in range(0, len(rows), block_rows)]


def add_results(a, b):
    """Sum two results of the same shape: dicts, tuples, Moments, Sums or arrays."""
    if isinstance(a, dict):
        return {key: add_results(a[key], b[key]) for key in a}
    if isinstance(a, tuple):
        return tuple(add_results(x, y) for x, y in zip(a, b))
    if isinstance(a, Moments):
        return a.merge(b)
    return a + b


class OrderedSum:
    """A sum of results pushed in block order, over a binary tree whose shape depends only on
    how many were pushed: the same bits whatever ran them, and when, and how many at once.

    ``add(a, b)`` combines two partial sums (:func:`add_results`, or a Ray task returning a
    future of it). Like a binary counter, it holds at most log2(n) + 1 partial sums.
    """

    def __init__(self, add=add_results):
        self._add = add
        self._levels: list[tuple[int, Any]] = []  # (log2 of the blocks summed, partial sum)
        self.count = 0

    def push(self, value) -> None:
        """Add the result of the next block (block ``count``)."""
        level = 0
        while self._levels and self._levels[-1][0] == level:
            value = self._add(self._levels.pop()[1], value)
            level += 1
        self._levels.append((level, value))
        self.count += 1

    def result(self):
        """The sum of everything pushed (the partials folded from the last to the first)."""
        if not self._levels:
            raise GradlakeError("nothing to sum: no block was pushed")
        total = self._levels[-1][1]
        for _, value in reversed(self._levels[:-1]):
            total = self._add(value, total)
        return total


_readers: ThreadPoolExecutor | None = None
_readers_lock = threading.Lock()


def _reader_pool() -> ThreadPoolExecutor:
    """The process's reader threads, shared by every pass and part: made once, so neither
    the threads nor the allocator arenas they fill are made anew per part."""
    global _readers
    with _readers_lock:
        if _readers is None:
            _readers = ThreadPoolExecutor(4 * (os.cpu_count() or 1), thread_name_prefix="gradlake-read")
        return _readers


def prefetched(read, blocks: list, depth: int = 1):
    """``read(block)`` for each block in order, reading up to ``depth`` blocks ahead in
    threads while the caller computes on the current one (matmuls release the GIL; on
    object stores several reads in flight multiply the bandwidth)."""
    pool = _reader_pool()
    ahead = deque(pool.submit(read, block) for block in blocks[:depth])
    for i in range(len(blocks)):
        data = ahead.popleft().result()
        if i + depth < len(blocks):
            ahead.append(pool.submit(read, blocks[i + depth]))
        yield data
