"""Where each part of a gradient store lives, and the raw I/O on it (any fsspec URL).

    <root>/store.json                         provenance and stage status (driver only)
    <root>/samples.parquet/checkpoint=<c>/shard=<s>/part-0.parquet
    <root>/grads.zarr/<c>/<observable>        zarr v3 arrays, one zarr shard per gradlake shard
    <root>/commits/<c>/shard-<s>.json          completion record, written last
    <root>/reduce/<name>/                     reduce outputs
"""

from __future__ import annotations


import zarr

from gradlake import fsio
from gradlake.errors import InputError

STORE_JSON = "store.json"
SAMPLES = "samples.parquet"
GRADS = "grads.zarr"
COMMITS = "commits"
REDUCE = "reduce"
FORMAT = "gradlake-store"
FORMAT_VERSION = 1

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


def samples_part(checkpoint: str, shard: int) -> str:
    """The one Parquet file of a shard's partition (hive keys: checkpoint, shard)."""
    return f"{SAMPLES}/checkpoint={checkpoint}/shard={shard}/part-0.parquet"


def commit_dir(checkpoint: str) -> str:
    return f"{COMMITS}/{checkpoint}"


def commit_record(checkpoint: str, shard: int) -> str:
    return f"{commit_dir(checkpoint)}/shard-{shard:06d}.json"


class StoreFiles(fsio.Folder):
    """A store root: its filesystem and the small reads and writes on it."""

    def committed_shards(self, checkpoint: str) -> set[int]:
        """Shards of a checkpoint that have a completion record (listing not cached)."""
        return {int(name[len("shard-"):-len(".json")]) for name in self.ls(commit_dir(checkpoint))
                if name.startswith("shard-") and name.endswith(".json")}

    def zarr_store(self, rel: str = GRADS, read_only: bool = False):
        """The zarr store of grads.zarr unless ``rel`` names another."""
        return super().zarr_store(rel, read_only)

    def open_array(self, checkpoint: str, observable: str) -> zarr.Array:
        """One checkpoint/observable array, read-only (shards are written by the ShardWriter)."""
        return zarr.open_array(store=self.zarr_store(read_only=True),
                               path=array_path(checkpoint, observable), mode="r")
