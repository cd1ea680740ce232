"""`gradlake generate` and `gradlake ingest` end to end; the stored data read without gradlake."""

from __future__ import annotations

import h5py
import numpy as np
import pyarrow.dataset as pads
import pytest
import zarr


def test_generate_euler_conserves_mass_and_energy_in_stored_data(tmp_path, cli):
    out = str(tmp_path / "ce")
    code, stdout, _ = cli(["generate", "euler", "--classes", "rp,crp,rpui", "--trajectories", "2",
                           "--steps", "4", "--resolution", "24", "--out", out])
    assert code == 0
    assert stdout.strip().splitlines()[-1].startswith(f"generated euler dataset {out}: 6 trajectories x 4 steps")
    fields = zarr.open_group(f"{out}/fields.zarr", mode="r")["fields"][:].astype(np.float64)
    table = pads.dataset(f"{out}/trajectories.parquet").to_table()
    assert table.column("class").to_pylist() == ["rp", "rp", "crp", "crp", "rpui", "rpui"]
    totals = fields.sum(axis=(3, 4))  # [trajectory, time, channel]
    drift = np.abs(totals - totals[:, :1]) / np.abs(totals[:, :1])
    assert drift[..., 0].max() < 1e-5 and drift[..., 3].max() < 1e-5  # mass, energy (float32 storage)
    assert np.abs(fields[:, -1] - fields[:, 0]).max() > 0.05  # the flow developed
    # Same command again: nothing recomputed, same dataset.
    code, again, _ = cli(["generate", "euler", "--classes", "rp,crp,rpui", "--trajectories", "2",
                          "--steps", "4", "--resolution", "24", "--out", out])
    assert code == 0 and stdout.split("fingerprint")[1][:13] == again.split("fingerprint")[1][:13]


def test_generate_ns(tmp_path, cli):
    out = str(tmp_path / "ns")
    code, stdout, _ = cli(["generate", "ns", "--classes", "gauss", "--trajectories", "1", "--steps", "3",
                           "--resolution", "16", "--out", out])
    assert code == 0 and "ns dataset" in stdout
    assert zarr.open_group(f"{out}/fields.zarr", mode="r").attrs["channels"] == ["vx", "vy"]


@pytest.mark.parametrize("argv,message", [
    (["generate", "euler", "--classes", "rp,kh"], "'kh' is not a euler class"),
    (["generate", "ns", "--trajectories", "0"], "trajectories: expected int > 0"),
    (["generate", "euler", "--split-fractions", "0.5,0.5"], "--split-fractions"),
])
def test_generate_bad_settings(tmp_path, argv, message, cli):
    code, _, err = cli([*argv, "--out", str(tmp_path / "x")])
    assert code == 2 and message in err
    assert not (tmp_path / "x").exists()


def test_ingest_pdegym_and_well(tmp_path, cli):
    rng = np.random.default_rng(0)
    path = tmp_path / "data.nc"
    with h5py.File(path, "w") as f:
        f.create_dataset("velocity", data=rng.standard_normal((2, 3, 2, 4, 4)).astype(np.float32))
    code, stdout, _ = cli(["ingest", "pdegym", str(path), "--out", str(tmp_path / "a"), "--class", "bb"])
    assert code == 0 and "ingested ns dataset" in stdout and "bb 2" in stdout
    code, _, err = cli(["ingest", "pdegym", str(path), "--out", str(tmp_path / "b")])
    assert code == 2 and "--class" in err
    code, _, err = cli(["ingest", "well", str(path), "--out", str(tmp_path / "c")])
    assert code == 2 and "missing group 'dimensions'" in err
