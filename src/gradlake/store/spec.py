"""What all checkpoints in one store share, and the array geometry that follows from it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradlake.errors import InputError

DTYPES = ("float16", "float32")
CHUNK_BYTES = 1024 * 1024  # target size of one chunk (whole rows) inside a zarr shard
SHARD_BYTES = 128 * 1024 * 1024  # most bytes of one zarr shard of the widest array (auto shard_rows)
MIN_SHARDS = 32  # auto shard_rows keeps at least this many shards (parallel work on small data)
_UNCHECKED = ("dataset.url",)  # a dataset may move; its fingerprint may not change


@dataclass(frozen=True)
class StoreSpec:
    """The settings a store is bound to; a store refuses a run with a different one.

    ``n_rows`` is the dataset's sample count: array row i is dataset sample row i. Rows of
    splits the store does not hold stay unwritten (NaN). Shard s holds rows
    [s * shard_rows, (s + 1) * shard_rows) and is exactly one zarr shard of every array.
    """

    dataset: dict[str, Any]  # url, fingerprint, family, channels, n_trajectories, n_times
    model: dict[str, Any]  # the model config (JSON)
    projector: dict[str, Any]  # Projector.spec(model)
    observables: tuple[str, ...]
    probes: int
    probe_seed: int
    k: int
    dtype: str
    n_rows: int
    shard_rows: int
    chunk_rows: int
    splits: tuple[str, ...]
    n_samples: int  # rows the store holds (those of its splits)
    n_shards: int  # shards holding at least one of them
    task: dict[str, Any] = field(default_factory=dict)  # {"path", "kwargs"}; empty: the paper's task

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise InputError(f"dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.shard_rows % self.chunk_rows:
            raise InputError(
                f"chunk_rows: expected a divisor of shard_rows {self.shard_rows}, got {self.chunk_rows}"
            )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {
            "observables": list(self.observables), "splits": list(self.splits)
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> StoreSpec:
        value = dict(value)
        value["observables"] = tuple(value["observables"])
        value["splits"] = tuple(value["splits"])
        return cls(**value)

    def mismatch(self, other: StoreSpec) -> str | None:
        """The first setting where ``other`` differs, as 'key: store has X, this run has Y'.

        Settings are compared in declaration order, so a cause (the projector) is named
        before what follows from it (k).
        """
        mine, theirs = json_normal(self.to_json()), json_normal(other.to_json())
        for f in dataclasses.fields(self):
            found = _first_difference(mine[f.name], theirs[f.name], f.name)
            if found:
                return found
        return None

    # Geometry of the arrays.
    def row_shape(self, observable: str) -> tuple[int, ...]:
        return (self.probes, self.k) if observable == "V" else (self.k,)

    def dimension_names(self, observable: str) -> tuple[str, ...]:
        return ("sample", "probe", "proj") if observable == "V" else ("sample", "proj")

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_rows
        return start, min(start + self.shard_rows, self.n_rows)

    def shard_of(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(rows, dtype=np.int64) // self.shard_rows


def shard_rows_for(n_rows: int, widest_row_bytes: int) -> int:
    """Rows per shard when the settings leave it to the store: the largest power of two whose
    zarr shard of the widest array stays within SHARD_BYTES (64-128 MiB objects at scale)
    and that still cuts ``n_rows`` into at least MIN_SHARDS shards."""
    limit = max(1, min(SHARD_BYTES // max(1, widest_row_bytes), -(-n_rows // MIN_SHARDS)))
    return 1 << (limit.bit_length() - 1)


def chunk_rows_for(shard_rows: int, row_bytes: int, target: int = CHUNK_BYTES) -> int:
    """The largest divisor of ``shard_rows`` whose chunk stays within ``target`` bytes."""
    best = 1
    for rows in range(1, shard_rows + 1):
        if shard_rows % rows == 0 and rows * row_bytes <= target:
            best = rows
    return best


def json_normal(value: Any) -> Any:
    """JSON-normal form (tuples as lists) so specs compare after a round trip."""
    if isinstance(value, dict):
        return {str(k): json_normal(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_normal(v) for v in value]
    return value


def _first_difference(old: Any, new: Any, key: str) -> str | None:
    if key in _UNCHECKED:
        return None
    if isinstance(old, dict) and isinstance(new, dict):
        for name in [*old, *(n for n in new if n not in old)]:  # in the order written
            sub = f"{key}.{name}" if key else name
            if name not in old or name not in new:
                if sub in _UNCHECKED:
                    continue
                return f"{sub}: store has {_short(old.get(name))}, this run has {_short(new.get(name))}"
            found = _first_difference(old[name], new[name], sub)
            if found:
                return found
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            found = _first_difference(a, b, f"{key}[{i}]")
            if found:
                return found
        return None
    if old != new:
        return f"{key}: store has {_short(old)}, this run has {_short(new)}"
    return None


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
