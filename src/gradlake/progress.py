"""Progress of long loops: a bar on a terminal, throttled JSON lines otherwise.

Every long loop in gradlake reports through :func:`progress`, so `--quiet` and log
collection behave the same everywhere. JSON lines come at most once per
``GRADLAKE_PROGRESS_SECONDS`` (default 5; 0 = every update), plus the first and the last,
so a loop of many small steps does not flood Ray's logs.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from tqdm.auto import tqdm

_QUIET = os.environ.get("GRADLAKE_QUIET", "") not in ("", "0")
DEFAULT_INTERVAL_S = 5.0


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("GRADLAKE_PROGRESS_SECONDS", DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


def set_quiet(quiet: bool) -> None:
    """Quiet mode: no bars, throttled JSON lines on stderr."""
    global _QUIET
    _QUIET = quiet
    os.environ["GRADLAKE_QUIET"] = "1" if quiet else "0"  # reaches Ray workers started later


def is_quiet() -> bool:
    return _QUIET or not sys.stderr.isatty()


class JsonProgress:
    """A tqdm-like object that prints JSON lines (for logs and CI): the first update, then at
    most one line per ``interval_s`` seconds, and the last state (when done or closed)."""

    def __init__(self, total: int | None, desc: str, unit: str, interval_s: float | None = None):
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self.interval_s = _interval() if interval_s is None else interval_s
        self.start = time.monotonic()
        self.postfix: dict[str, Any] = {}
        self._last_emit: float | None = None
        self._pending = False  # updates since the last line

    def update(self, n: int = 1) -> None:
        self.n += n
        self._pending = True
        now = time.monotonic()
        done = self.total is not None and self.n >= self.total
        if done or self._last_emit is None or now - self._last_emit >= self.interval_s:
            self._emit()

    def set_postfix(self, **values: Any) -> None:
        self.postfix.update(values)

    def write(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def _emit(self) -> None:
        now = time.monotonic()
        record = {"stage": self.desc, "done": self.n, "total": self.total, "unit": self.unit,
                  "elapsed_s": round(now - self.start, 2), **self.postfix}
        print(json.dumps(record, default=str), file=sys.stderr, flush=True)
        self._last_emit, self._pending = now, False

    def close(self) -> None:
        if self._pending:
            self._emit()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int | None, desc: str, unit: str = "it"):
    """A progress reporter with tqdm's update/set_postfix/write/close interface."""
    if is_quiet():
        return JsonProgress(total, desc, unit)
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
