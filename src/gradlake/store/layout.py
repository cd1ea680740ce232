"""Where each part of a gradient store lives, and the raw I/O on it (any fsspec URL).

    <root>/store.json                         provenance, stage status, compacted parts (driver only)
    <root>/lease.json                         the writing driver's lease
    <root>/grads.zarr/<c>/<observable>        zarr v3 arrays, one zarr shard per gradlake shard
    <root>/grads.zarr/<c>/<coordinate>        trajectory, t, class, split of every row
    <root>/commits/<c>/shard-<s>.parquet      a shard's sample rows, written last: its commit
    <root>/samples.parquet/checkpoint=<c>/part-<g>.parquet
                                              compacted sample rows of shard group g
    <root>/reduce/<name>/                     reduce outputs
"""

from __future__ import annotations

import json
from typing import Any

import zarr

from gradlake import fsio
from gradlake.errors import InputError

STORE_JSON = "store.json"
SAMPLES = "samples.parquet"
GRADS = "grads.zarr"
COMMITS = "commits"
REDUCE = "reduce"
LEASE = "lease.json"
FORMAT = "gradlake-store"
FORMAT_VERSION = 2  # 1: one Parquet partition and one JSON commit record per shard
COORDINATES = ("trajectory", "t", "class", "split")  # of dimension "sample", in every checkpoint group
GROUP_ROWS = 1 << 22  # rows of one compacted Parquet file (about 100 MB)

def check_name(name: str, source: str) -> str:
    """A checkpoint name usable in paths and partition keys, or InputError naming ``source``."""
    if not fsio.is_path_name(name):
        raise InputError(f"{source}: checkpoint name {name!r} must be letters, digits, '.', '_' or '-'")
    return name


def checkpoint_name(checkpoint: str) -> str:
    """The store's name for a checkpoint path (its last path component)."""
    return check_name(checkpoint.rstrip("/").rsplit("/", 1)[-1], f"checkpoint {checkpoint!r}")


def array_path(checkpoint: str, observable: str) -> str:
    """Path of one checkpoint/observable array inside grads.zarr."""
    return f"{checkpoint}/{observable}"


def samples_dir(checkpoint: str) -> str:
    """The hive partition of a checkpoint's compacted sample rows."""
    return f"{SAMPLES}/checkpoint={checkpoint}"


def samples_file(checkpoint: str, group: int) -> str:
    """The compacted Parquet file of shard group ``group`` (of ``group_shards`` shards)."""
    return f"{samples_dir(checkpoint)}/part-{group:06d}.parquet"


def group_shards(shard_rows: int) -> int:
    """Shards per compaction group: about GROUP_ROWS rows per compacted file."""
    return max(1, GROUP_ROWS // shard_rows)


def commit_dir(checkpoint: str) -> str:
    return f"{COMMITS}/{checkpoint}"


def commit_part(checkpoint: str, shard: int) -> str:
    """A shard's sample rows; writing this file commits the shard."""
    return f"{commit_dir(checkpoint)}/shard-{shard:06d}.parquet"


def shard_of_part(name: str) -> int | None:
    """The shard of a commit file name, None for anything else (temporary files)."""
    if name.startswith("shard-") and name.endswith(".parquet") and name[6:-8].isdigit():
        return int(name[6:-8])
    return None


class StoreFiles(fsio.Folder):
    """A store root: its filesystem and the small reads and writes on it."""

    def committed_parts(self, checkpoint: str) -> set[int]:
        """Shards of a checkpoint with a commit file not yet compacted away (one listing)."""
        return {s for s in map(shard_of_part, self.ls(commit_dir(checkpoint))) if s is not None}

    def zarr_store(self, rel: str = GRADS, read_only: bool = False):
        """The zarr store of grads.zarr unless ``rel`` names another."""
        return super().zarr_store(rel, read_only)

    def open_array(self, checkpoint: str, observable: str) -> zarr.Array:
        """One checkpoint/observable array, read-only (shards are written by the ShardWriter)."""
        return zarr.open_array(store=self.zarr_store(read_only=True),
                               path=array_path(checkpoint, observable), mode="r")


def read_metadata(files: StoreFiles) -> dict[str, Any] | None:
    """store.json of a store, None when there is none yet; InputError if it is not ours."""
    if not files.exists(STORE_JSON):
        return None
    where = files.join_url(STORE_JSON)
    try:
        meta = json.loads(files.read_bytes(STORE_JSON))
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise InputError(f"{where}: not valid JSON (empty or truncated?): {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InputError(f"{where}: not a gradlake store manifest")
    version = meta.get("format_version", 0)
    if version > FORMAT_VERSION:
        raise InputError(
            f"{files.url}: store format {version} is newer than this gradlake "
            f"understands ({FORMAT_VERSION}); upgrade gradlake"
        )
    if version < FORMAT_VERSION:
        raise InputError(f"{files.url}: store format {version} was written by an older gradlake; "
                         "recompute it into a new store URL (`gradlake grads --out ...`)")
    return meta


def compacted_shards(meta: dict[str, Any], checkpoint: str) -> dict[int, set[int]]:
    """Compaction group -> the shards whose sample rows its samples.parquet file holds."""
    groups = meta["checkpoints"].get(checkpoint, {}).get("compacted", {})
    return {int(g): {s for lo, hi in ranges for s in range(lo, hi + 1)} for g, ranges in groups.items()}


def shard_ranges(shards) -> list[list[int]]:
    """Sorted shards as inclusive [first, last] runs (how store.json records them)."""
    runs: list[list[int]] = []
    for s in sorted(shards):
        if runs and runs[-1][1] == s - 1:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    return runs
