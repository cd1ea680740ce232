"""Queries against a real store: export and top-k, checked with plain zarr/pyarrow and dense numpy."""

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr

from gradlake import open_store
from gradlake.errors import InputError
from gradlake.query import description_of, export, topk
from gradlake.store import ShardWriter, StoreSpec, create_store

T, N_TRAJ, K, PROBES = 4, 6, 6, 2
N = N_TRAJ * T
CLASSES = np.array(["rp", "crp", "rpui"] * 2)
SPLITS = np.array(["train", "train", "train", "test", "train", "test"])


def write_store(url, storage_options=None):
    """The test store (random φ, 3 shards of 8 rows) at any URL."""
    rows = np.arange(N)
    traj = rows // T
    spec = StoreSpec(dataset={"url": "mem://d", "fingerprint": "0" * 64}, model={"name": "unet"},
                     projector={"seed": 0}, observables=("C", "V"), probes=PROBES, probe_seed=0,
                     k=K, dtype="float32", n_rows=N, shard_rows=8, chunk_rows=4,
                     splits=("train", "val", "test"), n_samples=N, n_shards=N // 8)
    create_store(url, spec, {"epoch-0001": {"sha256": "1" * 64}}, storage_options)
    rng = np.random.default_rng(0)
    phi_c = rng.standard_normal((N, K)).astype(np.float32)
    phi_v = rng.standard_normal((N, PROBES, K)).astype(np.float32)
    writer = ShardWriter(url, storage_options)
    for shard in range(N // 8):
        r = rows[shard * 8:(shard + 1) * 8]
        index = pa.table({"row": r, "trajectory": traj[r], "t": (r % T).astype(np.int32),
                          "class": CLASSES[traj[r]], "split": SPLITS[traj[r]]})
        writer.commit("epoch-0001", shard, index, np.ones(len(r), np.float32),
                      {"C": phi_c[r], "V": phi_v[r]})
    return url


@pytest.fixture(scope="module")
def store_url(tmp_path_factory):
    return write_store(str(tmp_path_factory.mktemp("q") / "store"))


def _plain(url, observable):
    return zarr.open_group(f"{url}/grads.zarr", mode="r")[f"epoch-0001/{observable}"][:]


def test_export_parquet_matches_plain_zarr(store_url, tmp_path):
    out = tmp_path / "sel.parquet"
    n = export(open_store(store_url), out, "class == 'rp' and t < 3", "C", block_rows=2)
    table = pq.read_table(out)
    rows = table.column("row").to_numpy()
    assert n == len(rows) == 2 * 3
    assert set(table.column("class").to_pylist()) == {"rp"}
    np.testing.assert_array_equal(np.stack(table.column("phi").to_numpy(zero_copy_only=False)),
                                  _plain(store_url, "C")[rows])
    about = description_of(pq.read_schema(out))
    assert about["checkpoint"] == "epoch-0001" and about["observable"] == "C"
    assert about["where"] == "class == 'rp' and t < 3" and about["samples"] == 6


def test_export_npy_streams_probes(store_url, tmp_path):
    out = tmp_path / "v.npy"
    export(open_store(store_url), out, "split == 'test'", "V", block_rows=3)
    rows = np.load(tmp_path / "v.rows.npy")
    assert len(rows) == 2 * T
    np.testing.assert_array_equal(np.load(out), _plain(store_url, "V")[rows])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.meta.json", "v.npy", "v.rows.npy"]  # no partial file
    about = json.loads((tmp_path / "v.meta.json").read_text())
    assert about["checkpoint"] == "epoch-0001" and about["checkpoint_sha256"] == "1" * 64
    assert about["observable"] == "V" and about["where"] == "split == 'test'"
    assert about["shape"] == [2 * T, PROBES, K] and about["rows"] == "v.rows.npy"


def test_topk_matches_dense_numpy(store_url):
    damping = 1e-2
    table = topk(open_store(store_url), "split == 'test' and t == 1", k=3, damping=damping)
    c, v = _plain(store_url, "C").astype(np.float64), _plain(store_url, "V").astype(np.float64)
    train = np.flatnonzero(SPLITS[np.arange(N) // T] == "train")
    queries = np.flatnonzero((SPLITS[np.arange(N) // T] == "test") & (np.arange(N) % T == 1))
    eta = np.einsum("npk,npl->kl", v[train], v[train]) / PROBES
    h = c[queries] @ np.linalg.inv(eta + damping * np.eye(K)) @ c[train].T
    for qi, q in enumerate(queries):
        got = table.filter(pa.compute.equal(table["query_row"], int(q)))
        top = got.filter(pa.compute.equal(got["kind"], "top"))
        bottom = got.filter(pa.compute.equal(got["kind"], "bottom"))
        order = np.argsort(-h[qi])
        np.testing.assert_array_equal(top.column("row").to_numpy(), train[order[:3]])
        np.testing.assert_allclose(top.column("influence").to_numpy(), h[qi, order[:3]], rtol=1e-4)
        np.testing.assert_array_equal(bottom.column("row").to_numpy(), train[order[::-1][:3]])
        assert set(top.column("trajectory").to_numpy()) <= set(train // T)


def test_bad_filter_lists_the_columns(store_url, tmp_path):
    with pytest.raises(InputError, match="trajectory"):
        export(open_store(store_url), tmp_path / "x.parquet", "traj == 1")
    with pytest.raises(InputError, match="selects no sample"):
        topk(open_store(store_url), "class == 'none'")


def test_cli_info_query_and_bad_input(store_url, tmp_path):
    gradlake = [sys.executable, "-m", "gradlake"]
    info = subprocess.run(gradlake + ["info", store_url], capture_output=True, text=True)
    assert info.returncode == 0 and "epoch-0001: shards 3/3 complete" in info.stdout
    out = tmp_path / "q.parquet"
    ok = subprocess.run(gradlake + ["query", store_url, "--where", "t >= 2", "--out", str(out)],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and pq.read_table(out).num_rows == N_TRAJ * 2
    bad = subprocess.run(gradlake + ["query", store_url, "--where", "colour == 1", "--out", str(out)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "colour" in bad.stderr


def test_topk_names_checkpoint_pair_and_normalisation(store_url, tmp_path, cli):
    table = topk(open_store(store_url), "split == 'test' and t == 1", k=2, pair="CC")
    about = description_of(table)
    assert about["checkpoint"] == "epoch-0001" and about["checkpoint_sha256"] == "1" * 64
    assert (about["pair"], about["response"], about["perturbation"]) == ("CC", "C", "C")
    assert about["normalization"] == "none" and about["metric"] == "V" and about["damping"] == 1e-4
    out = tmp_path / "top.parquet"
    code, stdout, _ = cli(["topk", store_url, "--query-where", "split == 'test' and t == 1", "--k", "2",
                               "--out", str(out)])
    assert code == 0 and stdout.startswith("checkpoint epoch-0001 (sha256 111111111111), pair CC")
    assert "normalisation none" in stdout.splitlines()[0]
    assert description_of(pq.read_schema(out))["pair"] == "CC"


def test_no_match_names_the_known_classes(store_url, tmp_path, cli):
    code, stdout, stderr = cli(["query", store_url, "--where", "class == 'RP'",
                                    "--out", str(tmp_path / "e.parquet")])
    assert code == 0 and stdout.startswith("0 samples")
    assert "0 rows match \"class == 'RP'\"; known classes are crp, rp, rpui; splits are test, train" in stderr
    code, _, stderr = cli(["topk", store_url, "--query-where", "class == 'RP'"])
    assert code == 2 and "known classes are crp, rp, rpui" in stderr and len(stderr.strip().splitlines()) == 1


@pytest.mark.s3
@pytest.mark.parametrize("name", ["x.npy", "x.parquet"])
def test_query_and_topk_write_to_s3(store_url, s3_bucket, tmp_path, monkeypatch, name, cli):
    import fsspec

    bucket, options = s3_bucket
    monkeypatch.chdir(tmp_path)
    where = "t >= 2"
    common = ["--endpoint-url", options["endpoint_url"]]
    code, _, err = cli(["query", store_url, "--where", where, "--out", f"{bucket}/q/{name}", *common])
    assert code == 0, err
    code, _, err = cli(["topk", store_url, "--query-where", "t == 1", "--k", "2",
                            "--out", f"{bucket}/q/top.parquet", *common])
    assert code == 0, err
    assert list(tmp_path.iterdir()) == []  # nothing local, no "s3:" folder
    local = tmp_path.parent / f"local-{name}"
    export(open_store(store_url), local, where)
    fs, root = fsspec.core.url_to_fs(f"{bucket}/q", **options)
    stem = name.split(".")[0]
    if name.endswith(".npy"):
        assert sorted(fs.ls(root, detail=False)) == sorted(
            f"{root}/{n}" for n in (name, f"{stem}.rows.npy", f"{stem}.meta.json", "top.parquet"))
        np.testing.assert_array_equal(np.load(fs.open(f"{root}/{name}")), np.load(local))
        assert json.loads(fs.cat_file(f"{root}/{stem}.meta.json"))["where"] == where
    else:
        remote = pq.read_table(fs.open(f"{root}/{name}"))
        assert remote.equals(pq.read_table(local)) and description_of(remote)["where"] == where
    top = pq.read_table(fs.open(f"{root}/top.parquet"))
    assert top.num_rows > 0 and description_of(top)["checkpoint"] == "epoch-0001"


@pytest.mark.s3
def test_out_to_a_missing_bucket_is_one_line(store_url, s3_server, tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)
    for argv in (["query", store_url, "--out", "s3://no-such-bucket-x/x.parquet"],
                 ["topk", store_url, "--query-where", "t == 1", "--out", "s3://no-such-bucket-x/t.parquet"]):
        code, _, err = cli([*argv, "--endpoint-url", s3_server])
        assert code == 2 and "bucket 'no-such-bucket-x' does not exist" in err
        assert len(err.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


@pytest.mark.s3
@pytest.mark.slow
def test_query_and_topk_through_transient_s3_faults(store_url, s3_bucket, faulty_s3, tmp_path):
    """503 SlowDown and 500 InternalError on every 7th request (up to 12) while reading a
    store on S3 and writing the results there: retried, and the results equal a clean run's."""
    import fsspec

    faulty_s3.every, faulty_s3.budget = 7, 12  # each fault costs a retry back-off (~0.5 s)
    bucket, options = s3_bucket
    url = write_store(f"{bucket}/store", options)  # written cleanly, straight to moto
    faulty = {"endpoint_url": faulty_s3.endpoint}
    store = open_store(url, faulty)
    for name in ("q.parquet", "q.npy"):
        n = export(store, f"{bucket}/out/{name}", "t >= 1", "V", block_rows=5, storage_options=faulty)
        assert n == N_TRAJ * (T - 1)
        export(open_store(store_url), tmp_path / name, "t >= 1", "V", block_rows=5)
    faulty_top = topk(store, "split == 'test'", k=3, damping=1e-2)
    clean_top = topk(open_store(store_url), "split == 'test'", k=3, damping=1e-2)
    assert faulty_s3.injected >= 8 and set(faulty_s3.by_code) == {"SlowDown", "InternalError"}
    fs, root = fsspec.core.url_to_fs(f"{bucket}/out", **options)
    got = pq.read_table(fs.open(f"{root}/q.parquet"))
    assert got.equals(pq.read_table(tmp_path / "q.parquet"))
    np.testing.assert_array_equal(np.load(fs.open(f"{root}/q.npy")), np.load(tmp_path / "q.npy"))
    np.testing.assert_array_equal(np.load(fs.open(f"{root}/q.rows.npy")), np.load(tmp_path / "q.rows.npy"))
    assert faulty_top.select(["query_row", "kind", "rank", "row", "influence"]).equals(
        clean_top.select(["query_row", "kind", "rank", "row", "influence"]))
    # The faults are real: without botocore's retries the same query fails.
    faulty_s3.every, faulty_s3.budget, faulty_s3.injected = 2, 4, 0
    no_retries = {**faulty, "config_kwargs": {"retries": {"total_max_attempts": 1}}}
    with pytest.raises(OSError, match="Service Unavailable|Internal"):
        export(open_store(url, no_retries), f"{bucket}/out/again.parquet", "t >= 1", "V",
               storage_options=no_retries)
