"""Progress of long loops: a bar on a terminal, one JSON line per update otherwise.

Every long loop in gradlake reports through :func:`progress`, so `--quiet` and log
collection behave the same everywhere.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from tqdm.auto import tqdm

_QUIET = os.environ.get("GRADLAKE_QUIET", "") not in ("", "0")


def set_quiet(quiet: bool) -> None:
    """Quiet mode: no bars, one JSON line per update on stderr."""
    global _QUIET
    _QUIET = quiet
    os.environ["GRADLAKE_QUIET"] = "1" if quiet else "0"  # reaches Ray workers started later


def is_quiet() -> bool:
    return _QUIET or not sys.stderr.isatty()


class JsonProgress:
    """A tqdm-like object that prints a JSON line per update (for logs and CI)."""

    def __init__(self, total: int | None, desc: str, unit: str):
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self.start = time.monotonic()
        self.postfix: dict[str, Any] = {}

    def update(self, n: int = 1) -> None:
        self.n += n
        self._emit()

    def set_postfix(self, **values: Any) -> None:
        self.postfix.update(values)

    def write(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def _emit(self, **extra: Any) -> None:
        elapsed = time.monotonic() - self.start
        record = {"stage": self.desc, "done": self.n, "total": self.total, "unit": self.unit,
                  "elapsed_s": round(elapsed, 2), **self.postfix, **extra}
        print(json.dumps(record, default=str), file=sys.stderr, flush=True)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int | None, desc: str, unit: str = "it"):
    """A progress reporter with tqdm's update/set_postfix/write/close interface."""
    if is_quiet():
        return JsonProgress(total, desc, unit)
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
