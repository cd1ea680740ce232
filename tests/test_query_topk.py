"""Batched top-k (many queries, one pass, parts on Ray) against dense numpy on a small store."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from gradlake import open_store
from gradlake.errors import InputError
from gradlake.query import topk
from gradlake.store import ShardWriter, StoreSpec, create_store

T, N_TRAJ, K, PROBES, SHARD = 5, 12, 6, 2, 8
N = N_TRAJ * T
SPLITS = np.array(["train", "train", "test"] * 4)
LAM = 1e-2


@pytest.fixture(scope="module")
def store_url(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("topk") / "store")
    rows = np.arange(N)
    traj = rows // T
    n_shards = -(-N // SHARD)
    spec = StoreSpec(dataset={"url": "mem://d", "fingerprint": "0" * 64}, model={"name": "m"},
                     projector={"seed": 0}, observables=("C", "E", "V"), probes=PROBES, probe_seed=0,
                     k=K, dtype="float32", n_rows=N, shard_rows=SHARD, chunk_rows=4,
                     splits=("train", "val", "test"), n_samples=N, n_shards=n_shards)
    create_store(url, spec, {"epoch-0001": {"sha256": "1" * 64}})
    rng = np.random.default_rng(0)
    phis = {"C": rng.standard_normal((N, K)), "E": rng.standard_normal((N, K)),
            "V": rng.standard_normal((N, PROBES, K))}
    writer = ShardWriter(url)
    for shard in range(n_shards):
        r = rows[shard * SHARD:(shard + 1) * SHARD]
        index = pa.table({"row": r, "trajectory": traj[r], "t": (r % T).astype(np.int32),
                          "class": np.array(["a", "b", "c"])[traj[r] % 3], "split": SPLITS[traj[r]]})
        writer.commit("epoch-0001", shard, index, np.ones(len(r), np.float32),
                      {o: p[r].astype(np.float32) for o, p in phis.items()})
    return url, {o: p.astype(np.float32).astype(np.float64) for o, p in phis.items()}


def _dense(phis, queries, candidates, pair):
    v = phis["V"][candidates]
    eta = np.einsum("npk,npl->kl", v, v) / PROBES
    h = phis[pair[0]][queries] @ np.linalg.inv(eta + LAM * np.eye(K)) @ phis[pair[1]][candidates].T
    h[queries[:, None] == candidates[None, :]] = np.nan  # a sample is never its own candidate
    return h


def _check(table, phis, queries, candidates, pair, k):
    h = _dense(phis, queries, candidates, pair)
    assert sorted(set(table.column("query_row").to_pylist())) == queries.tolist()
    for qi, q in enumerate(queries):
        got = table.filter(pa.compute.equal(table["query_row"], int(q)))
        ok = np.flatnonzero(np.isfinite(h[qi]))
        order = ok[np.argsort(-h[qi, ok])]
        for kind, expected in (("top", order[:k]), ("bottom", order[::-1][:k])):
            part = got.filter(pa.compute.equal(got["kind"], kind))
            assert part.column("rank").to_pylist() == list(range(1, k + 1))
            np.testing.assert_array_equal(part.column("row").to_numpy(), candidates[expected])
            np.testing.assert_allclose(part.column("influence").to_numpy(), h[qi, expected], rtol=1e-4, atol=1e-6)
            np.testing.assert_array_equal(part.column("t").to_numpy(), candidates[expected] % T)
        assert int(q) not in got.column("row").to_pylist()


@pytest.mark.parametrize("parts", [1, 3, 8])
def test_batched_topk_equals_dense_numpy(store_url, parts):
    url, phis = store_url
    rows = np.arange(N)
    train_where = "split == 'train' and t >= 1"
    candidates = rows[(SPLITS[rows // T] == "train") & (rows % T >= 1)]
    queries = rows[rows % T == 2]  # train and test samples: the train ones are also candidates
    table = topk(open_store(url), "t == 2", train_where, k=4, pair="EC", damping=LAM, block_rows=5,
                 parts=parts)
    _check(table, phis, queries, candidates, "EC", 4)


def test_parts_in_threads_equal_one_at_a_time_and_restore_the_thread_pools(store_url):
    """Parts run in threads merge in part order: the same table bit for bit as one worker;
    torch's and BLAS's thread counts are what they were before the pass."""
    import torch
    from threadpoolctl import threadpool_info

    from gradlake.query import in_process

    url, _ = store_url
    store = open_store(url)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # a count the pass changes, so that restoring it shows
    try:
        before = [pool["num_threads"] for pool in threadpool_info()]
        args = dict(query_where="t == 2", train_where="split == 'train'", k=4, damping=LAM, block_rows=5, parts=5)
        threaded = topk(store, **args, mapper=in_process(workers=4))
        assert threaded.equals(topk(store, **args, mapper=in_process(workers=1)))
        assert torch.get_num_threads() == 2 and [pool["num_threads"] for pool in threadpool_info()] == before
    finally:
        torch.set_num_threads(threads)


def test_topk_parts_on_ray_equal_dense_numpy(store_url, ray_session):
    from gradlake.distributed.query_tasks import topk as ray_topk

    url, phis = store_url
    rows = np.arange(N)
    candidates = rows[SPLITS[rows // T] == "train"]
    queries = rows[(rows // T) % 2 == 0]
    table = ray_topk(url, "trajectory in [0, 2, 4, 6, 8, 10]", k=3, damping=LAM, block_rows=7, parts=4)
    _check(table, phis, queries, candidates, "CC", 3)


def test_topk_bad_selections(store_url):
    url, _ = store_url
    with pytest.raises(InputError, match="--train-where"):
        topk(open_store(url), "t == 1", "class == 'zzz'", parts=3)
    with pytest.raises(InputError, match="observable 'M'"):
        topk(open_store(url), "t == 1", pair="MC")


@pytest.mark.parametrize("factory, nprobe", [(None, 1), ("IVF4,Flat", 4)])
def test_approximate_index_beside_the_store_equals_dense_numpy_when_exhaustive(store_url, factory, nprobe):
    pytest.importorskip("faiss")
    from gradlake.approximate_index import ApproximateIndex, build_index

    url, phis = store_url
    rows = np.arange(N)
    record = build_index(url, name=f"ivf{nprobe}", where="split == 'train' and t >= 1", factory=factory,
                         damping=LAM)
    candidates = rows[(SPLITS[rows // T] == "train") & (rows % T >= 1)]
    assert record["rows"] == len(candidates)
    assert (Path(url) / "index" / f"ivf{nprobe}" / "index.json").exists()  # beside the store
    table = ApproximateIndex(url, f"ivf{nprobe}").topk("t == 2", k=4, response="E", nprobe=nprobe)
    _check(table, phis, rows[rows % T == 2], candidates, "EC", 4)


def test_the_index_module_under_its_old_name_warns_and_is_the_same():
    import importlib
    import sys

    import gradlake.approximate_index as index

    sys.modules.pop("gradlake.approx", None)
    with pytest.warns(FutureWarning, match="gradlake.approximate_index"):
        old = importlib.import_module("gradlake.approx")
    assert old.ApproximateIndex is index.ApproximateIndex and old.build_index is index.build_index
