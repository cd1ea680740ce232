"""The project's trajectory dataset format, at any fsspec URL.

    <url>/fields.zarr            Zarr v3 group; array "fields" float32
                                 [trajectory, time, channel, *grid] with 1, 2 or 3 grid axes
                                 ("x"; "y", "x"; "z", "y", "x"), one chunk per trajectory,
                                 dimension_names set; attributes: channels, family, times, ...
    <url>/trajectories.parquet   trajectory int64, class, split, source, params (JSON), checksum
    <url>/dataset.json           manifest, written LAST: its presence marks the dataset complete

Plain ``zarr.open_group`` and ``pyarrow.parquet`` read both parts without gradlake.
``checksum`` is the sha256 of one trajectory's float32 bytes (C order, little endian); the
dataset fingerprint is the sha256 of the manifest's shape, channels and family and of the
whole trajectory table (checksums included), so it changes exactly when content does.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from gradlake import __version__, fsio
from gradlake.errors import GradlakeError, InputError
from gradlake.provenance import with_description

FORMAT = "gradlake-dataset"
FORMAT_VERSION = 1
FIELDS, TABLE, MANIFEST = "fields.zarr", "trajectories.parquet", "dataset.json"
ARRAY = "fields"
GRID_AXES = {1: ("x",), 2: ("y", "x"), 3: ("z", "y", "x")}


def dimension_names(grid_axes: int) -> tuple[str, ...]:
    """The fields array's dimension names for 1-, 2- or 3-D grids."""
    if grid_axes not in GRID_AXES:
        raise InputError(f"a dataset grid has 1, 2 or 3 axes, got {grid_axes}")
    return ("trajectory", "time", "channel", *GRID_AXES[grid_axes])
TABLE_SCHEMA = pa.schema([
    ("trajectory", pa.int64()),
    ("class", pa.string()),
    ("split", pa.string()),
    ("source", pa.string()),
    ("params", pa.string()),
    ("checksum", pa.string()),
])
SPLITS = ("train", "val", "test")


def trajectory_checksum(block: np.ndarray) -> str:
    """sha256 of one trajectory's values as little-endian float32, C order."""
    data = np.ascontiguousarray(block, dtype="<f4")
    return hashlib.sha256(data.tobytes()).hexdigest()


def fingerprint(shape: Sequence[int], channels: Sequence[str], family: str, table: pa.Table) -> str:
    """Content fingerprint: sha256 over shape, channels, family and every table row."""
    rows = table.select(list(TABLE_SCHEMA.names)).to_pylist()
    payload = json.dumps({"shape": list(shape), "channels": list(channels), "family": family,
                          "table": rows}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def read_manifest(url: str, storage_options: dict[str, Any] | None = None) -> dict | None:
    """The manifest at ``url``, or None when there is no complete dataset there."""
    files = fsio.Folder(url, storage_options)
    if not files.exists(MANIFEST):
        return None
    try:
        manifest = files.read_json(MANIFEST)
    except (OSError, ValueError) as err:
        raise InputError(f"{fsio.join(url, MANIFEST)}: not a readable dataset manifest ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(f"{fsio.join(url, MANIFEST)}: not a gradlake dataset manifest "
                         f"(expected format {FORMAT!r})")
    return manifest


class DatasetWriter:
    """Writes a dataset in blocks of trajectories; memory does not grow with the dataset.

    ``write`` stores a block [n, T, C, *grid] at trajectory ``start``; ``finish`` writes the
    table, then the manifest. Until ``finish`` the URL holds no dataset (no manifest), and
    a later writer replaces whatever was left there.
    """

    def __init__(self, url: str, *, n_trajectories: int, times: Sequence[float],
                 channels: Sequence[str], resolution: Sequence[int], family: str,
                 attributes: dict[str, Any] | None = None,
                 storage_options: dict[str, Any] | None = None):
        self.url, self.storage_options = url, storage_options
        self.family, self.channels = family, tuple(channels)
        self.times = [float(t) for t in times]
        grid = tuple(int(n) for n in resolution)
        self.dimensions = dimension_names(len(grid))
        self.shape = (int(n_trajectories), len(self.times), len(self.channels), *grid)
        if min(self.shape) < 1:
            raise InputError(f"{url}: cannot write a dataset of shape {self.shape}")
        self.files = fsio.Folder(url, storage_options)
        self._created_root = not self.files.exists("")
        self._clear_leftovers()
        group = zarr.open_group(store=self.files.zarr_store(FIELDS), mode="w")
        attrs = {"channels": list(self.channels), "family": family, "times": self.times,
                 "format": FORMAT, "format_version": FORMAT_VERSION, **(attributes or {})}
        group.attrs.update(attrs)
        self.array = group.create_array(
            ARRAY, shape=self.shape, chunks=(1, *self.shape[1:]), dtype="float32",
            dimension_names=self.dimensions, attributes=attrs, fill_value=np.nan)
        self.checksums: list[str | None] = [None] * self.shape[0]

    def _clear_leftovers(self) -> None:
        names = set(self.files.ls())  # including ".tmp-*" files of a killed write: ours
        foreign = sorted(n for n in names - {FIELDS, TABLE, MANIFEST} if not n.startswith(".tmp-"))
        if foreign:
            raise InputError(f"{self.url}: holds {foreign[0]!r}, which is not part of a gradlake "
                             "dataset; choose an empty or new output location")
        if MANIFEST in names:
            raise InputError(f"{self.url}: already holds a complete dataset; refusing to overwrite it")
        for name in names:
            self.files.remove(name)

    def abort(self) -> None:
        """Remove what this writer wrote (used when the input turns out to be bad)."""
        for name in (FIELDS, TABLE):
            self.files.remove(name)
        if self._created_root and self.files.exists("") and not self.files.ls():
            self.files.fs.rmdir(self.files.root)

    def write(self, start: int, block: np.ndarray) -> None:
        """Store trajectories ``start .. start + len(block) - 1``."""
        block = np.asarray(block, dtype=np.float32)
        if block.ndim != len(self.shape) or block.shape[1:] != self.shape[1:] or start < 0 \
                or start + block.shape[0] > self.shape[0]:
            raise GradlakeError(f"block of shape {block.shape} at {start} does not fit dataset "
                                f"shape {self.shape}")
        if not np.isfinite(block).all():
            raise GradlakeError(f"{self.url}: non-finite values in trajectories {start}.."
                                f"{start + block.shape[0] - 1}")
        self.array[start:start + block.shape[0]] = block
        for i, trajectory in enumerate(block):
            self.checksums[start + i] = trajectory_checksum(trajectory)

    def finish(self, classes: Sequence[str], splits: Sequence[str], sources: Sequence[str],
               params: Sequence[dict[str, Any]], provenance: dict[str, Any]) -> Dataset:
        """Write the trajectory table and then the manifest; returns the opened dataset."""
        n = self.shape[0]
        missing = [i for i, c in enumerate(self.checksums) if c is None]
        if missing:
            raise GradlakeError(f"{self.url}: trajectory {missing[0]} was never written")
        if not (len(classes) == len(splits) == len(sources) == len(params) == n):
            raise GradlakeError(f"{self.url}: table columns do not match {n} trajectories")
        table = pa.table({
            "trajectory": np.arange(n, dtype=np.int64),
            "class": list(classes), "split": list(splits), "source": list(sources),
            "params": [json.dumps(p, sort_keys=True) for p in params],
            "checksum": self.checksums,
        }, schema=TABLE_SCHEMA)
        about = {"format": f"{FORMAT}/{FORMAT_VERSION}", "dataset": self.url, "family": self.family,
                 "provenance": provenance}
        pq.write_table(with_description(table, about), self.files.path(TABLE), filesystem=self.files.fs)
        counts = lambda column: {k: int(v) for k, v in zip(*np.unique(np.asarray(column, dtype=str), return_counts=True))}  # noqa: E731
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "gradlake_version": __version__,
            "family": self.family, "shape": list(self.shape), "dimension_names": list(self.dimensions),
            "channels": list(self.channels), "times": self.times,
            "classes": counts(classes), "splits": counts(splits),
            "provenance": provenance,
            "fingerprint": fingerprint(self.shape, self.channels, self.family, table),
        }
        self.files.write_bytes(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
        return Dataset.open(self.url, self.storage_options)


def open_checked(url: str, fingerprint: str, storage_options: dict[str, Any] | None = None) -> Dataset:
    """The dataset at ``url``, which must be the one with ``fingerprint`` (what a gradient store
    or checkpoint recorded it was made from); InputError otherwise. A dataset that moved is
    found through an explicit ``--data`` URL, checked here, never trusted by its URL alone."""
    try:
        ds = Dataset.open(url, storage_options)
    except InputError as err:
        raise InputError(f"{err}; if the dataset moved, pass its new URL with --data") from None
    if ds.fingerprint != fingerprint:
        raise InputError(f"{url}: dataset fingerprint {ds.fingerprint[:12]} is not {fingerprint[:12]}, that of the "
                         "dataset the gradients were made from; pass that dataset's URL with --data")
    return ds


# Readers of other layouts read in place, tried in order by Dataset.open where a URL holds no
# gradlake dataset: (holds(url, storage_options) -> bool, open(url, storage_options) -> Dataset).
# gradlake.data registers The Well's (gradlake.data.well) when it is imported.
READERS: list[tuple[Callable[..., Any], Callable[..., Dataset]]] = []


def register_reader(holds: Callable[..., Any], open_other: Callable[..., Dataset]) -> None:
    """Let :meth:`Dataset.open` open another layout: ``open_other(url, storage_options)``
    where ``holds(url, storage_options)`` is true."""
    if (holds, open_other) not in READERS:
        READERS.append((holds, open_other))


class Dataset:
    """A complete trajectory dataset, opened read-only."""

    def __init__(self, url: str, manifest: dict, array, trajectories: pa.Table,
                 storage_options: dict[str, Any] | None):
        self.url, self.manifest, self._array = url, manifest, array
        self.trajectories = trajectories
        self.storage_options = storage_options
        self._index = None

    @classmethod
    def open(cls, url: str, storage_options: dict[str, Any] | None = None) -> Dataset:
        """Open the dataset at ``url``: a gradlake dataset, or HDF5 files in The Well's layout
        (read in place, see :mod:`gradlake.data.well`); InputError when there is none."""
        manifest = read_manifest(url, storage_options)
        if manifest is None:
            for holds, open_other in READERS:
                if holds(url, storage_options):
                    return open_other(url, storage_options)
            raise InputError(f"{url}: no complete gradlake dataset here ({MANIFEST} missing) and no "
                             "HDF5 files of The Well; generate or ingest one first")
        files = fsio.Folder(url, storage_options)
        try:
            group = zarr.open_group(store=files.zarr_store(FIELDS, read_only=True), mode="r")
            array = group[ARRAY]
            table = pq.read_table(files.path(TABLE), filesystem=files.fs)
        except (OSError, KeyError, FileNotFoundError, ValueError) as err:
            raise InputError(f"{url}: dataset parts unreadable ({type(err).__name__}: {err})") from None
        shape = tuple(manifest["shape"])
        if tuple(array.shape) != shape or table.num_rows != shape[0]:
            raise InputError(f"{url}: dataset parts disagree with {MANIFEST}: fields {array.shape}, "
                             f"{table.num_rows} table rows, manifest shape {shape}")
        return cls(url, manifest, array, table, storage_options)

    # -- description ---------------------------------------------------------------------
    @property
    def n_trajectories(self) -> int:
        return int(self.manifest["shape"][0])

    @property
    def n_times(self) -> int:
        return int(self.manifest["shape"][1])

    @property
    def channels(self) -> tuple[str, ...]:
        return tuple(self.manifest["channels"])

    @property
    def resolution(self) -> tuple[int, ...]:
        """The grid's shape: (x,), (y, x) or (z, y, x)."""
        return tuple(int(n) for n in self.manifest["shape"][3:])

    @property
    def family(self) -> str:
        return str(self.manifest["family"])

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["fingerprint"])

    @property
    def times(self) -> np.ndarray:
        return np.asarray(self.manifest["times"], dtype=np.float64)

    @property
    def classes(self) -> np.ndarray:
        """Class of every trajectory, in trajectory order."""
        return np.asarray(self.trajectories.column("class").to_pylist(), dtype=str)

    @property
    def splits(self) -> np.ndarray:
        """Split of every trajectory, in trajectory order."""
        return np.asarray(self.trajectories.column("split").to_pylist(), dtype=str)

    def __repr__(self) -> str:
        return (f"Dataset({self.url!r}, family={self.family!r}, shape={tuple(self.manifest['shape'])}, "
                f"classes={self.manifest['classes']})")

    # -- reading -------------------------------------------------------------------------
    def read(self, trajectory_ids) -> np.ndarray:
        """Whole trajectories as float32 [n, T, C, *grid], in the order asked for."""
        ids = np.asarray(trajectory_ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_trajectories):
            raise InputError(f"{self.url}: trajectory ids must lie in 0..{self.n_trajectories - 1}, "
                             f"got {ids.min()}..{ids.max()}")
        if ids.size == 0:
            return np.zeros((0, *self.manifest["shape"][1:]), dtype=np.float32)
        unique, inverse = np.unique(ids, return_inverse=True)
        data = np.asarray(self._array.oindex[unique], dtype=np.float32)
        return data[inverse]

    def index(self):
        """The sample index (one row per transition (trajectory, t) -> t + 1)."""
        from gradlake.data.index import SampleIndex

        if self._index is None:
            self._index = SampleIndex(self.trajectories, self.n_times)
        return self._index

    def samples(self, rows) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) float32 [n, C, *grid]: states at t and t + 1 of each sample row."""
        trajectory, t = self.index().locate(rows)
        unique, inverse = np.unique(trajectory, return_inverse=True)
        data = self.read(unique)
        return data[inverse, t], data[inverse, t + 1]

    def verify(self) -> None:
        """Recompute every trajectory's checksum; GradlakeError naming the first mismatch."""
        expected = self.trajectories.column("checksum").to_pylist()
        for i, checksum in enumerate(expected):
            if trajectory_checksum(self.read([i])[0]) != checksum:
                raise GradlakeError(f"{self.url}: trajectory {i} does not match its checksum")
