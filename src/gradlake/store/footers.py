"""The sample Parquet files of a store, read back: what :func:`check_parquet` finds wrong in
commits/ and the compacted samples.parquet files (their footers, or every page), as findings.
The store reads through it to name a damaged file; gradlake.store.verify builds on it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gradlake.store import layout
from gradlake.store.layout import compacted_shards, read_metadata

if TYPE_CHECKING:
    from gradlake.store.store import GradientStore

THREADS = 16  # concurrent reads (object stores answer many at once)


@dataclass(frozen=True)
class Finding:
    """One damaged or missing object of a store."""

    path: str  # relative to the store root
    checkpoint: str
    shards: tuple[int, ...]  # the committed shards it damages
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


def check_parquet(store: GradientStore, deep: bool = False) -> list[Finding]:
    """Findings on the sample Parquet files of every checkpoint: footers, or every page (``deep``)."""
    files = store._files
    meta = read_metadata(files)
    checks = []  # (path, checkpoint, shards it holds for gradlake)
    for name in meta["checkpoints"]:
        listed = compacted_shards(meta, name)
        held = set().union(*listed.values())
        checks += [(layout.samples_file(name, g), name, tuple(sorted(s))) for g, s in sorted(listed.items())]
        checks += [(layout.commit_part(name, s), name, (s,)) for s in sorted(files.committed_parts(name) - held)]

    def check(item):
        path, name, shards = item
        problem = parquet_problem(store, path, shards, deep)
        return None if problem is None else Finding(path, name, shards, problem)

    with ThreadPoolExecutor(THREADS) as pool:
        return [f for f in pool.map(check, checks) if f is not None]


def parquet_problem(store: GradientStore, path: str, shards: tuple[int, ...], deep: bool = True) -> str | None:
    """What is wrong with a sample Parquet file that should hold ``shards``, or None."""
    files = store._files
    try:
        if not deep:
            pq.read_metadata(files.path(path), filesystem=files.fs)
            return None
        table = pq.read_table(files.path(path), filesystem=files.fs)
    except FileNotFoundError:
        return "missing"
    except (pa.ArrowException, OSError) as err:
        if isinstance(err, OSError) and err.errno is not None:  # the storage failed, not the file's bytes
            raise
        return f"cannot be read ({first_line(err)})"
    missing = [c for c in store._samples_dataset_schema().names if c != "checkpoint" and c not in table.column_names]
    if missing:
        return f"has no column {missing[0]!r}"
    found = set(pc.unique(table["shard"]).to_pylist())
    if not set(shards) <= found:
        return f"holds no rows of shard {min(set(shards) - found)}"
    return None


def first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]
