"""`gradlake topk` as a user runs it: on Ray, and approximate from `gradlake index build`."""

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from gradlake.query import description_of
from test_query_topk import LAM, SPLITS, N, T, _check, store_url  # noqa: F401  (a module-scoped fixture)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from synthetic_store import CHECKPOINT, index_table, spec_for, write_store  # noqa: E402

TOPK = ["topk", "--query-where", "t == 2", "--train-where", "split == 'train' and t >= 1", "--pair", "EC",
        "--k", "4", "--lambda", str(LAM)]


def _topk(cli, url, *extra):
    code, stdout, stderr = cli([TOPK[0], url, *TOPK[1:], *extra])
    assert code == 0, stderr
    return stdout, stderr


def test_cli_topk_on_ray_equals_in_process(store_url, tmp_path, cli, ray_session):  # noqa: F811
    url, phis = store_url
    here, here_err = _topk(cli, url, "--out", str(tmp_path / "here.parquet"), "--parts", "3")
    on_ray, ray_err = _topk(cli, url, "--ray", "--out", str(tmp_path / "ray.parquet"))
    assert "part_topk" in ray_err and "part_topk" not in here_err  # the parts ran as Ray tasks
    assert on_ray == here and on_ray.startswith("checkpoint epoch-0001 (sha256 111111111111), pair EC")
    tables = [pq.read_table(tmp_path / f"{name}.parquet") for name in ("here", "ray")]
    assert description_of(tables[0]) == description_of(tables[1])
    columns = ["query_row", "kind", "rank", "row", "trajectory", "t", "class"]
    assert tables[0].select(columns).equals(tables[1].select(columns))
    np.testing.assert_allclose(tables[1]["influence"].to_numpy(), tables[0]["influence"].to_numpy(), rtol=1e-12)
    rows = np.arange(N)
    _check(tables[1], phis, rows[rows % T == 2], rows[(SPLITS[rows // T] == "train") & (rows % T >= 1)], "EC", 4)
    address = ray_session.get_runtime_context().gcs_address
    by_address, address_err = _topk(cli, url, "--address", address, "--parts", "2")  # --address implies --ray
    assert by_address == here and "part_topk" in address_err


def test_cli_index_is_exact_when_exhaustive_and_says_it_is_approximate(store_url, tmp_path, cli):  # noqa: F811
    pytest.importorskip("faiss")
    url, phis = store_url
    code, stdout, stderr = cli(["index", "build", url, "--name", "flat4", "--where", "split == 'train' and t >= 1",
                                "--observable", "C", "--lambda", str(LAM), "--factory", "IVF4,Flat"])
    assert code == 0, stderr
    assert json.loads(stdout)["rows"] == 32 and "index flat4: add" in stderr  # progress on the build
    code, listing, _ = cli(["index", "list", url])
    assert code == 0 and "flat4        IVF4,Flat over 32 samples" in listing
    out = tmp_path / "approx.parquet"
    code, stdout, stderr = cli(["topk", url, "--query-where", "t == 2", "--pair", "EC", "--k", "4",
                                "--index", "flat4", "--nprobe", "4", "--out", str(out)])
    assert code == 0, stderr
    brute, _ = _topk(cli, url, "--out", str(tmp_path / "brute.parquet"))
    header, approx_line, *lines = stdout.splitlines()
    assert header == brute.splitlines()[0] and len(lines) == len(brute.splitlines()) - 1
    assert approx_line == ("approximate: index flat4 (IVF4,Flat over 32 samples of \"split == 'train' and t >= 1\"), "
                           "nprobe 4, 16 × k candidates re-scored exactly")
    table, exact = pq.read_table(out), pq.read_table(tmp_path / "brute.parquet")
    columns = ["query_row", "kind", "rank", "row"]  # exhaustive search of exact vectors: the exact answer
    assert table.select(columns).equals(exact.select(columns))
    np.testing.assert_allclose(table["influence"].to_numpy(), exact["influence"].to_numpy(), rtol=1e-5)
    rows = np.arange(N)
    _check(table, phis, rows[rows % T == 2], rows[(SPLITS[rows // T] == "train") & (rows % T >= 1)], "EC", 4)
    about = description_of(table)
    assert about["approximate"]["index"] == "flat4" and about["approximate"]["factory"] == "IVF4,Flat"
    assert about["approximate"]["nprobe"] == 4 and about["damping"] == LAM and about["pair"] == "EC"


def _recall(exact, approx, kind):
    pick = lambda t: {(r["query_row"], r["row"]) for r in t.to_pylist() if r["kind"] == kind}  # noqa: E731
    return len(pick(exact) & pick(approx)) / len(pick(exact))


def test_cli_index_recall_against_the_brute_force_cli(tmp_path, cli):
    pytest.importorskip("faiss")
    url = str(tmp_path / "store")
    write_store(url, spec_for(3000, 32, shard_rows=1024), steps=10)  # clustered φ's, like real ones
    settings = ["--metric", "C", "--lambda", "1"]
    code, stdout, stderr = cli(["index", "build", url, *settings])
    assert code == 0, stderr
    nlist = int(json.loads(stdout)["factory"].split(",")[0][3:])
    query = ["--query-where", "split == 'test' and t < 5", "--k", "10"]
    assert cli(["topk", url, *query, *settings, "--out", str(tmp_path / "exact.parquet")])[0] == 0
    exact = pq.read_table(tmp_path / "exact.parquet")
    recall = {}
    for nprobe in (1, 8, nlist):
        out = tmp_path / f"n{nprobe}.parquet"
        code, _, stderr = cli(["topk", url, *query, "--index", "default", "--nprobe", str(nprobe), "--out", str(out)])
        assert code == 0, stderr
        recall[nprobe] = [_recall(exact, pq.read_table(out), kind) for kind in ("top", "bottom")]
    assert recall[nlist] == [1.0, 1.0]  # every list searched: the brute-force answer
    assert min(recall[8]) >= 0.6 and all(a < b for a, b in zip(recall[1], recall[8]))


def _add_checkpoint(url, name, shards):
    from gradlake.store import ShardWriter, create_store

    spec = spec_for(2048, 16, shard_rows=1024)
    create_store(url, spec, {name: {"sha256": "2" * 64}})
    rng = np.random.default_rng(1)
    for shard in shards:
        lo, hi = spec.shard_range(shard)
        ShardWriter(url).commit(name, shard, index_table(np.arange(lo, hi, dtype=np.int64), 10),
                                np.ones(hi - lo, np.float32),
                                {"C": rng.standard_normal((hi - lo, 16), dtype=np.float32),
                                 "V": rng.standard_normal((hi - lo, 2, 16), dtype=np.float32)})


def test_cli_index_errors_are_one_line(tmp_path, cli):
    pytest.importorskip("faiss")
    url = str(tmp_path / "store")
    write_store(url, spec_for(2048, 16, shard_rows=1024), steps=10)
    assert cli(["index", "build", url, "--name", "ivf"])[0] == 0
    query = ["topk", url, "--query-where", "split == 'test'", "--k", "2"]

    def fails(argv, message):
        code, _, stderr = cli(argv)
        assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr

    fails([*query, "--index", "nope"], "no approximate index here (the store has ivf)")
    fails([*query, "--index", "ivf", "--lambda", "0.1"], "was built with --lambda 0.0001, not 0.1")
    fails([*query, "--index", "ivf", "--train-where", "t < 3"], "was built with --train-where")
    fails([*query, "--index", "ivf", "--metric", "C"], "was built with --metric 'V', not 'C'")
    fails([*query, "--index", "ivf", "--pair", "CV"], "holds the φ's of observable C, not V")
    fails([*query, "--index", "ivf", "--ray"], "--index searches the index in this process")
    fails(["index", "build", url, "--factory", "IVFx,Flat"], "could not parse index string IVFx,Flat")
    _add_checkpoint(url, "epoch-0002", [0])  # the latest checkpoint is now another one
    fails([*query, "--index", "ivf"], f"index 'ivf' was built from checkpoint {CHECKPOINT}, not epoch-0002 (the latest)")
    assert cli([*query, "--index", "ivf", "--checkpoint", CHECKPOINT])[0] == 0
    fails(["index", "build", url, "--name", "late"], "checkpoint epoch-0002: only 1 of 2 shards are committed")
    _add_checkpoint(url, "epoch-0002", [1])  # its second shard commits: the build may go
    assert cli(["index", "build", url, "--name", "late"])[0] == 0
    assert cli([*query, "--index", "late"])[0] == 0


def test_cli_index_without_faiss_is_one_line(store_url, cli, monkeypatch):  # noqa: F811
    url, _ = store_url
    monkeypatch.setitem(sys.modules, "faiss", None)  # as if faiss-cpu were not installed
    for argv in (["topk", url, "--query-where", "t == 2", "--index", "default"], ["index", "build", url]):
        code, _, stderr = cli(argv)
        assert code == 2 and len(stderr.strip().splitlines()) == 1
        assert "error: the approximate index needs faiss-cpu: pip install 'gradlake[index]'" in stderr


@pytest.fixture()
def partial_store(tmp_path):
    """Checkpoint epoch-0002 (the latest) with 1 of its 2 shards committed: an interrupted grads."""
    url = str(tmp_path / "store")
    write_store(url, spec_for(2048, 16, shard_rows=1024), steps=10)
    _add_checkpoint(url, "epoch-0002", [0])
    return url


def test_query_and_topk_refuse_a_partial_store_unless_allowed(partial_store, tmp_path, cli):
    url = partial_store
    topk = ["topk", url, "--query-where", "split == 'test' and t == 3", "--k", "2", "--metric", "C"]
    for argv in (["query", url, "--out", str(tmp_path / "q.parquet")], topk):
        code, out, err = cli(argv)
        assert code == 2 and not out and len(err.strip().splitlines()) == 1, (out, err)
        assert "checkpoint epoch-0002: only 1 of 2 shards are committed" in err
        assert f"gradlake grads --data synthetic --checkpoint epoch-0002 --out {url}" in err
        assert "--allow-partial" in err
    assert not (tmp_path / "q.parquet").exists()
    partial = {"shards_committed": 1, "shards_total": 2}
    for suffix in (".parquet", ".npy"):
        out = str(tmp_path / f"q{suffix}")
        code, stdout, err = cli(["query", url, "--out", out, "--allow-partial"])
        assert code == 0 and stdout.startswith("1024 samples"), err
        assert "note: partial answer (--allow-partial): from 1 of 2 shards of checkpoint epoch-0002" in err
    assert description_of(pq.read_schema(tmp_path / "q.parquet"))["partial"] == partial
    assert json.loads((tmp_path / "q.meta.json").read_text())["partial"] == partial
    code, stdout, err = cli([*topk, "--allow-partial", "--out", str(tmp_path / "t.parquet")])
    assert code == 0 and "note: partial answer" in err, err
    assert description_of(pq.read_table(tmp_path / "t.parquet"))["partial"] == partial
    code, stdout, err = cli([*topk, "--checkpoint", CHECKPOINT, "--out", str(tmp_path / "whole.parquet")])
    assert code == 0 and "partial" not in err and "partial" not in description_of(pq.read_schema(tmp_path / "whole.parquet"))


def test_topk_on_ray_allows_partial_only_when_asked(partial_store, tmp_path, cli, ray_session):
    url = partial_store
    topk = ["topk", url, "--query-where", "split == 'test' and t == 3", "--k", "2", "--metric", "C", "--ray",
            "--parts", "2"]
    code, _, err = cli(topk)
    assert code == 2 and "only 1 of 2 shards are committed" in err
    code, _, err = cli([*topk, "--allow-partial"])
    assert code == 0 and "note: partial answer" in err, err
