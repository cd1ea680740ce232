"""Writing a reduce's results (zarr arrays, Parquet tables, JSON) at any fsspec URL.

Completion: ``summary.json`` is written last and a checkpoint's results are marked done by
``done/<checkpoint>.json`` after all of them are written; anything without its record is
recomputed by the next run (see reduce/__init__.py for the layout).
"""

from __future__ import annotations

import io
import json
import posixpath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.storage import FsspecStore, LocalStore

from gradlake import fsio

RESULTS = "results.zarr"
SUMMARY = "summary.json"


class ReduceOutput:
    """One reduce's folder ``<store>/reduce/<name>/`` (or any URL)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = fsio.filesystem(self.url, self.storage_options)
        self.local = fsio.is_local(self.url)

    def path(self, rel: str) -> str:
        return posixpath.join(self.root, rel)

    def exists(self, rel: str) -> bool:
        if not self.local:
            self.fs.invalidate_cache(posixpath.dirname(self.path(rel)))
        return self.fs.exists(self.path(rel))

    def remove(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.rm(self.path(rel), recursive=True)

    def write_bytes(self, rel: str, data: bytes) -> None:
        path = self.path(rel)
        if self.local:
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            tmp = path + ".tmp"
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
            self.fs.mv(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    def write_json(self, rel: str, value: Any) -> None:
        self.write_bytes(rel, json.dumps(_jsonable(value), indent=2, default=str).encode())

    def read_json(self, rel: str) -> Any:
        return json.loads(self.fs.cat_file(self.path(rel)))

    def write_table(self, rel: str, table: pa.Table) -> None:
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        self.write_bytes(rel, buffer.getvalue())

    def read_tables(self, rel: str, filters=None, partitioned: bool = True, columns=None) -> pa.Table:
        """Every Parquet file under ``rel``; its ``checkpoint=<name>`` folders become a
        string column ``checkpoint`` unless ``partitioned`` is False."""
        import pyarrow.dataset as pads

        if not self.local:
            self.fs.invalidate_cache(self.path(rel))
        part = pads.partitioning(pa.schema([("checkpoint", pa.string())]), flavor="hive") if partitioned else None
        dataset = pads.dataset(self.path(rel), format="parquet", filesystem=self.fs, partitioning=part)
        return dataset.to_table(columns=columns, filter=filters)

    def zarr_store(self):
        if self.local:
            return LocalStore(self.path(RESULTS))
        return FsspecStore.from_url(fsio.join(self.url, RESULTS), storage_options=self.storage_options)

    def group(self, path: str = "") -> zarr.Group:
        root = zarr.open_group(store=self.zarr_store(), mode="a")
        return root.require_group(path) if path else root

    def write_array(self, path: str, values: np.ndarray, dims: tuple[str, ...], **attrs) -> None:
        """A whole array (replaced if present) with dimension names and attributes."""
        values = np.asarray(values)
        if len(dims) != values.ndim:
            raise ValueError(f"{path}: {len(dims)} dimension names for a {values.ndim}-d array")
        parent, name = posixpath.split(path)
        group = self.group(parent)
        array = group.create_array(name, shape=values.shape, dtype=values.dtype, overwrite=True,
                                   dimension_names=dims, attributes=_jsonable(attrs),
                                   fill_value=_fill(values.dtype))
        array[...] = values

    def create_array(self, path: str, shape, chunks, dtype, dims, **attrs) -> zarr.Array:
        """An empty array to be filled chunk by chunk (tile tasks)."""
        parent, name = posixpath.split(path)
        return self.group(parent).create_array(name, shape=shape, chunks=chunks, dtype=dtype,
                                               overwrite=True, dimension_names=dims, compressors=None,
                                               attributes=_jsonable(attrs), fill_value=_fill(dtype))

    def open_array(self, path: str) -> zarr.Array:
        return zarr.open_array(store=self.zarr_store(), path=path, mode="r+")


def _fill(dtype):
    return np.nan if np.issubdtype(np.dtype(dtype), np.floating) else 0


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        value = float(value)
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
