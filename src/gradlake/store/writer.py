"""Writing a gradient store: creating it (driver) and committing shards (one writer each)."""

from __future__ import annotations

import datetime
import io
import json
import socket
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.codecs import Crc32cCodec

from gradlake import __version__
from gradlake.errors import GradlakeError, InputError
from gradlake.store import layout
from gradlake.store.spec import StoreSpec
from gradlake.store.store import (COMMIT_KEY, INDEX_COLUMNS, GradientStore, compacted_shards,
                                  read_metadata, samples_schema)
from gradlake.store.zarr_shard import ShardEncoder

COORDINATE_CHUNK_ROWS = 1 << 20  # rows per chunk of a coordinate array
COORDINATE_SHARD_ROWS = 1 << 24  # rows per object of a coordinate array


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def create_store(url: str, spec: StoreSpec, checkpoints: dict[str, dict[str, Any]],
                 storage_options: dict[str, Any] | None = None, index: pa.Table | None = None
                 ) -> GradientStore:
    """Create a store, or add checkpoints to an existing one bound to the same spec.

    ``checkpoints`` maps name -> provenance (at least "sha256"). ``index`` is the dataset's
    sample index (row, trajectory, t, class, split for every one of ``spec.n_rows`` rows):
    written as coordinate arrays of dimension ``sample`` beside each checkpoint's gradient
    arrays (xarray shows them as coordinates). Everything is checked before anything is
    written: a store of a different dataset, model, projector or layout, or a checkpoint
    name already taken by different weights, is refused. grads.zarr's metadata is
    consolidated in its root zarr.json.
    """
    files = layout.StoreFiles(url, storage_options)
    meta = read_metadata(files)
    if meta is not None:
        difference = StoreSpec.from_json(meta["spec"]).mismatch(spec)
        if difference:
            raise InputError(
                f"{url}: this store holds gradients of a different run ({difference}); "
                "use a new store URL"
            )
        for name, info in checkpoints.items():
            held = meta["checkpoints"].get(name)
            if held is not None and held["sha256"] != info["sha256"]:
                raise InputError(
                    f"{url}: checkpoint {name!r} is in the store with weights sha256 "
                    f"{held['sha256'][:12]}..., but {info.get('path', name)} has "
                    f"{info['sha256'][:12]}...; use a new store URL"
                )
    else:
        meta = {"format": layout.FORMAT, "format_version": layout.FORMAT_VERSION,
                "gradlake_version": __version__, "created": _now(),
                "spec": spec.to_json(), "checkpoints": {}, "stages": {}}
    if index is not None and (index.num_rows != spec.n_rows or
                              not (index.column("row").to_numpy() == np.arange(spec.n_rows)).all()):
        raise GradlakeError(f"{url}: the sample index must hold rows 0..{spec.n_rows - 1} in order")
    zarr_store = files.zarr_store(read_only=False)
    group = zarr.open_group(store=zarr_store, mode="a")
    for name in checkpoints:
        _require_arrays(group, name, spec, index)
    with warnings.catch_warnings():  # "not part of the v3 spec": zarr and xarray read it
        warnings.filterwarnings("ignore", "Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(zarr_store)
    for name, info in checkpoints.items():
        meta["checkpoints"].setdefault(name, {**info, "added": _now()})
    files.write_json(layout.STORE_JSON, meta)
    return GradientStore(files, meta)


def _require_arrays(group: zarr.Group, checkpoint: str, spec: StoreSpec, index: pa.Table | None) -> None:
    """The checkpoint's gradient arrays; coordinates first, so an existing gradient array
    means they are complete."""
    sub = group.require_group(checkpoint)
    coordinates = index is not None
    if coordinates and not all(obs in sub for obs in spec.observables):
        chunk = min(spec.n_rows, COORDINATE_CHUNK_ROWS)
        chunks_per_shard = min(COORDINATE_SHARD_ROWS // COORDINATE_CHUNK_ROWS, -(-spec.n_rows // chunk))
        for name in layout.COORDINATES:
            values = _numpy(index.column(name))
            array = sub.create_array(  # strings as zarr's variable-length "string" data type
                name, shape=(spec.n_rows,), dtype=str if values.dtype.kind == "U" else values.dtype,
                overwrite=True, chunks=(chunk,), shards=(chunk * chunks_per_shard,) if chunks_per_shard > 1 else None,
                dimension_names=("sample",), attributes={"description": f"{name} of each sample row"})
            array[...] = values
    for obs in spec.observables:
        shape = (spec.n_rows, *spec.row_shape(obs))
        if obs in sub:
            array = sub[obs]
            if array.shape != shape or str(array.dtype) != spec.dtype:
                raise GradlakeError(
                    f"grads.zarr/{checkpoint}/{obs}: shape {array.shape} {array.dtype} "
                    f"does not match the store's {shape} {spec.dtype}"
                )
            continue
        sub.create_array(
            obs, shape=shape, dtype=spec.dtype,
            chunks=(spec.chunk_rows, *spec.row_shape(obs)),
            shards=(spec.shard_rows, *spec.row_shape(obs)),
            compressors=[Crc32cCodec()],  # projected gradients barely compress; checksum only
            fill_value=np.nan,
            dimension_names=spec.dimension_names(obs),
            attributes={"checkpoint": checkpoint, "observable": obs,
                        "description": f"projected per-sample gradient of observable {obs}"}
            | ({"coordinates": " ".join(layout.COORDINATES)} if coordinates else {}),
        )


def _numpy(column: pa.ChunkedArray) -> np.ndarray:
    """A column as numpy; strings as unicode, through their few distinct labels (fast)."""
    column = column.combine_chunks()
    if pa.types.is_integer(column.type):
        return column.to_numpy()
    encoded = column if pa.types.is_dictionary(column.type) else column.dictionary_encode()
    labels = np.asarray(encoded.dictionary.to_pylist(), dtype=str)
    return labels[encoded.indices.to_numpy()]


def set_stage_status(store: GradientStore, stage: str, status: dict[str, Any]) -> None:
    """Record a stage's status in store.json (the driver is its only writer)."""
    files = store._files
    meta = read_metadata(files)
    meta.setdefault("stages", {})[stage] = {**status, "updated": _now()}
    files.write_json(layout.STORE_JSON, meta)
    store.refresh()


class ShardWriter:
    """Commits shards of an existing store: gradient rows, then the commit file."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.files = layout.StoreFiles(url, storage_options)
        meta = read_metadata(self.files)
        if meta is None:
            raise GradlakeError(f"{url}: no store.json; the driver creates the store first")
        self.spec = StoreSpec.from_json(meta["spec"])
        self.schema = samples_schema(self.spec.observables)
        self._compacted = {name: set().union(*compacted_shards(meta, name).values())
                           for name in meta["checkpoints"]}
        self._encoders: dict[tuple[str, str], ShardEncoder] = {}

    def is_committed(self, checkpoint: str, shard: int) -> bool:
        return (shard in self._compacted.get(checkpoint, ())
                or self.files.exists(layout.commit_part(checkpoint, shard)))

    def commit(self, checkpoint: str, shard: int, index: pa.Table, loss: np.ndarray,
               phis: dict[str, np.ndarray], before_record: Callable[[], None] | None = None
               ) -> dict[str, Any]:
        """Write one shard and commit it; returns its commit record.

        ``index`` holds the shard's samples (row, trajectory, t, class, split) sorted by row;
        ``loss`` [n] and ``phis`` {obs: [n, ...]} follow its order. Non-finite values fail
        the shard before anything is written. Each array's zarr shard is one object, written
        whole; the commit file (the shard's sample rows, its record in the Parquet metadata)
        is written last. Rewriting a shard replaces it whole.
        """
        started = time.monotonic()
        where = f"checkpoint {checkpoint}, shard {shard}"
        rows = index.column("row").to_numpy().astype(np.int64)
        start, stop = self.spec.shard_range(shard)
        if len(rows) == 0 or rows[0] < start or rows[-1] >= stop or np.any(np.diff(rows) <= 0):
            raise GradlakeError(f"{where}: rows must be sorted, unique and inside {start}..{stop - 1}")
        if set(phis) != set(self.spec.observables):
            raise GradlakeError(f"{where}: got observables {sorted(phis)}, the store holds "
                                f"{list(self.spec.observables)}")
        _check_finite(f"{where}: loss", np.asarray(loss), rows)
        blocks, norms = {}, {}
        full = len(rows) == stop - start  # every row of the shard is held (the usual case)
        for obs in self.spec.observables:
            phi = np.asarray(phis[obs], dtype=np.float32)
            expected = (len(rows), *self.spec.row_shape(obs))
            if phi.shape != expected:
                raise GradlakeError(f"{where}: phi_{obs} has shape {phi.shape}, expected {expected}")
            flat = phi.reshape(len(rows), -1)
            with np.errstate(over="ignore", invalid="ignore"):
                norm = np.sqrt(np.einsum("ij,ij->i", flat, flat))
            # NaN or inf anywhere makes a norm non-finite; a norm within the dtype's range
            # bounds every element, so one pass usually settles both checks.
            limit = np.finfo(self.spec.dtype).max
            if not (np.isfinite(norm).all() and (norm.max(initial=0) <= limit or
                                                 -limit <= flat.min() and flat.max() <= limit)):
                _check_finite(f"{where}: phi_{obs}", phi, rows)
                with np.errstate(over="ignore"):
                    _check_finite(f"{where}: phi_{obs} overflows {self.spec.dtype}", phi.astype(self.spec.dtype),
                                  rows, InputError, "; use --storage-dtype float32 (grads.storage_dtype) in a new store")
            stored = phi.astype(self.spec.dtype)
            if not full:
                stored_rows, stored = stored, np.full((stop - start, *expected[1:]), np.nan, self.spec.dtype)
                stored[rows - start] = stored_rows
            blocks[obs] = self._encoder(checkpoint, obs).encode(stored)
            norms[f"norm_{obs}"] = norm
        table = pa.table({**{c: index.column(c) for c in INDEX_COLUMNS},
                          "shard": np.full(len(rows), shard, np.int32),
                          "loss": np.asarray(loss, dtype=np.float32), **norms}).cast(self.schema)
        written = 0
        for obs, data in blocks.items():
            encoder = self._encoder(checkpoint, obs)
            self.files.write_bytes(f"{layout.GRADS}/{layout.array_path(checkpoint, obs)}/{encoder.key(shard)}", data)
            written += data.nbytes
        if before_record is not None:
            before_record()
        record = {"checkpoint": checkpoint, "shard": shard, "start": start, "stop": stop,
                  "samples": len(rows), "seconds": round(time.monotonic() - started, 3),
                  "host": socket.gethostname(), "committed": _now()}
        buffer = io.BytesIO()
        pq.write_table(table.replace_schema_metadata({COMMIT_KEY: json.dumps(record).encode()}), buffer)
        self.files.write_bytes(layout.commit_part(checkpoint, shard), buffer.getvalue())
        return {**record, "bytes": written + buffer.tell()}

    def _encoder(self, checkpoint: str, obs: str) -> ShardEncoder:
        """The shard encoder of one array (its zarr.json read once)."""
        if (checkpoint, obs) not in self._encoders:
            where = f"{layout.GRADS}/{layout.array_path(checkpoint, obs)}"
            encoder = ShardEncoder(self.files.open_array(checkpoint, obs), where)
            if encoder.shard_rows != self.spec.shard_rows:
                raise GradlakeError(f"{where}: zarr shards of {encoder.shard_rows} rows, but the store's "
                                    f"shards hold {self.spec.shard_rows}")
            self._encoders[(checkpoint, obs)] = encoder
        return self._encoders[(checkpoint, obs)]


def _check_finite(what: str, values: np.ndarray, rows: np.ndarray, error: type = GradlakeError,
                  advice: str = "") -> None:
    """``error`` naming the rows whose values are not all finite (InputError: a failure that recurs)."""
    finite = np.isfinite(values.reshape(len(rows), -1)).all(axis=1) if values.size else np.ones(len(rows), bool)
    if not finite.all():
        bad = rows[~finite]
        raise error(
            f"{what}: NaN or inf at rows {bad[:5].tolist()}{'...' if len(bad) > 5 else ''} "
            f"({len(bad)} of {len(rows)}); the shard is not committed{advice}"
        )
