"""Store layout at scale: compaction, plain readers (pyarrow, DuckDB, xarray), damage, the lease."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from gradlake.errors import GradlakeError, InputError
from gradlake.provenance import description_of
from gradlake.store import GradientStore, Lease, ShardWriter, compact, create_store
from gradlake.store.layout import StoreFiles
from gradlake.store.spec import shard_rows_for
from test_store_io import CKPT, CLASSES, N, SPLITS, STEPS, fake_phis, fill, index_table, make_spec


def plain_rows(url):
    """Rows a plain pyarrow reader of the documented path sees (hive partitioning)."""
    path = os.path.join(url, "samples.parquet")
    if not os.path.exists(path):
        return []
    return sorted(pads.dataset(path, partitioning="hive").to_table()["row"].to_pylist())


def shard_rows(spec, held, shards):
    return sorted(int(r) for r in held if r // spec.shard_rows in shards)


def commit_half(url, spec, held, shard):
    """A shard whose gradient rows are written but whose commit never happens (killed)."""
    def die():
        raise RuntimeError("killed before the commit")

    rows = held[held // spec.shard_rows == shard]
    phis, loss = fake_phis(rows)
    with pytest.raises(RuntimeError):
        ShardWriter(url).commit("epoch-1", shard, index_table(rows), loss, phis, before_record=die)


def test_compaction_keeps_every_committed_row_once_and_hides_uncommitted_ones(tmp_path):
    url = str(tmp_path / "store")
    spec, held = make_spec(shard_rows=8)  # 7 shards: 0..6
    create_store(url, spec, CKPT)
    fill(url, spec, held, shards=[0, 2, 3])
    commit_half(url, spec, held, 1)
    assert plain_rows(url) == []  # nothing compacted yet: plain readers see nothing
    assert GradientStore.open(url, allow_partial=True).rows().tolist() == shard_rows(spec, held, {0, 2, 3})

    assert compact(GradientStore.open(url)) == {"epoch-1": 3}
    assert plain_rows(url) == shard_rows(spec, held, {0, 2, 3})  # not shard 1's rows
    assert os.listdir(os.path.join(url, "commits", "epoch-1")) == []

    fill(url, spec, held, shards=[1, 4, 5, 6])  # the rest, into the same group file
    store = GradientStore.open(url, allow_partial=True)
    assert store.rows().tolist() == list(range(N)) and store.is_complete()
    assert compact(store) == {"epoch-1": 4} and compact(store) == {"epoch-1": 0}  # idempotent
    assert plain_rows(url) == list(range(N))
    assert store.rows().tolist() == list(range(N)) and store.is_complete()
    table = store.samples()
    np.testing.assert_array_equal(table["shard"].to_numpy(), np.arange(N) // spec.shard_rows)
    np.testing.assert_allclose(table["loss"].to_numpy(), fake_phis(np.arange(N))[1])
    assert store.provenance["checkpoints"]["epoch-1"]["compacted"] == {"0": [[0, 6]]}
    for part in (tmp_path / "store" / "samples.parquet").rglob("*.parquet"):  # provenance, not a commit record
        about = description_of(pq.read_schema(part))
        assert about["format"] == "gradlake-samples/1" and about["store"] == url and about["gradlake_version"]
        assert (about["checkpoint"], about["checkpoint_sha256"]) == ("epoch-1", CKPT["epoch-1"]["sha256"])
        assert about["dataset"] == spec.dataset and set(pq.read_schema(part).metadata) == {b"gradlake"}


def test_compaction_groups_make_few_files(tmp_path, monkeypatch):
    import gradlake.store.layout as layout

    monkeypatch.setattr(layout, "GROUP_ROWS", 16)  # 2 shards of 8 rows per file
    url = str(tmp_path / "store")
    spec, held = make_spec(shard_rows=8)
    create_store(url, spec, CKPT)
    fill(url, spec, held)
    compact(GradientStore.open(url))
    files = sorted(os.listdir(os.path.join(url, "samples.parquet", "checkpoint=epoch-1")))
    assert files == [f"part-{g:06d}.parquet" for g in range(4)]
    assert plain_rows(url) == list(range(N))


@pytest.mark.parametrize("crash", ["after_files", "before_delete"])
def test_a_killed_compaction_loses_and_duplicates_nothing(tmp_path, monkeypatch, crash):
    url = str(tmp_path / "store")
    spec, held = make_spec(shard_rows=8)
    create_store(url, spec, CKPT)
    fill(url, spec, held, shards=[0, 1])
    compact(GradientStore.open(url))
    fill(url, spec, held, shards=[2, 3, 5])

    def kill(*args, **kwargs):
        raise KeyboardInterrupt

    store = GradientStore.open(url, allow_partial=True)
    with pytest.raises(KeyboardInterrupt):
        if crash == "after_files":  # group file rewritten, store.json not yet
            compact(store, after_files=kill)
        else:  # store.json written, commit files not yet deleted
            monkeypatch.setattr(type(store._files.fs), "rm", kill)
            compact(store)
    monkeypatch.undo()
    committed = shard_rows(spec, held, {0, 1, 2, 3, 5})
    assert plain_rows(url) == committed  # each committed row once
    store = GradientStore.open(url, allow_partial=True)
    assert store.rows().tolist() == committed and store.committed_shards() == {0, 1, 2, 3, 5}
    compact(store)  # the next pass finishes the job
    assert plain_rows(url) == committed and os.listdir(os.path.join(url, "commits", "epoch-1")) == []
    assert GradientStore.open(url, allow_partial=True).rows().tolist() == committed


def test_duckdb_and_xarray_read_the_store(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    xr = pytest.importorskip("xarray")
    url = str(tmp_path / "store")
    spec, held = make_spec(shard_rows=8)
    index = index_table(np.arange(N))
    create_store(url, spec, CKPT, index=index)
    fill(url, spec, held)
    compact(GradientStore.open(url))

    count, rp = duckdb.sql(
        f"select count(*), count(distinct row) filter (where class = 'rp') from "
        f"read_parquet('{url}/samples.parquet/*/*.parquet', hive_partitioning = true) "
        f"where checkpoint = 'epoch-1'").fetchall()[0]
    assert count == N and rp == (CLASSES[np.arange(N) // STEPS] == "rp").sum()

    root = json.loads(open(os.path.join(url, "grads.zarr", "zarr.json")).read())
    assert "epoch-1/C" in root["consolidated_metadata"]["metadata"]
    ds = xr.open_zarr(os.path.join(url, "grads.zarr"), group="epoch-1", consolidated=True)
    assert ds["C"].dims == ("sample", "proj") and ds["V"].dims == ("sample", "probe", "proj")
    assert set(ds.coords) == {"trajectory", "t", "class", "split"}
    assert all(ds[c].dims == ("sample",) for c in ds.coords)
    traj = np.arange(N) // STEPS
    np.testing.assert_array_equal(ds["trajectory"].values, traj)
    np.testing.assert_array_equal(ds["t"].values, np.arange(N) % STEPS)
    assert ds["class"].values.tolist() == CLASSES[traj].tolist()
    assert ds["split"].values.tolist() == SPLITS[traj].tolist()
    phis, _ = fake_phis(np.arange(N))
    rp = ds["C"].where(ds["class"] == "rp", drop=True)
    np.testing.assert_array_equal(rp.values, phis["C"][CLASSES[traj] == "rp"].astype(np.float16))


@pytest.mark.parametrize("chunk, shard", [(16, 32), (16, 1 << 20), (1 << 20, 1 << 24)])
def test_coordinates_in_chunks_and_shards_of_any_size(tmp_path, monkeypatch, chunk, shard):
    import zarr

    import gradlake.store.writer as writer

    monkeypatch.setattr(writer, "COORDINATE_CHUNK_ROWS", chunk)
    monkeypatch.setattr(writer, "COORDINATE_SHARD_ROWS", shard)
    url = str(tmp_path / "store")
    spec, _ = make_spec()
    create_store(url, spec, CKPT, index=index_table(np.arange(N)))
    group = zarr.open_group(os.path.join(url, "grads.zarr", "epoch-1"), mode="r")
    np.testing.assert_array_equal(group["trajectory"][:], np.arange(N) // STEPS)
    assert group["split"][:].tolist() == SPLITS[np.arange(N) // STEPS].tolist()


def test_a_deleted_shard_object_is_a_named_error(tmp_path):
    url = str(tmp_path / "store")
    spec, held = make_spec(shard_rows=16)
    create_store(url, spec, CKPT)
    fill(url, spec, held)
    os.remove(os.path.join(url, "grads.zarr", "epoch-1", "V", "c", "2", "0", "0"))
    store = GradientStore.open(url)
    summary = store.summary()["checkpoints"]["epoch-1"]
    assert not summary["complete"] and summary["missing_data"] == {"V": [2]}
    message = r"checkpoint epoch-1, array grads.zarr/epoch-1/V: the data of committed shard 2 \(rows 32..47\)"
    with pytest.raises(GradlakeError, match=message):
        store.read("epoch-1", "V")
    with pytest.raises(GradlakeError, match=message):
        store.read("epoch-1", "V", [3, 40])
    np.testing.assert_array_equal(store.read("epoch-1", "V", [3, 20]).shape, (2, 2, 8))  # other shards read
    store.read("epoch-1", "C")  # the other array is whole


@pytest.mark.parametrize("content", [b"", b'{"format": "gradlake-store", "spe', b"\xff\xfe"])
def test_empty_or_truncated_store_json_is_an_input_error(tmp_path, content):
    url = str(tmp_path / "store")
    spec, _ = make_spec()
    create_store(url, spec, CKPT)
    with open(os.path.join(url, "store.json"), "wb") as f:
        f.write(content)
    with pytest.raises(InputError, match=r"store.json: not valid JSON \(empty or truncated\?\)"):
        GradientStore.open(url)


def test_a_second_driver_is_refused_and_a_stale_lease_taken_over(tmp_path):
    files = StoreFiles(str(tmp_path / "store"))
    with Lease(files, "first") as first:
        with pytest.raises(InputError, match=r"being written by .*first.*lease expires in"):
            Lease(files, "second").acquire()
        first.renew()
    assert not files.exists("lease.json")  # released
    files.write_json("lease.json", {"owner": "elsewhere:1:x", "purpose": "old", "expires": time.time() - 1})
    with Lease(files, "second") as second:  # expired: taken over
        assert files.read_json("lease.json")["owner"] == second.owner
        files.write_json("lease.json", {"owner": "other:2:y", "expires": time.time() + 60})
        with pytest.raises(GradlakeError, match="was taken by other:2:y"):
            second.renew()


def test_a_dead_local_drivers_lease_is_taken_over(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    files = StoreFiles(str(tmp_path / "store"))
    files.write_json("lease.json", {"owner": f"{socket.gethostname()}:{proc.stdout.strip()}:z",
                                    "expires": time.time() + 60})
    with Lease(files, "next"):
        pass
    files.write_json("lease.json", {"owner": f"{socket.gethostname()}:{os.getpid()}:other",  # alive
                                    "expires": time.time() + 60})
    with pytest.raises(InputError, match="being written by"):
        Lease(files, "next").acquire()


def test_auto_shard_rows_give_large_objects_and_enough_shards():
    assert shard_rows_for(10_000_000, 1024) == 131072  # 128 MiB shards of 1 KiB rows
    assert shard_rows_for(10_000_000, 64 * 1024) == 2048  # k = 16384, float16, 2 probes
    assert shard_rows_for(100_000, 1024) == 2048  # small data: at least 32 shards
    assert shard_rows_for(10, 1024) == 1


@pytest.mark.s3
def test_on_s3_compaction_damage_and_lease(s3_bucket):
    import fsspec

    url, options = s3_bucket[0] + "/runs/store", s3_bucket[1]
    spec, held = make_spec(shard_rows=16)
    create_store(url, spec, CKPT, storage_options=options, index=index_table(np.arange(N)))
    fill(url, spec, held, shards=[0, 1, 2], storage_options=options)
    assert compact(GradientStore.open(url, options)) == {"epoch-1": 3}
    fill(url, spec, held, shards=[3], storage_options=options)
    fs, root = fsspec.core.url_to_fs(url, **options)
    plain = pads.dataset(f"{root}/samples.parquet", filesystem=fs, partitioning="hive").to_table()
    assert sorted(plain["row"].to_pylist()) == list(range(48))  # shard 3 not compacted yet
    store = GradientStore.open(url, options)
    assert store.rows().tolist() == list(range(N)) and store.is_complete()
    fs.rm(f"{root}/grads.zarr/epoch-1/C/c/1/0")
    store = GradientStore.open(url, options)
    assert store.missing_data() == {"C": [1]} and not store.is_complete()
    with pytest.raises(GradlakeError, match=r"array grads.zarr/epoch-1/C: the data of committed shard 1"):
        store.read(None, "C", [20])
    files = StoreFiles(url, options)
    with Lease(files, "first"):
        with pytest.raises(InputError, match="being written by"):
            Lease(files, "second").acquire()
    fs.pipe_file(f"{root}/store.json", b'{"format": ')
    with pytest.raises(InputError, match="not valid JSON"):
        GradientStore.open(url, options)


def test_samples_of_a_shard_range_read_only_those_shards(tmp_path):
    url = str(tmp_path / "store")
    spec, held = make_spec(shard_rows=8)  # 7 shards: 0..6
    create_store(url, spec, CKPT)
    fill(url, spec, held, shards=[0, 2, 3])
    compact(GradientStore.open(url))  # 0, 2, 3 in a samples.parquet file, 1 and 4 in commits/
    fill(url, spec, held, shards=[1, 4])
    store = GradientStore.open(url, allow_partial=True)
    committed = {0, 1, 2, 3, 4}
    for first, stop in [(0, 7), (0, 1), (1, 3), (3, 5), (5, 7)]:
        inside = committed & set(range(first, stop))
        assert store.rows(shards=(first, stop)).tolist() == shard_rows(spec, held, inside)
        table = store.samples(where="t < 2", shards=(first, stop))
        assert table["row"].to_pylist() == [r for r in shard_rows(spec, held, inside)
                                            if r in set(store.rows(where="t < 2").tolist())]
    with open(os.path.join(url, "commits", "epoch-1", "shard-000004.parquet"), "wb") as f:
        f.write(b"not parquet")  # a file outside the range is never opened
    assert store.rows(shards=(0, 4)).tolist() == shard_rows(spec, held, {0, 1, 2, 3})
    with pytest.raises(GradlakeError, match="commits/epoch-1/shard-000004.parquet cannot be read"):
        store.rows()  # (the whole table does open it)
