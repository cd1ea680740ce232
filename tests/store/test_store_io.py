"""The gradient store on random arrays: round trips, commits, refusals, checksums."""

import json
import os

import numpy as np
import pyarrow as pa
import pytest

from gradlake.errors import GradlakeError, InputError
from gradlake.store import GradientStore, ShardWriter, StoreSpec, compact, create_store
from gradlake.store.spec import chunk_rows_for

N_TRAJ, STEPS = 10, 5  # 5 samples per trajectory -> 50 rows
N = N_TRAJ * STEPS
K, PROBES = 8, 2
SPLITS = np.array(["train", "train", "val", "test", "train", "train", "test", "train", "val", "train"])
CLASSES = np.array(["rp", "crp"] * 5)


def index_table(rows):
    rows = np.asarray(rows, dtype=np.int64)
    traj = rows // STEPS
    return pa.table({"row": rows, "trajectory": traj, "t": (rows % STEPS).astype(np.int32),
                     "class": CLASSES[traj], "split": SPLITS[traj]})


def make_spec(splits=("train", "val", "test"), seed=0, shard_rows=16, dtype="float16"):
    held = np.flatnonzero(np.isin(SPLITS[np.arange(N) // STEPS], splits))
    shards = np.unique(held // shard_rows)
    return StoreSpec(
        dataset={"url": "mem://data", "fingerprint": "f" * 64, "family": "euler"},
        model={"name": "unet", "width": 4}, projector={"seed": seed, "kind": "rademacher"},
        observables=("C", "V"), probes=PROBES, probe_seed=0, k=K, dtype=dtype, n_rows=N,
        shard_rows=shard_rows, chunk_rows=chunk_rows_for(shard_rows, K * 2, target=4 * K * 2),
        splits=tuple(splits), n_samples=len(held), n_shards=len(shards),
    ), held


def fake_phis(rows, checkpoint="epoch-1"):
    rng = np.random.default_rng(abs(hash(checkpoint)) % 1000)
    full_c = rng.standard_normal((N, K)).astype(np.float32)
    full_v = rng.standard_normal((N, PROBES, K)).astype(np.float32)
    return {"C": full_c[rows], "V": full_v[rows]}, (np.arange(N, dtype=np.float32) / N + 0.1)[rows]


def fill(url, spec, held, checkpoint="epoch-1", shards=None, storage_options=None):
    writer = ShardWriter(url, storage_options)
    for shard in np.unique(held // spec.shard_rows) if shards is None else shards:
        rows = held[held // spec.shard_rows == shard]
        phis, loss = fake_phis(rows, checkpoint)
        writer.commit(checkpoint, int(shard), index_table(rows), loss, phis)


CKPT = {"epoch-1": {"sha256": "a" * 64, "path": "/ck/epoch-1"}}


@pytest.fixture(params=["committed", "compacted"])
def full_store(tmp_path, request):
    url = str(tmp_path / "store")
    spec, held = make_spec()
    create_store(url, spec, CKPT)
    fill(url, spec, held)
    if request.param == "compacted":
        compact(GradientStore.open(url))
    return url, spec, held


def test_round_trip_reads_what_was_written(full_store):
    url, spec, held = full_store
    store = GradientStore.open(url)
    assert store.checkpoints == ["epoch-1"] and store.observables == ["C", "V"] and store.k == K
    assert store.is_complete()
    phis, loss = fake_phis(np.arange(N))
    expected_c = phis["C"].astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(store.read("epoch-1", "C"), expected_c)
    np.testing.assert_array_equal(store.read(None, "V"), phis["V"].astype(np.float16).astype(np.float32))
    rows = np.array([33, 2, 17, 2, 49])  # any order, duplicates, several shards
    np.testing.assert_array_equal(store.read("epoch-1", "C", rows), expected_c[rows])
    blocks = list(store.iter_blocks("epoch-1", "C", rows=rows, block_rows=2))
    assert [len(r) for r, _ in blocks] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), expected_c[rows])
    stored = store.read("epoch-1", "C", rows, dtype=np.float16)  # as stored, not cast
    assert stored.dtype == np.float16 and np.array_equal(stored, phis["C"].astype(np.float16)[rows])
    tensor = store.read("epoch-1", "C", rows, as_torch=True)
    assert tensor.dtype.is_floating_point and tuple(tensor.shape) == (5, K)

    table = store.samples()
    assert table.column_names[:8] == ["row", "trajectory", "t", "class", "split", "shard", "loss", "norm_C"]
    np.testing.assert_array_equal(table["row"].to_numpy(), np.arange(N))
    np.testing.assert_array_equal(table["shard"].to_numpy(), np.arange(N) // spec.shard_rows)
    np.testing.assert_allclose(table["loss"].to_numpy(), loss)
    np.testing.assert_allclose(table["norm_V"].to_numpy(),
                               np.linalg.norm(phis["V"].reshape(N, -1), axis=1), rtol=1e-6)
    assert set(table["checkpoint"].to_pylist()) == {"epoch-1"}


def test_filters_select_rows(full_store):
    url, _, _ = full_store
    store = GradientStore.open(url)
    traj = np.arange(N) // STEPS
    expected = np.flatnonzero((CLASSES[traj] == "rp") & (np.arange(N) % STEPS < 2))
    np.testing.assert_array_equal(store.rows(where="class == 'rp' and t < 2"), expected)
    np.testing.assert_array_equal(store.rows(classes=["rp"], t_max=1), expected)
    np.testing.assert_array_equal(store.rows(splits=["val"], trajectories=[2, 3]), np.arange(10, 15))
    with pytest.raises(InputError, match="unknown column 'cls'.*norm_V"):
        store.samples(where="cls == 'rp'")


def test_summary_counts_shards_and_bytes(full_store):
    url, spec, _ = full_store
    summary = GradientStore.open(url).summary()
    assert summary["checkpoints"]["epoch-1"]["shards_done"] == spec.n_shards == 4
    assert summary["n_rows"] == N and summary["k"] == K and summary["dtype"] == "float16"
    assert summary["bytes"] > N * K * 2 * (1 + PROBES)
    assert summary["provenance"]["projector"] == {"seed": 0, "kind": "rademacher"}


def test_plain_zarr_and_pyarrow_read_the_store(full_store):
    import pyarrow.dataset as pads
    import zarr

    url, _, _ = full_store
    compact(GradientStore.open(url))
    table = pads.dataset(os.path.join(url, "samples.parquet"), partitioning="hive").to_table()
    assert sorted(table["row"].to_pylist()) == list(range(N))
    array = zarr.open_array(os.path.join(url, "grads.zarr", "epoch-1", "C"), mode="r")
    assert array.metadata.dimension_names == ("sample", "proj") and array.dtype == np.float16
    phis, _ = fake_phis(np.arange(N))
    np.testing.assert_array_equal(array[:], phis["C"].astype(np.float16))


def test_uncommitted_shard_is_invisible_and_refused(tmp_path):
    url = str(tmp_path / "store")
    spec, held = make_spec()
    create_store(url, spec, CKPT)
    fill(url, spec, held, shards=[0, 2])

    def die():
        raise RuntimeError("killed before the record")

    rows = held[held // spec.shard_rows == 1]
    phis, loss = fake_phis(rows)
    with pytest.raises(RuntimeError):
        ShardWriter(url).commit("epoch-1", 1, index_table(rows), loss, phis, before_record=die)
    store = GradientStore.open(url)
    assert store.committed_shards() == {0, 2} and not store.is_complete()
    with pytest.raises(InputError, match=r"only 2 of 4 shards are committed.*gradlake grads --data mem://data "
                                         r"--checkpoint /ck/epoch-1 --out .*--allow-partial"):
        store.samples()  # never a silent part of the answer
    with pytest.raises(InputError, match="only 2 of 4 shards"):
        store.read("epoch-1", "C")
    store = GradientStore.open(url, allow_partial=True)
    assert set(np.unique(store.samples()["shard"].to_numpy())) == {0, 2}
    with pytest.raises(GradlakeError, match="shard 1 .*not committed"):
        store.read("epoch-1", "C", [3, 20])


def test_held_splits_only(tmp_path):
    url = str(tmp_path / "store")
    spec, held = make_spec(splits=("val",))
    assert spec.n_samples == 10 and spec.n_shards == 2
    create_store(url, spec, CKPT)
    fill(url, spec, held)
    store = GradientStore.open(url)
    np.testing.assert_array_equal(store.rows(), held)
    phis, _ = fake_phis(held)
    np.testing.assert_array_equal(store.read(None, "C"), phis["C"].astype(np.float16).astype(np.float32))
    with pytest.raises(InputError, match=r"rows \[9\]: not held"):
        store.read(None, "C", [9, 10])


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e6])
def test_non_finite_phi_or_overflow_fails_the_shard(tmp_path, bad):
    url = str(tmp_path / "store")
    spec, held = make_spec()
    create_store(url, spec, CKPT)
    rows = held[:16]
    phis, loss = fake_phis(rows)
    phis["V"][3, 1, 2] = bad
    with pytest.raises(GradlakeError, match=r"phi_V.*NaN or inf at rows \[3\].*not committed") as raised:
        ShardWriter(url).commit("epoch-1", 0, index_table(rows), loss, phis)
    overflow = bad == 1e6  # recurs on every attempt: bad input (not retried), naming the fix
    assert isinstance(raised.value, InputError) == overflow == ("use --storage-dtype float32" in str(raised.value))
    loss[5] = np.nan
    with pytest.raises(GradlakeError, match=r"loss: NaN or inf at rows \[5\]"):
        ShardWriter(url).commit("epoch-1", 0, index_table(rows), loss, fake_phis(rows)[0])
    assert not os.path.exists(os.path.join(url, "commits")) and not os.path.exists(os.path.join(url, "samples.parquet"))
    assert not os.path.exists(os.path.join(url, "grads.zarr", "epoch-1", "V", "c"))


def test_mismatched_store_is_refused_and_untouched(full_store):
    url, _, _ = full_store
    before = {p: open(p, "rb").read() for p in _files(url)}
    spec, _ = make_spec(seed=1)
    with pytest.raises(InputError, match=r"projector\.seed: store has 0, this run has 1"):
        create_store(url, spec, {"epoch-2": {"sha256": "b" * 64}})
    spec, _ = make_spec()
    with pytest.raises(InputError, match=r"checkpoint 'epoch-1' is in the store with weights sha256 aaaa"):
        create_store(url, spec, {"epoch-2": {"sha256": "b" * 64}, "epoch-1": {"sha256": "c" * 64}})
    after = {p: open(p, "rb").read() for p in _files(url)}
    assert before == after


def test_checkpoints_of_one_run_share_a_store(full_store):
    url, spec, held = full_store
    create_store(url, spec, {"epoch-2": {"sha256": "b" * 64}})
    create_store(url, spec, CKPT)  # the same checkpoint again: accepted, nothing changes
    fill(url, spec, held, checkpoint="epoch-2", shards=[0])
    store = GradientStore.open(url)
    assert store.checkpoints == ["epoch-1", "epoch-2"] and store.checkpoint() == "epoch-2"
    assert store.committed_shards("epoch-2") == {0} and store.is_complete("epoch-1")
    phis, _ = fake_phis(np.arange(16), "epoch-2")
    np.testing.assert_array_equal(store.read("epoch-2", "C", np.arange(16)),
                                  phis["C"].astype(np.float16).astype(np.float32))
    with pytest.raises(InputError, match="checkpoint 'epoch-9' is not in store.*epoch-1, epoch-2"):
        store.read("epoch-9", "C")


def test_flipped_byte_is_a_checksum_error_naming_array_and_chunk(full_store):
    url, spec, _ = full_store
    shard_file = os.path.join(url, "grads.zarr", "epoch-1", "C", "c", "1", "0")
    data = bytearray(open(shard_file, "rb").read())
    chunk_bytes = spec.chunk_rows * K * 2 + 4  # data + crc32c
    data[2 * chunk_bytes + 5] ^= 0x40  # inside the third chunk of shard 1
    open(shard_file, "wb").write(bytes(data))
    store = GradientStore.open(url)
    chunk = (spec.shard_rows + 2 * spec.chunk_rows) // spec.chunk_rows
    first = chunk * spec.chunk_rows
    with pytest.raises(GradlakeError, match=rf"checksum error in .*grads.zarr/epoch-1/C: chunk {chunk} "
                                            rf"\(rows {first}\.\.{first + spec.chunk_rows - 1}, shard 1\)"):
        store.read("epoch-1", "C")
    store.read("epoch-1", "C", np.arange(16))  # other shards still read


def test_memory_and_s3_urls(s3_bucket):
    for url, options in (("memory://gradlake-test/store", None), (s3_bucket[0] + "/runs/store", s3_bucket[1])):
        spec, held = make_spec(shard_rows=32)
        create_store(url, spec, CKPT, storage_options=options)
        fill(url, spec, held, storage_options=options)
        store = GradientStore.open(url, storage_options=options)
        phis, _ = fake_phis(np.arange(N))
        np.testing.assert_array_equal(store.read(None, "V"), phis["V"].astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(store.rows(), np.arange(N))
        assert "key" not in json.dumps(store.provenance) and store.is_complete()


def test_open_without_a_store_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no gradient store here"):
        GradientStore.open(str(tmp_path))


def _files(root):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)
