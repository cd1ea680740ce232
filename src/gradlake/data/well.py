"""Datasets in The Well's HDF5 layout, read in place (no copy) from any fsspec URL.

The URL is one HDF5 file (``.hdf5``/``.h5``) or a folder of them; a folder with ``train/``,
``valid/``, ``test/`` subfolders (or ``data/train`` ... as The Well publishes them) takes each
trajectory's split from its folder ("valid" -> "val"); otherwise trajectories are split by class
with the default fractions (0.65, 0.05, 0.30) and seed 0. Each file is one class, named by its
file name without the extension.

Layout read (The Well's documented format): fields in groups ``t0_fields`` (scalars, datasets
[n_trajectories, n_steps, *spatial]), ``t1_fields`` (vectors, [..., *spatial, D]) and
``t2_fields`` (tensors, [..., *spatial, D, D]), with D = the file's ``n_spatial_dims`` attribute
(1, 2 or 3) and the spatial axes named by ``dimensions.attrs["spatial_dims"]``; times from
``dimensions/time``. A field whose ``time_varying`` or ``sample_varying`` attribute is false lacks
that axis and is repeated along it. ``boundary_conditions/`` and ``scalars/`` are not read.

Channels, in order: t0 fields, then each t1 field's components ``<name>_<dim>``, then each t2
field's ``<name>_<dim><dim>`` (within a group in the ``field_names`` attribute's order, else
by name). Well-known names take the names the built-in task expects: density -> "rho",
energy -> "E", momentum_<d> -> "rho_v<d>", velocity_<d> -> "v<d>". The grid keeps the file's
axis order (``spatial_dims``, usually x, y(, z); ``dimension_names`` says so), so reading costs
one copy per field; `gradlake ingest well` transposes 2-D data to the project's (y, x).
Every file must have the same channels, steps and grid.

The fingerprint covers each file's name, size and field shapes and the bytes of its first
snapshot, and the channels: it changes when files are added, removed, renamed or resized.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np
import pyarrow as pa

from gradlake import fsio
from gradlake.data.format import FORMAT_VERSION, TABLE_SCHEMA, Dataset
from gradlake.data.index import split_trajectories
from gradlake.errors import InputError

SUFFIXES = (".hdf5", ".h5")
GROUPS = ("t0_fields", "t1_fields", "t2_fields")
SPLIT_FOLDERS = {"train": "train", "valid": "val", "val": "val", "test": "test"}
ALIASES = {"density": "rho", "energy": "E", "momentum_x": "rho_vx", "momentum_y": "rho_vy",
           "momentum_z": "rho_vz", "velocity_x": "vx", "velocity_y": "vy", "velocity_z": "vz"}
FAMILY = "well"


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def well_files(url: str, storage_options: dict[str, Any] | None = None) -> list[tuple[str, str | None]]:
    """(file URL, split or None) of every HDF5 file the URL names, sorted; [] when none."""
    fs, path = fsio.filesystem(url, storage_options)
    if path.endswith(SUFFIXES):
        return [(url, None)] if fs.isfile(path) else []
    if not fs.isdir(path):
        return []
    root = url.rstrip("/")
    if fs.isdir(posixpath.join(path, "data")):
        root, path = fsio.join(root, "data"), posixpath.join(path, "data")
    splits = [name for name in SPLIT_FOLDERS if fs.isdir(posixpath.join(path, name))]
    folders = [(name, SPLIT_FOLDERS[name]) for name in splits] if splits else [("", None)]
    found = []
    for folder, split in folders:
        for entry in sorted(fs.ls(posixpath.join(path, folder) if folder else path, detail=False)):
            name = posixpath.basename(entry.rstrip("/"))
            if name.endswith(SUFFIXES):
                found.append((fsio.join(root, folder, name) if folder else fsio.join(root, name), split))
    return found


@dataclass(frozen=True)
class _Field:
    group: str
    name: str
    components: int  # channels it contributes (1, D or D*D)
    time_varying: bool
    sample_varying: bool


@dataclass(frozen=True)
class _File:
    url: str
    split: str | None
    n: int
    size: int
    shapes: dict[str, list[int]]
    params: dict[str, Any]
    head: str  # sha256 of the first snapshot


class WellDataset(Dataset):
    """HDF5 files of The Well read in place, with :class:`Dataset`'s interface (read-only)."""

    def __init__(self, url, manifest, files, fields, trajectories, storage_options):
        super().__init__(url, manifest, None, trajectories, storage_options)
        self._files, self._fields = files, fields
        starts = np.cumsum([0] + [f.n for f in files])
        self._starts = starts
        self._handles: dict[int, tuple[Any, h5py.File]] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    @classmethod
    def open(cls, url: str, storage_options: dict[str, Any] | None = None) -> WellDataset:
        """Inspect every file (shapes and attributes only) and open them as one dataset."""
        listed = well_files(url, storage_options)
        if not listed:
            raise InputError(f"{url}: no HDF5 files of The Well here")
        reference = None
        files = []
        for file_url, split in listed:
            fields, grid, times, dims, entry = _inspect(file_url, split, storage_options)
            layout = (fields, grid, times, dims)
            if reference is None:
                reference = layout
            elif layout != reference:
                what = ("fields" if fields != reference[0] else "grid" if grid != reference[1]
                        else "time steps" if times != reference[2] else "spatial dims")
                raise InputError(f"{file_url}: its {what} differ from those of {listed[0][0]}; one dataset "
                                 "holds files of one layout")
            files.append(entry)
        fields, grid, times, dims = reference
        channels = _channels(fields, dims)
        if len(set(channels)) != len(channels):
            raise InputError(f"{url}: channel names {channels} are not unique")
        classes = [posixpath.basename(f.url).rsplit(".", 1)[0] for f in files for _ in range(f.n)]
        if all(f.split for f in files):
            splits = [f.split for f in files for _ in range(f.n)]
        else:
            splits = split_trajectories(classes)
        table = pa.table({
            "trajectory": np.arange(len(classes), dtype=np.int64), "class": classes, "split": splits,
            "source": [f.url for f in files for _ in range(f.n)],
            "params": [json.dumps(f.params, sort_keys=True, default=str) for f in files for _ in range(f.n)],
            "checksum": [""] * len(classes),
        }, schema=TABLE_SCHEMA)
        shape = [len(classes), len(times), len(channels), *grid]
        payload = json.dumps({"channels": channels, "files": [
            {"name": posixpath.basename(f.url), "split": f.split, "size": f.size, "shapes": f.shapes,
             "head": f.head} for f in files]}, sort_keys=True)
        manifest = {
            "format": "the-well-hdf5", "format_version": FORMAT_VERSION, "family": FAMILY,
            "shape": shape, "dimension_names": ["trajectory", "time", "channel", *dims],
            "channels": channels, "times": times, "classes": _counts(classes), "splits": _counts(splits),
            "provenance": {"read_in_place": [f.url for f in files]},
            "fingerprint": hashlib.sha256(payload.encode()).hexdigest(),
        }
        return cls(url, manifest, files, fields, table, storage_options)

    def _handle(self, index: int) -> h5py.File:
        if index not in self._handles:
            fs, path = fsio.filesystem(self._files[index].url, self.storage_options)
            raw = fs.open(path, "rb")
            self._handles[index] = (raw, h5py.File(raw, "r"))
        return self._handles[index][1]

    def read(self, trajectory_ids) -> np.ndarray:
        """Whole trajectories as float32 [n, T, C, *grid], in the order asked for."""
        ids = np.asarray(trajectory_ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_trajectories):
            raise InputError(f"{self.url}: trajectory ids must lie in 0..{self.n_trajectories - 1}, "
                             f"got {ids.min()}..{ids.max()}")
        out = np.empty((len(ids), *self.manifest["shape"][1:]), dtype=np.float32)
        for i, trajectory in enumerate(ids.tolist()):
            index = int(np.searchsorted(self._starts, trajectory, side="right") - 1)
            self._fill(out[i], index, trajectory - int(self._starts[index]))
        return out

    def _fill(self, out: np.ndarray, index: int, local: int) -> None:
        """One trajectory into ``out`` [T, C, *grid]: each field read once, copied once."""
        f = self._handle(index)
        steps, grid = out.shape[0], out.shape[2:]
        channel = 0
        for field in self._fields:
            data = f[field.group][field.name]
            block = np.asarray(data[local] if field.sample_varying else data[()], dtype=np.float32)
            # [(T,) *grid, *components] -> [T, components, *grid]
            block = block.reshape(steps if field.time_varying else 1, *grid, field.components)
            out[:, channel:channel + field.components] = np.moveaxis(block, -1, 1)
            channel += field.components

    def verify(self) -> None:
        raise InputError(f"{self.url}: read in place from The Well's HDF5 files, which carry no "
                         "checksums; `gradlake ingest well` copies them into a verifiable dataset")


def _counts(values: list[str]) -> dict[str, int]:
    names, counts = np.unique(np.asarray(values, dtype=str), return_counts=True)
    return {str(k): int(v) for k, v in zip(names, counts)}


def _inspect(url: str, split: str | None, storage_options) -> tuple:
    """(fields, grid, times, spatial dims, _File) of one file, from its attributes and shapes."""
    fs, path = fsio.filesystem(url, storage_options)
    try:
        with fs.open(path, "rb") as raw, h5py.File(raw, "r") as f:
            return _inspect_open(f, url, split, int(fs.size(path)))
    except OSError as err:
        raise InputError(f"{url}: not a readable HDF5 file ({err})") from None


def _inspect_open(f: h5py.File, url: str, split: str | None, size: int) -> tuple:
    if "n_spatial_dims" not in f.attrs:
        raise InputError(f"{url}: no n_spatial_dims attribute (not The Well's layout)")
    d = int(f.attrs["n_spatial_dims"])
    if d not in (1, 2, 3):
        raise InputError(f"{url}: n_spatial_dims is {d}; expected 1, 2 or 3")
    if "dimensions" not in f or "time" not in f["dimensions"]:
        raise InputError(f"{url}: missing dimensions/time (The Well layout)")
    dims = tuple(_text(n) for n in f["dimensions"].attrs.get("spatial_dims", ["x", "y", "z"][:d]))
    if len(dims) != d:
        raise InputError(f"{url}: dimensions.spatial_dims {list(dims)} does not have n_spatial_dims = {d} names")
    time = f["dimensions"]["time"]
    times = [float(t) for t in np.asarray(time[()] if time.ndim == 1 else time[0], dtype=np.float64)]
    n = int(f.attrs.get("n_trajectories", 0))
    fields, shapes, grid = [], {}, None
    for rank, group in enumerate(GROUPS):
        if group not in f:
            continue
        names = [_text(n) for n in f[group].attrs.get("field_names", [])] or sorted(f[group])
        for name in names:
            if name not in f[group] or not isinstance(f[group][name], h5py.Dataset):
                raise InputError(f"{url}: {group}/{name} is listed in field_names but missing")
            data = f[group][name]
            attrs = data.attrs
            if not all(bool(v) for v in np.atleast_1d(attrs.get("dim_varying", True))):
                raise InputError(f"{url}: {group}/{name} is constant along a spatial axis "
                                 "(dim_varying); such fields are not supported")
            sample, varying = bool(attrs.get("sample_varying", True)), bool(attrs.get("time_varying", True))
            lead = int(sample) + int(varying)
            expected = lead + d + rank
            if data.ndim != expected or any(c != d for c in data.shape[lead + d:]):
                axes = ["trajectory"] * sample + ["time"] * varying + [f"{d} spatial axes"] + [str(d)] * rank
                raise InputError(f"{url}: {group}/{name} has shape {list(data.shape)}; expected [{', '.join(axes)}]")
            if sample:
                n = n or data.shape[0]
                if data.shape[0] != n:
                    raise InputError(f"{url}: {group}/{name} has {data.shape[0]} trajectories, "
                                     f"the file {n}")
            if varying and data.shape[int(sample)] != len(times):
                raise InputError(f"{url}: {group}/{name} has {data.shape[int(sample)]} time steps; "
                                 f"dimensions/time has {len(times)}")
            spatial = tuple(int(s) for s in data.shape[lead:lead + d])
            if grid is not None and spatial != grid:
                raise InputError(f"{url}: {group}/{name} has grid {list(spatial)}, other fields {list(grid)}")
            grid = spatial
            fields.append(_Field(group, name, d ** rank, varying, sample))
            shapes[f"{group}/{name}"] = [int(s) for s in data.shape]
    if not fields:
        raise InputError(f"{url}: no fields in {', '.join(GROUPS)} (The Well layout)")
    if n < 1:
        raise InputError(f"{url}: no trajectories (n_trajectories attribute or a sample-varying field)")
    if len(times) < 2:
        raise InputError(f"{url}: {len(times)} time steps; a dataset of transitions needs at least 2")
    first = fields[0]
    head_data = f[first.group][first.name]
    head = np.asarray(head_data[(0,) * (int(first.sample_varying) + int(first.time_varying))], dtype="<f4")
    params = {_text(k): f.attrs[_text(k)].tolist() if hasattr(f.attrs[_text(k)], "tolist") else f.attrs[_text(k)]
              for k in f.attrs.get("simulation_parameters", []) if _text(k) in f.attrs}
    entry = _File(url, split, n, size, shapes, params, hashlib.sha256(head.tobytes()).hexdigest())
    return tuple(fields), grid, times, dims, entry


def _channels(fields: tuple[_Field, ...], dims: tuple[str, ...]) -> list[str]:
    names = []
    for field in fields:
        if field.group == "t0_fields":
            raw = [field.name]
        elif field.group == "t1_fields":
            raw = [f"{field.name}_{a}" for a in dims]
        else:
            raw = [f"{field.name}_{a}{b}" for a in dims for b in dims]
        names += [ALIASES.get(name, name) for name in raw]
    return names
