"""Writing a reduce's results (zarr arrays, Parquet tables, JSON) at any fsspec URL.

Completion: ``summary.json`` is written last and a checkpoint's results are marked done by
``done/<checkpoint>.json`` after all of them are written; anything without its record is
recomputed by the next run (see reduce/__init__.py for the layout). results.zarr's
consolidated metadata is written after its last array, before summary.json.
"""

from __future__ import annotations

import io
import posixpath
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from gradlake import fsio
from gradlake.provenance import with_description

RESULTS = "results.zarr"
TABLE_FORMAT = "gradlake-reduce/1"
SUMMARY = "summary.json"


class ReduceOutput(fsio.Folder):
    """One reduce's folder ``<store>/reduce/<name>/`` (or any URL); ``provenance`` (what the
    results were computed from) goes into every table's metadata."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None,
                 provenance: dict[str, Any] | None = None):
        super().__init__(url, storage_options)
        self.provenance = dict(provenance or {})

    def write_json(self, rel: str, value: Any) -> None:
        super().write_json(rel, _jsonable(value))

    def write_table(self, rel: str, table: pa.Table) -> None:
        """A Parquet file with gradlake's provenance metadata (:mod:`gradlake.provenance`)."""
        about = {"format": TABLE_FORMAT, "table": rel, "output": self.url, **self.provenance}
        buffer = io.BytesIO()
        pq.write_table(with_description(table, _jsonable(about)), buffer)
        self.write_bytes(rel, buffer.getvalue())

    def read_tables(self, rel: str, filters=None, partitioned: bool = True, columns=None) -> pa.Table:
        """Every Parquet file under ``rel``; its ``checkpoint=<name>`` folders become a
        string column ``checkpoint`` unless ``partitioned`` is False."""
        import pyarrow.dataset as pads

        self.forget_listing(rel)
        part = pads.partitioning(pa.schema([("checkpoint", pa.string())]), flavor="hive") if partitioned else None
        dataset = pads.dataset(self.path(rel), format="parquet", filesystem=self.fs, partitioning=part)
        return dataset.to_table(columns=columns, filter=filters)

    def zarr_store(self, rel: str = RESULTS, read_only: bool = False):
        """The zarr store of results.zarr unless ``rel`` names another."""
        return super().zarr_store(rel, read_only)

    def group(self, path: str = "") -> zarr.Group:
        # the live listing, never the consolidated one (stale while a run rewrites results)
        root = zarr.open_group(store=self.zarr_store(), mode="a", use_consolidated=False)
        return root.require_group(path) if path else root

    def consolidate(self) -> None:
        """Write results.zarr's consolidated metadata (every group and array, in the root
        zarr.json): call after the last array is written, so one read lists them all."""
        self.group()  # results.zarr exists even when nothing was written into it
        with warnings.catch_warnings():  # "not part of the v3 spec": zarr and xarray read it
            warnings.filterwarnings("ignore", "Consolidated metadata", category=UserWarning)
            zarr.consolidate_metadata(self.zarr_store())

    def write_array(self, path: str, values: np.ndarray, dims: tuple[str, ...],
                    coords: dict[str, Sequence] | None = None, **attrs) -> None:
        """A whole array (replaced if present) with dimension names and attributes, and beside
        it, for each dimension in ``coords``, a 1-d array of that name holding the labels
        (xarray opens the group with them as coordinates; read them with :func:`coordinates`)."""
        values = np.asarray(values)
        if len(dims) != values.ndim:
            raise ValueError(f"{path}: {len(dims)} dimension names for a {values.ndim}-d array")
        parent, name = posixpath.split(path)
        group = self.group(parent)
        _write_coordinates(group, path, dims, values.shape, coords)
        array = group.create_array(name, shape=values.shape, dtype=values.dtype, overwrite=True,
                                   dimension_names=dims, attributes=_jsonable(attrs),
                                   fill_value=_fill(values.dtype))
        array[...] = values

    def create_array(self, path: str, shape, chunks, dtype, dims, coords: dict[str, Sequence] | None = None,
                     **attrs) -> zarr.Array:
        """An empty array to be filled chunk by chunk (tile tasks), with coordinates as in write_array."""
        parent, name = posixpath.split(path)
        group = self.group(parent)
        _write_coordinates(group, path, dims, shape, coords)
        return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, overwrite=True,
                                  dimension_names=dims, compressors=None, attributes=_jsonable(attrs),
                                  fill_value=_fill(dtype))

    def open_array(self, path: str) -> zarr.Array:
        return zarr.open_array(store=self.zarr_store(), path=path, mode="r+")


def _write_coordinates(group: zarr.Group, path: str, dims, shape, coords) -> None:
    for dim, labels in (coords or {}).items():
        labels = np.asarray(labels)
        if dim not in dims or labels.shape != (shape[dims.index(dim)],):
            raise ValueError(f"{path}: {len(labels)} labels for dimension {dim!r} of {dims} {tuple(shape)}")
        text = labels.dtype.kind in "OU"
        coordinate = group.create_array(dim, shape=labels.shape, overwrite=True, dimension_names=(dim,),
                                        dtype=str if text else labels.dtype,
                                        fill_value="" if text else _fill(labels.dtype))
        coordinate[...] = labels


def coordinates(group: zarr.Group, name: str) -> dict[str, list]:
    """Dimension name -> labels of array ``name`` in ``group``, from the coordinate arrays
    beside it (dimensions without one are left out)."""
    dims = group[name].metadata.dimension_names or ()
    return {dim: group[dim][...].tolist() for dim in dims
            if dim in group and isinstance(group[dim], zarr.Array) and group[dim].ndim == 1}


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
