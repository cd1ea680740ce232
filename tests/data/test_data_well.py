"""The Well's HDF5 layout read in place: 1-D, 2-D and 3-D, local and fsspec URLs, bad files."""

import os

import h5py
import numpy as np
import pytest
import torch

from gradlake.data import Dataset
from gradlake.data.ingest import ingest_well
from gradlake.data.well import WellDataset
from gradlake.errors import InputError
from well_helpers import write_well


def _expected(fields, trajectory, d, steps):
    """[T, C, *grid] built channel by channel, grid in the file's order."""
    channels = [fields["t0_fields/density"][trajectory], fields["t0_fields/energy"][trajectory]]
    if "t0_fields/obstacle" in fields:
        channels.append(np.broadcast_to(fields["t0_fields/obstacle"], (steps, *fields["t0_fields/obstacle"].shape)))
    channels += [fields["t1_fields/momentum"][trajectory][..., a] for a in range(d)]
    if "t2_fields/stress" in fields:
        channels += [fields["t2_fields/stress"][trajectory][..., a, b] for a in range(d) for b in range(d)]
    return np.stack([np.asarray(c, dtype=np.float32) for c in channels], axis=1)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_a_well_file_is_read_in_place_in_any_dimension(tmp_path, d):
    path, fields = write_well(tmp_path / "toy_gamma_1.4.hdf5", d=d, tensor=True)
    before = sorted(os.listdir(tmp_path))
    ds = Dataset.open(path)
    assert isinstance(ds, WellDataset) and sorted(os.listdir(tmp_path)) == before  # nothing copied
    axes = "xyz"[:d]
    assert ds.channels == ("rho", "E", *[f"rho_v{a}" for a in axes], *[f"stress_{a}{b}" for a in axes for b in axes])
    grid = fields["t0_fields/density"].shape[2:]
    assert ds.resolution == tuple(grid) and ds.n_times == 4 and ds.n_trajectories == 3
    assert ds.manifest["dimension_names"][3:] == list(axes)
    np.testing.assert_allclose(ds.times, np.linspace(0, 1, 4), rtol=1e-6)
    data = ds.read([2, 0])
    for i, n in enumerate([2, 0]):
        np.testing.assert_array_equal(data[i], _expected(fields, n, d, 4))
    inputs, targets = ds.samples([ds.index().select(trajectories=[1])[2]])  # (trajectory 1, t = 2)
    np.testing.assert_array_equal(inputs[0], _expected(fields, 1, d, 4)[2])
    np.testing.assert_array_equal(targets[0], _expected(fields, 1, d, 4)[3])
    assert set(ds.classes) == {"toy_gamma_1.4"} and set(ds.splits) <= {"train", "val", "test"}


def test_in_place_equals_the_ingested_copy_channel_by_channel(tmp_path):
    path, _ = write_well(tmp_path / "toy.hdf5", d=2)
    in_place = Dataset.open(path)
    copied = ingest_well([path], str(tmp_path / "copy"))  # (rho, rho_vx, rho_vy, E), [y, x]
    a, b = in_place.read([0, 1, 2]), copied.read([0, 1, 2])  # in place: [x, y]
    for name in copied.channels:
        np.testing.assert_array_equal(np.swapaxes(a[:, :, in_place.channels.index(name)], -1, -2),
                                      b[:, :, copied.channels.index(name)])


def test_split_folders_constant_fields_and_an_fsspec_url(tmp_path):
    import fsspec

    for split, n in (("train", 3), ("valid", 1), ("test", 2)):
        (tmp_path / "ds" / "data" / split).mkdir(parents=True)
        write_well(tmp_path / "ds" / "data" / split / "toy.hdf5", n=n, constant=True, seed=n)
    ds = Dataset.open(str(tmp_path / "ds"))
    assert list(ds.splits) == ["train"] * 3 + ["val"] + ["test"] * 2
    assert "obstacle" in ds.channels
    _, fields = write_well(tmp_path / "again.hdf5", n=1, constant=True, seed=1)
    np.testing.assert_array_equal(ds.read([3])[0], _expected(fields, 0, 2, 4))
    memory = fsspec.filesystem("memory")
    with open(tmp_path / "again.hdf5", "rb") as src:
        memory.pipe("/well-test/toy.hdf5", src.read())
    remote = Dataset.open("memory://well-test")
    np.testing.assert_array_equal(remote.read([0])[0], _expected(fields, 0, 2, 4))
    assert remote.fingerprint != Dataset.open(str(tmp_path / "again.hdf5")).fingerprint  # the name differs
    import pickle  # the dataset travels to workers without its open files
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(remote)).read([0]), remote.read([0]))


def test_bad_files_are_refused_naming_them(tmp_path):
    path, _ = write_well(tmp_path / "a.hdf5")
    write_well(tmp_path / "b.hdf5", steps=5)
    with pytest.raises(InputError, match="b.hdf5: its time steps differ from those of .*a.hdf5"):
        Dataset.open(str(tmp_path))
    with h5py.File(path, "a") as f:
        del f.attrs["n_spatial_dims"]
    with pytest.raises(InputError, match="a.hdf5: no n_spatial_dims attribute"):
        Dataset.open(path)
    bad, _ = write_well(tmp_path / "c.hdf5")
    with h5py.File(bad, "a") as f:
        del f["t1_fields/momentum"]
        f["t1_fields"].create_dataset("momentum", data=np.zeros((3, 4, 6, 5, 3), np.float32))
    with pytest.raises(InputError, match=r"c.hdf5: t1_fields/momentum has shape \[3, 4, 6, 5, 3\]"):
        Dataset.open(bad)
    with pytest.raises(InputError, match="no complete gradlake dataset here .* and no HDF5 files"):
        Dataset.open(str(tmp_path / "nothing"))


def test_a_user_model_trains_and_gets_projected_gradients_on_3d_well_data_in_place(tmp_path):
    from gradlake.config import ModelConfig, TaskConfig, TrainConfig
    from gradlake.grads import Projector, compute
    from gradlake.models.checkpoint import load_checkpoint
    from gradlake.plugins import use_paths
    from gradlake.train import train

    use_paths([os.path.join(os.path.dirname(__file__), "..", "..", "examples")])
    path, _ = write_well(tmp_path / "toy.hdf5", d=3, n=4)
    ds = Dataset.open(path)
    model = ModelConfig(path="byo_surrogate.model:ResidualConvNet", kwargs={"channels": 5, "width": 4, "dims": 3})
    paths = train(path, model, TrainConfig(epochs=1, batch_size=4), str(tmp_path / "run"),
                  task=TaskConfig("byo_surrogate.task:RelativeL2Task"))
    net, meta = load_checkpoint(paths[-1])
    assert meta["dataset"]["fingerprint"] == ds.fingerprint
    x, y = ds.samples([0, 1])
    phi = compute(net, x, y, ("C", "M", "V"), Projector(seed=0, k_in=4, k_out=4), channels=ds.channels,
                  sample_ids=[0, 1])
    assert phi["C"].shape[0] == 2 and torch.isfinite(phi["C"]).all() and torch.isfinite(phi["M"]).all()
