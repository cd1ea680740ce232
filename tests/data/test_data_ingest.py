"""Ingest of PDEGym netCDF and The Well HDF5 files written here in their layouts."""

from __future__ import annotations

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from gradlake.data import Dataset
from gradlake.data.ingest import ingest_pdegym, ingest_well
from gradlake.errors import InputError

T, H, W = 3, 4, 6


def ce_data(n, seed=0, steps=T):
    """PDEGym CE layout [n, T, 5, y, x] with channels (rho, vx, vy, p, E)."""
    rng = np.random.default_rng(seed)
    rho = rng.uniform(0.5, 1.5, (n, steps, H, W))
    vx, vy = rng.uniform(-1, 1, (2, n, steps, H, W))
    p = rng.uniform(0.5, 1.5, (n, steps, H, W))
    energy = p / 0.4 + 0.5 * rho * (vx ** 2 + vy ** 2)
    return np.stack([rho, vx, vy, p, energy], axis=2).astype(np.float32)


def write_pdegym(path, variable="data", array=None, **extra):
    with h5py.File(path, "w") as f:
        f.create_dataset(variable, data=ce_data(2) if array is None else array)
        for name, value in extra.items():
            f.create_dataset(name, data=value)
    return str(path)


def write_well(path, n=2, steps=T, name="euler_multi_quadrants", layout="euler", drop=None, nan_at=None):
    """The Well layout: fields [n, time, x, y] (+ [.., 2] vectors), dims x then y."""
    rng = np.random.default_rng(1)
    with h5py.File(path, "w") as f:
        f.attrs["dataset_name"] = name
        f.attrs["n_spatial_dims"] = 2
        dims = f.create_group("dimensions")
        dims.attrs["spatial_dims"] = ["x", "y"]
        dims.create_dataset("time", data=np.linspace(0, 0.5, steps).astype(np.float32))
        dims.create_dataset("x", data=np.arange(W, dtype=np.float32))
        dims.create_dataset("y", data=np.arange(H, dtype=np.float32))
        t0, t1 = f.create_group("t0_fields"), f.create_group("t1_fields")
        f.create_group("t2_fields")
        fields = {}
        if layout == "euler":
            fields["t0_fields/density"] = rng.uniform(0.5, 1.5, (n, steps, W, H))
            fields["t0_fields/energy"] = rng.uniform(1, 3, (n, steps, W, H))
            fields["t0_fields/pressure"] = rng.uniform(0.5, 1.5, (n, steps, W, H))
            fields["t1_fields/momentum"] = rng.uniform(-1, 1, (n, steps, W, H, 2))
        else:
            fields["t1_fields/velocity"] = rng.uniform(-1, 1, (n, steps, W, H, 2))
        if nan_at is not None:
            fields[next(iter(fields))][nan_at] = np.nan
        for key, value in fields.items():
            if key != drop:
                (t0 if key.startswith("t0") else t1).create_dataset(key.split("/")[1], data=value.astype(np.float32))
    return str(path), fields


def test_pdegym_ce_to_conserved(tmp_path):
    a = write_pdegym(tmp_path / "CE-RP.nc", array=ce_data(2, seed=0))
    b = write_pdegym(tmp_path / "CE-RPUI.nc", array=ce_data(3, seed=1))
    out = str(tmp_path / "out")
    ds = ingest_pdegym([a, b], out)
    assert ds.family == "euler" and ds.channels == ("rho", "rho_vx", "rho_vy", "E")
    assert ds.classes.tolist() == ["rp"] * 2 + ["rpui"] * 3
    np.testing.assert_allclose(ds.times, [0, 0.5, 1.0])
    raw = ce_data(3, seed=1)
    stored = zarr.open_group(f"{out}/fields.zarr", mode="r")["fields"][2:5]
    np.testing.assert_allclose(stored[:, :, 0], raw[:, :, 0])
    np.testing.assert_allclose(stored[:, :, 1], raw[:, :, 0] * raw[:, :, 1], rtol=1e-6)
    np.testing.assert_allclose(stored[:, :, 2], raw[:, :, 0] * raw[:, :, 2], rtol=1e-6)
    np.testing.assert_allclose(stored[:, :, 3], raw[:, :, 4])
    table = pq.read_table(f"{out}/trajectories.parquet")
    assert table.column("source").to_pylist()[2] == "pdegym:CE-RPUI.nc#0"
    # Same input again: the existing dataset, untouched.
    assert ingest_pdegym([a, b], out).fingerprint == ds.fingerprint


def test_pdegym_ns_velocity_and_class_option(tmp_path):
    velocity = np.random.default_rng(2).standard_normal((2, T, 3, H, W)).astype(np.float32)
    path = write_pdegym(tmp_path / "NS-Sines.nc", "velocity", velocity)
    ds = ingest_pdegym([path], str(tmp_path / "a"))
    assert ds.family == "ns" and ds.channels == ("vx", "vy") and set(ds.classes) == {"sines"}
    np.testing.assert_array_equal(ds.read([0, 1]), velocity[:, :, :2])
    other = ingest_pdegym([path], str(tmp_path / "b"), class_name="mine")
    assert set(other.classes) == {"mine"}


def test_well_euler_layout_transposed(tmp_path):
    path, fields = write_well(tmp_path / "euler_multi_quadrants_periodicBC.hdf5")
    ds = ingest_well([path], str(tmp_path / "out"))
    assert ds.resolution == (H, W) and set(ds.classes) == {"euler_multi_quadrants"}
    np.testing.assert_allclose(ds.times, np.linspace(0, 0.5, T))
    data = ds.read([0, 1])
    to_yx = lambda a: np.swapaxes(a, -1, -2).astype(np.float32)  # noqa: E731
    np.testing.assert_array_equal(data[:, :, 0], to_yx(fields["t0_fields/density"]))
    np.testing.assert_array_equal(data[:, :, 1], to_yx(fields["t1_fields/momentum"][..., 0]))
    np.testing.assert_array_equal(data[:, :, 2], to_yx(fields["t1_fields/momentum"][..., 1]))
    np.testing.assert_array_equal(data[:, :, 3], to_yx(fields["t0_fields/energy"]))


def test_well_velocity_layout_and_class(tmp_path):
    path, fields = write_well(tmp_path / "shear.hdf5", layout="ns", name="shear_flow")
    ds = ingest_well([path], str(tmp_path / "out"), class_name="shear")
    assert ds.channels == ("vx", "vy") and set(ds.classes) == {"shear"}
    np.testing.assert_array_equal(ds.read([1])[0, :, 1], np.swapaxes(fields["t1_fields/velocity"][1, ..., 1], -1, -2)
                                  .astype(np.float32))


# -- bad input: a clear InputError and nothing written --------------------------------------
def expect_error(tmp_path, call, match):
    out = tmp_path / "out"
    with pytest.raises(InputError, match=match):
        call(str(out))
    assert not out.exists()


def test_missing_variable(tmp_path):
    path = write_pdegym(tmp_path / "CE-RP.nc", "solution")
    expect_error(tmp_path, lambda out: ingest_pdegym([path], out), "missing variable 'data'")


def test_missing_group_and_field(tmp_path):
    path = str(tmp_path / "x.hdf5")
    with h5py.File(path, "w") as f:
        f.create_group("dimensions")
    expect_error(tmp_path, lambda out: ingest_well([path], out), "missing group 't0_fields'")
    path2, _ = write_well(tmp_path / "y.hdf5", drop="t0_fields/energy")
    expect_error(tmp_path, lambda out: ingest_well([path2], out), "missing variable 't0_fields/energy'")


def test_wrong_rank(tmp_path):
    path = write_pdegym(tmp_path / "CE-RP.nc", array=ce_data(2)[:, 0])
    expect_error(tmp_path, lambda out: ingest_pdegym([path], out), "rank 4")


def test_mismatched_shapes_across_files(tmp_path):
    a = write_pdegym(tmp_path / "CE-RP.nc", array=ce_data(2))
    b = write_pdegym(tmp_path / "CE-CRP.nc", array=ce_data(2, steps=4))
    expect_error(tmp_path, lambda out: ingest_pdegym([a, b], out), r"CE-CRP.nc: \(time, y, x\) = \(4, 4, 6\)")


@pytest.mark.parametrize("bad,channel", [(np.nan, 4), (np.inf, 1)])
def test_non_finite_names_trajectory_and_time(tmp_path, bad, channel):
    data = ce_data(3)
    data[2, 1, channel, 0, 0] = bad
    a = write_pdegym(tmp_path / "CE-RP.nc", array=ce_data(2))
    b = write_pdegym(tmp_path / "CE-CRP.nc", array=data)
    expect_error(tmp_path, lambda out: ingest_pdegym([a, b], out), "CE-CRP.nc: non-finite .* trajectory 2 at time step 1")


def test_well_nan(tmp_path):
    path, _ = write_well(tmp_path / "w.hdf5", nan_at=(1, 2, 0, 0))
    expect_error(tmp_path, lambda out: ingest_well([path], out), "trajectory 1 at time step 2")


def test_fewer_than_two_time_steps(tmp_path):
    path = write_pdegym(tmp_path / "CE-RP.nc", array=ce_data(2, steps=1))
    expect_error(tmp_path, lambda out: ingest_pdegym([path], out), "at least two")


def test_unknown_class(tmp_path):
    path = write_pdegym(tmp_path / "mystery.nc")
    expect_error(tmp_path, lambda out: ingest_pdegym([path], out), "unknown class.*--class")
    expect_error(tmp_path, lambda out: ingest_pdegym([path], out, class_name="a b"), "--class")


def test_missing_file(tmp_path):
    expect_error(tmp_path, lambda out: ingest_pdegym([str(tmp_path / "CE-RP.nc")], out), "no such file")


def test_output_holding_a_different_dataset(tmp_path):
    a = write_pdegym(tmp_path / "CE-RP.nc", array=ce_data(2))
    b = write_pdegym(tmp_path / "CE-CRP.nc", array=ce_data(2, seed=5))
    out = str(tmp_path / "out")
    first = ingest_pdegym([a], out)
    with pytest.raises(InputError, match="different dataset.*files"):
        ingest_pdegym([b], out)
    assert Dataset.open(out).fingerprint == first.fingerprint


@pytest.mark.s3
def test_ingest_to_s3(tmp_path, s3_bucket):
    prefix, options = s3_bucket
    path = write_pdegym(tmp_path / "CE-RP.nc")
    ds = ingest_pdegym([path], f"{prefix}/ce", storage_options=options)
    assert Dataset.open(f"{prefix}/ce", options).n_trajectories == ds.n_trajectories == 2
