"""The dataset format: round trips through plain zarr / pyarrow, URLs, index, splits."""

from __future__ import annotations

import json

import fsspec
import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import zarr

from gradlake.config import DataConfig
from gradlake.data import Dataset, DatasetWriter, generate, split_trajectories
from gradlake.data.format import trajectory_checksum
from gradlake.data.index import split_counts
from gradlake.errors import GradlakeError, InputError

CLASSES = ["a", "a", "b", "b", "b"]


def write_random(url, storage_options=None, seed=0, block=2):
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((5, 3, 2, 4, 6)).astype(np.float32)
    writer = DatasetWriter(url, n_trajectories=5, times=[0, 0.5, 1.0], channels=("u", "v"),
                           resolution=(4, 6), family="test", storage_options=storage_options)
    for start in range(0, 5, block):
        writer.write(start, data[start:start + block])
    ds = writer.finish(CLASSES, split_trajectories(CLASSES, seed=seed), ["src"] * 5,
                       [{"i": i} for i in range(5)], {"kind": "test", "seed": seed})
    return ds, data


def test_round_trip_plain_readers(tmp_path):
    url = str(tmp_path / "ds")
    ds, data = write_random(url)
    group = zarr.open_group(f"{url}/fields.zarr", mode="r")
    array = group["fields"]
    np.testing.assert_array_equal(array[:], data)
    assert array.dtype == np.float32 and array.chunks == (1, 3, 2, 4, 6)
    assert tuple(array.metadata.dimension_names) == ("trajectory", "time", "channel", "y", "x")
    assert group.attrs["channels"] == ["u", "v"] and array.attrs["family"] == "test"
    table = pads.dataset(f"{url}/trajectories.parquet").to_table()
    assert table.column("trajectory").to_pylist() == list(range(5))
    assert table.column("class").to_pylist() == CLASSES
    assert json.loads(table.column("params")[3].as_py()) == {"i": 3}
    assert table.column("checksum")[1].as_py() == trajectory_checksum(data[1])
    manifest = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert manifest["fingerprint"] == ds.fingerprint and manifest["shape"] == [5, 3, 2, 4, 6]
    # Through gradlake
    assert (ds.n_trajectories, ds.n_times, ds.channels, ds.resolution) == (5, 3, ("u", "v"), (4, 6))
    np.testing.assert_array_equal(ds.read([4, 0, 4]), data[[4, 0, 4]])
    inputs, targets = ds.samples([0, 3, 9])  # (0,0) (1,1) (4,1)
    np.testing.assert_array_equal(inputs, data[[0, 1, 4], [0, 1, 1]])
    np.testing.assert_array_equal(targets, data[[0, 1, 4], [1, 2, 2]])
    ds.verify()


@pytest.mark.parametrize("grid,names", [((7,), ("x",)), ((3, 4, 5), ("z", "y", "x"))])
def test_one_and_three_dimensional_grids_round_trip(tmp_path, grid, names):
    rng = np.random.default_rng(2)
    data = rng.standard_normal((2, 3, 2, *grid)).astype(np.float32)
    writer = DatasetWriter(str(tmp_path / "ds"), n_trajectories=2, times=[0, 1, 2], channels=("u", "v"),
                           resolution=grid, family="test")
    writer.write(0, data)
    ds = writer.finish(["a", "b"], ["train", "test"], ["src"] * 2, [{}] * 2, {})
    array = zarr.open_group(str(tmp_path / "ds" / "fields.zarr"), mode="r")["fields"]
    assert tuple(array.metadata.dimension_names) == ("trajectory", "time", "channel", *names)
    assert ds.resolution == grid and ds.manifest["dimension_names"][3:] == list(names)
    inputs, targets = ds.samples([3])  # trajectory 1, t = 1
    np.testing.assert_array_equal(inputs[0], data[1, 1])
    np.testing.assert_array_equal(targets[0], data[1, 2])
    ds.verify()
    with pytest.raises(InputError, match="1, 2 or 3 axes"):
        DatasetWriter(str(tmp_path / "4d"), n_trajectories=1, times=[0, 1], channels=("u",),
                      resolution=(2, 2, 2, 2), family="test")


def test_fingerprint_deterministic_and_content_sensitive(tmp_path):
    a, _ = write_random(str(tmp_path / "a"))
    b, _ = write_random(str(tmp_path / "b"), block=3)
    c, _ = write_random(str(tmp_path / "c"), seed=1)
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_verify_detects_tampering(tmp_path):
    url = str(tmp_path / "ds")
    write_random(url)
    array = zarr.open_group(f"{url}/fields.zarr", mode="r+")["fields"]
    array[2, 1, 0, 0, 0] = 123.0
    with pytest.raises(GradlakeError, match="trajectory 2"):
        Dataset.open(url).verify()


def test_incomplete_dataset_is_not_a_dataset_and_is_replaced(tmp_path):
    url = str(tmp_path / "ds")
    writer = DatasetWriter(url, n_trajectories=2, times=[0, 1], channels=("u",), resolution=(2, 2),
                           family="test")
    writer.write(0, np.zeros((1, 2, 1, 2, 2)))
    with pytest.raises(InputError, match="dataset.json missing"):
        Dataset.open(url)
    with pytest.raises(GradlakeError, match="trajectory 1 was never written"):
        writer.finish(["a", "a"], ["train", "test"], ["s", "s"], [{}, {}], {})
    ds, _ = write_random(url)  # a new writer replaces the leftovers
    assert ds.n_trajectories == 5


def test_refuses_foreign_or_complete_targets(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="notes.txt"):
        write_random(str(tmp_path / "x"))
    write_random(str(tmp_path / "y"))
    with pytest.raises(InputError, match="already holds a complete dataset"):
        write_random(str(tmp_path / "y"))


def test_memory_url():
    url = "memory://gradlake-test-format/ds"
    try:
        ds, data = write_random(url)
        reopened = Dataset.open(url)
        np.testing.assert_array_equal(reopened.read([1]), data[[1]])
        assert zarr.open_group(f"{url}/fields.zarr", mode="r")["fields"].shape == data.shape
    finally:
        fsspec.filesystem("memory").rm("/gradlake-test-format", recursive=True)


@pytest.mark.s3
def test_s3_url(s3_bucket):
    prefix, options = s3_bucket
    url = f"{prefix}/ds"
    ds, data = write_random(url, storage_options=options)
    np.testing.assert_array_equal(Dataset.open(url, options).read([2, 3]), data[2:4])
    group = zarr.open_group(f"{url}/fields.zarr", mode="r", storage_options=options)
    np.testing.assert_array_equal(group["fields"][0], data[0])
    fs = fsspec.filesystem("s3", **options)
    assert pq.read_table(f"{url[5:]}/trajectories.parquet", filesystem=fs).num_rows == 5


def test_read_out_of_range(tmp_path):
    ds, _ = write_random(str(tmp_path / "ds"))
    with pytest.raises(InputError, match="0..4"):
        ds.read([5])
    with pytest.raises(InputError, match="0..9"):
        ds.samples([10])


def test_sample_index(tmp_path):
    ds, _ = write_random(str(tmp_path / "ds"))
    index = ds.index()
    assert len(index) == 10
    table = index.table
    assert table.column("row").to_pylist() == list(range(10))
    assert table.column("trajectory").to_pylist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert table.column("t").to_pylist() == [0, 1] * 5
    assert table.column("class").to_pylist() == [c for c in CLASSES for _ in range(2)]
    np.testing.assert_array_equal(index.select(classes="b"), [4, 5, 6, 7, 8, 9])
    np.testing.assert_array_equal(index.select(classes=["a"], t_min=1), [1, 3])
    np.testing.assert_array_equal(index.select(t_max=0, trajectories=[4, 1]), [2, 8])
    splits = ds.splits
    expected = [r for r in range(10) if splits[r // 2] == "train"]
    np.testing.assert_array_equal(index.select(splits="train"), expected)
    trajectory, t = index.locate([0, 7, 9])
    assert trajectory.tolist() == [0, 3, 4] and t.tolist() == [0, 1, 1]


def test_split_counts_and_stratification():
    assert split_counts(20) == (13, 1, 6)
    assert split_counts(1) == (1, 0, 0)
    assert split_counts(2, (0.0, 0.5, 0.5))[0] == 1  # at least one in train
    classes = ["x"] * 20 + ["y"] * 10
    splits = split_trajectories(classes, seed=3)
    assert splits == split_trajectories(classes, seed=3) != split_trajectories(classes, seed=4)
    x_splits = [s for c, s in zip(classes, splits) if c == "x"]
    assert (x_splits.count("train"), x_splits.count("val"), x_splits.count("test")) == (13, 1, 6)
    # A class's split does not depend on the other classes present.
    assert split_trajectories(["y"] * 10, seed=3) == splits[20:]
    with pytest.raises(InputError, match="splits"):
        split_counts(4, (0.5, 0.5, 0.5))


def test_generate_idempotent_and_refuses_different(tmp_path):
    url = str(tmp_path / "gen")
    config = DataConfig(classes=("rp",), trajectories=2, steps=3, resolution=16, output_dt=0.01)
    ds = generate(config, url)
    stamp = (tmp_path / "gen" / "dataset.json").stat().st_mtime_ns
    again = generate(config, url)
    assert again.fingerprint == ds.fingerprint
    assert (tmp_path / "gen" / "dataset.json").stat().st_mtime_ns == stamp  # nothing recomputed
    with pytest.raises(InputError, match=r"seed: 0 there, 5 asked"):
        generate(DataConfig(**{**config.__dict__, "seed": 5}), url)
    assert Dataset.open(url).fingerprint == ds.fingerprint
    with pytest.raises(InputError, match="data.classes"):
        generate(DataConfig(classes=("bb",)), str(tmp_path / "other"))
    assert not (tmp_path / "other").exists()


def test_open_checked_opens_only_the_recorded_dataset(tmp_path):
    from gradlake.data import open_checked

    ds, _ = write_random(str(tmp_path / "ds"))
    other, _ = write_random(str(tmp_path / "other"), seed=1)
    assert open_checked(ds.url, ds.fingerprint).fingerprint == ds.fingerprint
    with pytest.raises(InputError, match=rf"{other.fingerprint[:12]} is not {ds.fingerprint[:12]}.*--data"):
        open_checked(other.url, ds.fingerprint)
    with pytest.raises(InputError, match="moved, pass its new URL with --data"):
        open_checked(str(tmp_path / "gone"), ds.fingerprint)
