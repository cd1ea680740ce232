"""Where each part of a gradient store lives, and the raw I/O on it (any fsspec URL).

    <root>/store.json                         provenance and stage status (driver only)
    <root>/samples.parquet/checkpoint=<c>/shard=<s>/part-0.parquet
    <root>/grads.zarr/<c>/<observable>        zarr v3 arrays, one zarr shard per gradlake shard
    <root>/commits/<c>/shard-<s>.json          completion record, written last
    <root>/reduce/<name>/                     reduce outputs
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import tempfile
from typing import Any

import zarr
from zarr.storage import FsspecStore, LocalStore

from gradlake import fsio
from gradlake.errors import InputError

STORE_JSON = "store.json"
SAMPLES = "samples.parquet"
GRADS = "grads.zarr"
COMMITS = "commits"
REDUCE = "reduce"
FORMAT = "gradlake-store"
FORMAT_VERSION = 1

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_name(name: str, source: str) -> str:
    """A checkpoint name usable in paths and partition keys, or InputError naming ``source``."""
    if not isinstance(name, str) or not _NAME.match(name):
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


class StoreFiles:
    """A store root: its filesystem and the small reads and writes on it."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = url.rstrip("/") or url
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = fsio.filesystem(self.url, self.storage_options)
        self.local = fsio.is_local(self.url)
        self._zarr: dict[bool, Any] = {}

    def path(self, rel: str) -> str:
        return posixpath.join(self.root, rel)

    def join_url(self, rel: str) -> str:
        return fsio.join(self.url, rel)

    def exists(self, rel: str) -> bool:
        if not self.local:
            self.fs.invalidate_cache(posixpath.dirname(self.path(rel)))
        return self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def read_json(self, rel: str) -> dict[str, Any]:
        return json.loads(self.read_bytes(rel))

    def write_bytes(self, rel: str, data: bytes | list) -> None:
        """Replace a file whole: a rename on local disk, a single PUT on object stores.

        ``data`` is bytes or a list of buffers (written in order).
        """
        path = self.path(rel)
        parts = data if isinstance(data, list) else [data]
        if not self.local:
            self.fs.pipe_file(path, b"".join(parts))
            return
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.writelines(parts)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def write_json(self, rel: str, value: dict[str, Any]) -> None:
        self.write_bytes(rel, json.dumps(value, indent=2, default=str).encode())

    def committed_shards(self, checkpoint: str) -> set[int]:
        """Shards of a checkpoint that have a completion record (listing not cached)."""
        folder = self.path(commit_dir(checkpoint))
        if not self.local:
            self.fs.invalidate_cache(folder)
        try:
            names = self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return set()
        shards = set()
        for name in names:
            base = posixpath.basename(name.rstrip("/"))
            if base.startswith("shard-") and base.endswith(".json"):
                shards.add(int(base[len("shard-"):-len(".json")]))
        return shards

    def zarr_store(self, read_only: bool):
        """The zarr store of grads.zarr (LocalStore on disk, FsspecStore elsewhere)."""
        if read_only not in self._zarr:
            if self.local:
                self._zarr[read_only] = LocalStore(self.path(GRADS), read_only=read_only)
            else:
                self._zarr[read_only] = FsspecStore.from_url(
                    self.join_url(GRADS), storage_options=self.storage_options,
                    read_only=read_only,
                )
        return self._zarr[read_only]

    def open_array(self, checkpoint: str, observable: str) -> zarr.Array:
        """One checkpoint/observable array, read-only (shards are written by the ShardWriter)."""
        return zarr.open_array(store=self.zarr_store(read_only=True),
                               path=array_path(checkpoint, observable), mode="r")
