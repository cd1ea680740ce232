"""Query groups and per-layer shares of `gradlake topk` against dense numpy on a small store."""

import numpy as np
import pyarrow as pa
import pytest

from gradlake import open_store
from gradlake.errors import InputError
from gradlake.query import description_of, topk
from gradlake.store import ShardWriter, StoreSpec, create_store

T, N_TRAJ, K, PROBES, SHARD = 4, 9, 6, 2, 8
N = N_TRAJ * T
SPLITS = np.array(["train", "train", "test"] * 3)
CLASSES = np.array(["a", "b", "c"])
LAM = 1e-2
# φ's blocks as a UNet's projector spec records them: encoder 3 entries, bottleneck 1, decoder 2
PARAMETERS = [("proj_in.weight", 1), ("down.0.main.1.weight", 2), ("across.1.weight", 1),
              ("up.0.skip.weight", 1), ("proj_out.4.weight", 1)]
GROUP_ENTRIES = {"encoder": [0, 1, 2], "bottleneck": [3], "decoder": [4, 5]}


@pytest.fixture(scope="module")
def store_url(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("groups") / "store")
    offsets = np.cumsum([0] + [k for _, k in PARAMETERS])
    return url, _write_store(url, {"seed": 0, "parameters": [{"name": n, "offset": int(o), "k": k}
                                                             for (n, k), o in zip(PARAMETERS, offsets)]})


def _write_store(url, projector):
    rows = np.arange(N)
    traj = rows // T
    spec = StoreSpec(dataset={"url": "mem://d", "fingerprint": "0" * 64}, model={"name": "unet"},
                     projector=projector, observables=("C", "E", "V"), probes=PROBES, probe_seed=0,
                     k=K, dtype="float32", n_rows=N, shard_rows=SHARD, chunk_rows=4,
                     splits=("train", "val", "test"), n_samples=N, n_shards=-(-N // SHARD))
    create_store(url, spec, {"epoch-0001": {"sha256": "1" * 64}})
    rng = np.random.default_rng(1)
    phis = {"C": rng.standard_normal((N, K)) + 0.3, "E": rng.standard_normal((N, K)),
            "V": rng.standard_normal((N, PROBES, K))}
    writer = ShardWriter(url)
    for shard in range(spec.n_shards):
        r = rows[shard * SHARD:(shard + 1) * SHARD]
        index = pa.table({"row": r, "trajectory": traj[r], "t": (r % T).astype(np.int32),
                          "class": CLASSES[traj[r] % 3], "split": SPLITS[traj[r]]})
        writer.commit("epoch-0001", shard, index, np.ones(len(r), np.float32),
                      {o: p[r].astype(np.float32) for o, p in phis.items()})
    return {o: p.astype(np.float32).astype(np.float64) for o, p in phis.items()}


def _inverse(phis, candidates):
    v = phis["V"][candidates]
    return np.linalg.inv(np.einsum("npk,npl->kl", v, v) / PROBES + LAM * np.eye(K))


def _lists(table, query, kind):
    part = table.filter(pa.compute.equal(table["kind"], kind))
    return part.filter(pa.compute.equal(part[query[0]], query[1]))


@pytest.mark.parametrize("group_by,aggregate", [("trajectory", "mean"), ("class", "sum"), ("t", None),
                                                (None, "sum")])
def test_query_groups_equal_dense_numpy(store_url, group_by, aggregate):
    url, phis = store_url
    rows = np.arange(N)
    queries = rows[(rows % T >= 1) & (rows // T < 6)]  # t >= 1 of trajectories 0..5: train and test
    candidates = rows[SPLITS[rows // T] == "train"]
    W = _inverse(phis, candidates)
    table = topk(open_store(url), "t >= 1 and trajectory < 6", k=3, pair="CE", damping=LAM, block_rows=5,
                 parts=2, group_by=group_by, aggregate=aggregate)
    keys = {"trajectory": queries // T, "class": CLASSES[(queries // T) % 3], "t": queries % T,
            None: np.zeros(len(queries))}[group_by]
    about = description_of(table)["groups"]
    assert (about["by"], about["aggregate"]) == (group_by or "all", aggregate or "mean")
    assert sorted(set(table["group"].to_pylist())) == sorted(
        f"{group_by}={v}" if group_by else "all" for v in np.unique(keys).tolist())
    assert table["query_row"].null_count == table.num_rows
    for value in np.unique(keys):
        members = queries[keys == value]
        phi = phis["C"][members].sum(0) / (len(members) if aggregate in (None, "mean") else 1)
        h = phi @ W @ phis["E"][candidates].T
        h[np.isin(candidates, members)] = np.nan  # a group's members are never its candidates
        ok = np.flatnonzero(np.isfinite(h))
        order = ok[np.argsort(-h[ok])]
        label = f"{group_by}={value}" if group_by else "all"
        for kind, expected in (("top", order[:3]), ("bottom", order[::-1][:3])):
            got = _lists(table, ("group", label), kind)
            np.testing.assert_array_equal(got["row"].to_numpy(), candidates[expected])
            np.testing.assert_allclose(got["influence"].to_numpy(), h[expected], rtol=1e-4, atol=1e-6)
            assert got["rank"].to_pylist() == [1, 2, 3] and set(got["group_size"].to_pylist()) == {len(members)}
            shared_class = set(CLASSES[(members // T) % 3])
            assert got["query_class"].to_pylist()[0] == (shared_class.pop() if len(shared_class) == 1 else None)
            assert got["query_trajectory"].to_pylist()[0] == (
                int(members[0] // T) if len(set(members // T)) == 1 else None)


def test_by_layer_shares_equal_dense_numpy(store_url):
    url, phis = store_url
    rows = np.arange(N)
    candidates = rows[SPLITS[rows // T] == "train"]
    W = _inverse(phis, candidates)
    table = topk(open_store(url), "split == 'test'", k=4, pair="EC", damping=LAM, block_rows=7, by_layer=True)
    about = description_of(table)["by_layer"]
    assert about["blocks"] == [n for n, _ in PARAMETERS] and about["groups"] == list(GROUP_ENTRIES)
    assert table.num_rows == 2 * 4 * len(rows[SPLITS[rows // T] == "test"])
    offsets = np.cumsum([0] + [k for _, k in PARAMETERS])
    for row in table.to_pylist():
        a, wb = phis["E"][row["query_row"]], W @ phis["C"][row["row"]]
        blocks = [a[lo:hi] @ wb[lo:hi] for lo, hi in zip(offsets[:-1], offsets[1:])]
        np.testing.assert_allclose(row["block_shares"], blocks, rtol=1e-9, atol=1e-12)
        for group, entries in GROUP_ENTRIES.items():
            np.testing.assert_allclose(row[f"share:{group}"], a[entries] @ wb[entries], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(sum(blocks), row["influence"], rtol=1e-4, atol=1e-6)  # shares sum to H
    # with groups: the group's aggregated φ is split the same way
    grouped = topk(open_store(url), "split == 'test'", k=2, pair="EC", damping=LAM, by_layer=True,
                   group_by="class")
    for row in grouped.to_pylist():
        members = rows[(SPLITS[rows // T] == "test") & (CLASSES[(rows // T) % 3] == row["query_class"])]
        a, wb = phis["E"][members].mean(0), W @ phis["C"][row["row"]]
        np.testing.assert_allclose(row["share:decoder"], a[4:] @ wb[4:], rtol=1e-9, atol=1e-12)


def test_groups_and_layers_bad_input(store_url, tmp_path):
    url, _ = store_url
    store = open_store(url)
    with pytest.raises(InputError, match="--group-by: expected one of trajectory, class, t"):
        topk(store, "split == 'test'", group_by="split")
    with pytest.raises(InputError, match="--aggregate: expected one of mean, sum"):
        topk(store, "split == 'test'", aggregate="max")
    _write_store(str(tmp_path / "plain"), {"seed": 0})  # a projector spec without blocks
    with pytest.raises(InputError, match="--by-layer: the store's projector spec records no parameter blocks"):
        topk(open_store(str(tmp_path / "plain")), "split == 'test'", by_layer=True)


def test_cli_group_by_and_by_layer(store_url, tmp_path, cli):
    url, _ = store_url
    out = tmp_path / "top.parquet"
    code, stdout, _ = cli(["topk", url, "--query-where", "split == 'test'", "--k", "2", "--group-by", "trajectory",
                           "--aggregate", "sum", "--by-layer", "--lambda", str(LAM), "--out", str(out)])
    assert code == 0 and "query groups: sum of phi_C of the members per trajectory (3 groups)" in stdout
    assert "query group trajectory=5 (4) top" in stdout and " encoder " in stdout and " decoder " in stdout
    written = pa.parquet.read_table(out)
    expected = topk(open_store(url), "split == 'test'", k=2, damping=LAM, group_by="trajectory", aggregate="sum",
                    by_layer=True)
    assert written.equals(expected)
    code, _, stderr = cli(["topk", url, "--query-where", "t == 1", "--index", "default", "--group-by", "t"])
    assert code == 2 and "--group-by" in stderr and "Traceback" not in stderr


def test_groups_and_layers_on_ray_equal_in_process(store_url, ray_session):
    from gradlake.distributed.query_tasks import topk as ray_topk

    url, _ = store_url
    settings = dict(k=3, pair="CE", damping=LAM, group_by="trajectory", aggregate="sum", by_layer=True)
    here = topk(open_store(url), "t >= 1", block_rows=5, parts=3, **settings)
    there = ray_topk(url, "t >= 1", block_rows=5, parts=3, **settings)
    assert there.equals(here) and description_of(there) == description_of(here)
