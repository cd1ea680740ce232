"""External datasets -> the project's format: PDEGym netCDF and The Well HDF5.

Every input file is inspected (variables, ranks, shapes, class) before anything is
written; data are then copied in blocks of trajectories (memory does not grow with the
files). A bad value found while copying (NaN/inf) raises InputError naming the file,
trajectory and time, and the partial output is removed, so bad input never leaves
anything behind. Inputs may be local paths or fsspec URLs (read through h5py).

PDEGym (Poseidon's netCDF4 = HDF5 files; assumptions, from the Poseidon loaders):
  CE-RP, CE-CRP, CE-RPUI   variable ``data`` [trajectory, time, channel, y, x] with
                           channels (rho, vx, vy, p, E); stored as conserved
                           (rho, rho vx, rho vy, E), E taken from channel 4
  NS-BB, NS-Gauss, NS-Sines  variable ``velocity`` [trajectory, time, channel, y, x];
                           channels 0, 1 = (vx, vy)
  The files carry no time axis: snapshots are taken as equally spaced on [0, 1]
  (PDEGym's convention). The class comes from the dataset name in the file name
  ("CE-RPUI.nc" -> "rpui", "NS-Sines.nc" -> "sines") unless given.

The Well (its documented HDF5 layout): fields [trajectory, time, d1, d2] in ``t0_fields``
(scalars) and [trajectory, time, d1, d2, 2] in ``t1_fields`` (vectors), with
(d1, d2) = ``dimensions.attrs["spatial_dims"]`` (default ("x", "y")) and vector
components in the same order; times from ``dimensions/time``. Layouts understood:
  euler  t0_fields/density, t0_fields/energy, t1_fields/momentum -> (rho, rho_vx, rho_vy, E)
  ns     t1_fields/velocity (no density)                          -> (vx, vy)
Fields are transposed to [.., y, x]. The class defaults to the file's ``dataset_name``
attribute (else the file name).
"""

from __future__ import annotations

import contextlib
import posixpath
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from gradlake import fsio
from gradlake.data import euler, ns
from gradlake.data.format import Dataset, DatasetWriter
from gradlake.data.generate import existing_or_none
from gradlake.data.index import DEFAULT_FRACTIONS, split_counts, split_trajectories
from gradlake.errors import InputError
from gradlake.progress import progress

PDEGYM_CLASSES = {"CE-RPUI": "rpui", "CE-CRP": "crp", "CE-RP": "rp",
                  "NS-Sines": "sines", "NS-Gauss": "gauss", "NS-BB": "bb"}
_PDEGYM_NAME = re.compile(r"(?<![A-Za-z])(" + "|".join(PDEGYM_CLASSES) + r")(?![A-Za-z])", re.IGNORECASE)
BLOCK_BYTES = 1 << 28  # float64 working set of one block of trajectories


@dataclass
class Source:
    """One inspected input file."""

    path: str
    class_name: str
    family: str
    n: int
    shape: tuple[int, int, int]  # (T, H, W) as stored
    times: list[float]
    read: Callable[[h5py.File, int, int], np.ndarray]  # (file, i0, i1) -> float64 [n, T, C, H, W]
    size: int


@contextlib.contextmanager
def open_h5(path: str, storage_options: dict[str, Any] | None = None):
    fs, fpath = fsio.filesystem(path, storage_options)
    if not fs.exists(fpath):
        raise InputError(f"{path}: no such file")
    try:
        with fs.open(fpath, "rb") as raw, h5py.File(raw, "r") as f:
            yield f
    except OSError as err:
        raise InputError(f"{path}: not a readable HDF5/netCDF4 file ({err})") from None


def _file_size(path: str, storage_options) -> int:
    fs, fpath = fsio.filesystem(path, storage_options)
    return int(fs.size(fpath))


def _dataset(f: h5py.File, path: str, name: str, rank: int, what: str) -> h5py.Dataset:
    if name not in f or not isinstance(f[name], h5py.Dataset):
        raise InputError(f"{path}: missing variable {name!r} ({what})")
    data = f[name]
    if data.ndim != rank:
        raise InputError(f"{path}: variable {name!r} has rank {data.ndim} {data.shape}; expected "
                         f"rank {rank} ({what})")
    return data


def _check_class(path: str, class_name: str) -> str:
    if not fsio.is_path_name(class_name):
        raise InputError(f"--class: expected a name of letters, digits, '-', '_' or '.', got {class_name!r}")
    return class_name


# -- PDEGym ------------------------------------------------------------------------------
def _pdegym_class(path: str) -> str:
    match = _PDEGYM_NAME.search(posixpath.basename(path))
    if not match:
        raise InputError(f"{path}: unknown class: the file name names none of the PDEGym datasets "
                         f"{', '.join(sorted(PDEGYM_CLASSES))}; pass --class")
    return PDEGYM_CLASSES[next(k for k in PDEGYM_CLASSES if k.lower() == match.group(1).lower())]


def _inspect_pdegym(path: str, class_name: str | None, storage_options) -> Source:
    with open_h5(path, storage_options) as f:
        if "data" in f:
            family, var = "euler", _dataset(f, path, "data", 5, "CE-*: [trajectory, time, channel, y, x]")
            if var.shape[2] < 5:
                raise InputError(f"{path}: variable 'data' has {var.shape[2]} channels; expected 5 "
                                 "(rho, vx, vy, p, E)")
        elif "velocity" in f:
            family, var = "ns", _dataset(f, path, "velocity", 5, "NS-*: [trajectory, time, channel, y, x]")
            if var.shape[2] < 2:
                raise InputError(f"{path}: variable 'velocity' has {var.shape[2]} channels; expected >= 2")
        else:
            raise InputError(f"{path}: missing variable 'data' (CE-* datasets) or 'velocity' (NS-* datasets)")
        shape = tuple(int(s) for s in var.shape)
    name = _check_class(path, class_name) if class_name else _pdegym_class(path)
    if class_name is None and name in (euler.CLASSES if family == "ns" else ns.CLASSES):
        raise InputError(f"{path}: named as a {name!r} dataset but holds {'velocity' if family == 'ns' else 'data'}")

    def read(f, i0, i1, family=family):
        if family == "ns":
            return np.asarray(f["velocity"][i0:i1, :, 0:2], dtype=np.float64)
        d = np.asarray(f["data"][i0:i1, :, 0:5], dtype=np.float64)
        rho = d[:, :, 0]
        return np.stack((rho, rho * d[:, :, 1], rho * d[:, :, 2], d[:, :, 4]), axis=2)

    steps = shape[1]
    times = np.linspace(0.0, 1.0, steps).tolist() if steps > 1 else [0.0]
    return Source(path, name, family, shape[0], (shape[1], shape[3], shape[4]), times, read,
                  _file_size(path, storage_options))


# -- The Well ----------------------------------------------------------------------------
def _attr_str(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _inspect_well(path: str, class_name: str | None, storage_options) -> Source:
    with open_h5(path, storage_options) as f:
        for group in ("dimensions", "t0_fields", "t1_fields"):
            if group not in f or not isinstance(f[group], h5py.Group):
                raise InputError(f"{path}: missing group {group!r} (The Well layout)")
        dims = [_attr_str(d) for d in f["dimensions"].attrs.get("spatial_dims", ["x", "y"])]
        if sorted(dims) != ["x", "y"]:
            raise InputError(f"{path}: dimensions.spatial_dims is {dims}; expected the 2D dims 'x', 'y'")
        x_first = dims[0] == "x"
        if "density" in f["t0_fields"] or "momentum" in f["t1_fields"]:
            family = "euler"
            rho = _dataset(f, path, "t0_fields/density", 4, "[trajectory, time, d1, d2]")
            energy = _dataset(f, path, "t0_fields/energy", 4, "[trajectory, time, d1, d2]")
            momentum = _dataset(f, path, "t1_fields/momentum", 5, "[trajectory, time, d1, d2, 2]")
            parts = {"t0_fields/energy": energy.shape, "t1_fields/momentum": momentum.shape[:4]}
            shape = rho.shape
        else:
            family = "ns"
            velocity = _dataset(f, path, "t1_fields/velocity", 5, "[trajectory, time, d1, d2, 2]")
            parts, shape = {}, velocity.shape[:4]
        for name, other in parts.items():
            if tuple(other) != tuple(shape):
                raise InputError(f"{path}: {name} has shape {tuple(other)}; expected {tuple(shape)} "
                                 "like t0_fields/density")
        vector = momentum if family == "euler" else velocity
        if vector.shape[4] != 2:
            raise InputError(f"{path}: {vector.name.lstrip('/')} has {vector.shape[4]} components; expected 2")
        time = _dataset(f, path, "dimensions/time", 1, "[time]")
        if time.shape[0] != shape[1]:
            raise InputError(f"{path}: dimensions/time has {time.shape[0]} entries; the fields have "
                             f"{shape[1]} time steps")
        times = [float(t) for t in time[:]]
        default_name = _attr_str(f.attrs.get("dataset_name", "")) or posixpath.basename(path).split(".")[0]
    name = _check_class(path, class_name or default_name)

    def to_yx(a):  # [..., d1, d2] -> [..., y, x]
        return np.swapaxes(a, -1, -2) if x_first else a

    def read(f, i0, i1, family=family):
        if family == "ns":
            v = np.asarray(f["t1_fields/velocity"][i0:i1], dtype=np.float64)
            comps = (v[..., 0], v[..., 1]) if x_first else (v[..., 1], v[..., 0])
            return to_yx(np.stack(comps, axis=2))
        m = np.asarray(f["t1_fields/momentum"][i0:i1], dtype=np.float64)
        mx, my = (m[..., 0], m[..., 1]) if x_first else (m[..., 1], m[..., 0])
        return to_yx(np.stack((np.asarray(f["t0_fields/density"][i0:i1], dtype=np.float64), mx, my,
                               np.asarray(f["t0_fields/energy"][i0:i1], dtype=np.float64)), axis=2))

    height, width = (shape[3], shape[2]) if x_first else (shape[2], shape[3])
    return Source(path, name, family, int(shape[0]), (int(shape[1]), int(height), int(width)), times,
                  read, _file_size(path, storage_options))


# -- shared ------------------------------------------------------------------------------
def _check_sources(sources: list[Source]) -> None:
    first = sources[0]
    for s in sources:
        if s.shape[0] < 2:
            raise InputError(f"{s.path}: {s.shape[0]} time step; expected at least two")
        if s.n < 1:
            raise InputError(f"{s.path}: no trajectories")
        if s.family != first.family:
            raise InputError(f"{s.path}: holds {s.family} data but {first.path} holds {first.family} data")
        if s.shape != first.shape:
            raise InputError(f"{s.path}: (time, y, x) = {s.shape}; expected {first.shape} like {first.path}")
        if not np.allclose(s.times, first.times):
            raise InputError(f"{s.path}: its times differ from those of {first.path}")


def _ingest(kind: str, sources: list[Source], out: str, splits: Sequence[float], seed: int,
            storage_options, input_options) -> Dataset:
    _check_sources(sources)
    split_counts(1, splits)
    record = {"kind": kind, "splits": list(splits), "seed": seed,
              "files": [{"name": posixpath.basename(s.path), "size": s.size, "class": s.class_name,
                         "trajectories": s.n} for s in sources]}
    done = existing_or_none(out, record, storage_options)
    if done is not None:
        return done
    first = sources[0]
    channels = euler.CHANNELS if first.family == "euler" else ns.CHANNELS
    total = sum(s.n for s in sources)
    writer = DatasetWriter(out, n_trajectories=total, times=first.times, channels=channels,
                           resolution=first.shape[1:], family=first.family,
                           attributes={"ingested": record}, storage_options=storage_options)
    bar = progress(total, f"ingest {kind}", "traj")
    try:
        start = 0
        for s in sources:
            per_block = max(1, BLOCK_BYTES // (8 * len(channels) * int(np.prod(s.shape))))
            with open_h5(s.path, input_options) as f:
                for i0 in range(0, s.n, per_block):
                    i1 = min(i0 + per_block, s.n)
                    block = s.read(f, i0, i1)
                    bad = ~np.isfinite(block).all(axis=(2, 3, 4))
                    if bad.any():
                        i, t = np.argwhere(bad)[0]
                        raise InputError(f"{s.path}: non-finite value (NaN or inf) in trajectory "
                                         f"{i0 + i} at time step {t}")
                    writer.write(start + i0, block)
                    bar.update(i1 - i0)
            start += s.n
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    classes = [s.class_name for s in sources for _ in range(s.n)]
    sources_col = [f"{kind}:{posixpath.basename(s.path)}#{i}" for s in sources for i in range(s.n)]
    params = [{"file": posixpath.basename(s.path), "index": i} for s in sources for i in range(s.n)]
    return writer.finish(classes, split_trajectories(classes, splits, seed), sources_col, params, record)


def _paths(paths: Sequence[str] | str) -> list[str]:
    paths = [paths] if isinstance(paths, str) else [str(p) for p in paths]
    if not paths:
        raise InputError("no input files given")
    return paths


def ingest_pdegym(paths: Sequence[str] | str, out: str, class_name: str | None = None, *,
                  splits: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0,
                  storage_options: dict[str, Any] | None = None,
                  input_options: dict[str, Any] | None = None) -> Dataset:
    """PDEGym netCDF files (CE-RP, CE-CRP, CE-RPUI, NS-BB, NS-Gauss, NS-Sines) -> dataset at ``out``."""
    sources = [_inspect_pdegym(p, class_name, input_options) for p in _paths(paths)]
    return _ingest("pdegym", sources, out, splits, seed, storage_options, input_options)


def ingest_well(paths: Sequence[str] | str, out: str, class_name: str | None = None, *,
                splits: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0,
                storage_options: dict[str, Any] | None = None,
                input_options: dict[str, Any] | None = None) -> Dataset:
    """The Well HDF5 files (e.g. euler_multi_quadrants) -> dataset at ``out``."""
    sources = [_inspect_well(p, class_name, input_options) for p in _paths(paths)]
    return _ingest("well", sources, out, splits, seed, storage_options, input_options)
