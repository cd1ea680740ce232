"""Timing helpers shared by the benchmarks."""

from __future__ import annotations

import time


def timed(call) -> float:
    """Wall-clock seconds of ``call()``."""
    start = time.perf_counter()
    call()
    return time.perf_counter() - start
