"""A damaged store: `info` does not call it complete, `info --verify` names every damaged object,
readers name a damaged file, and `repair` leaves it consistent so that recomputing the dropped
shards gives the clean store's answers."""

import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from gradlake.store import GradientStore, compact, create_store
from gradlake.store.verify import check_parquet, verify
from test_store_io import CKPT, fill, make_spec

C_SHARD_1 = "grads.zarr/epoch-1/C/c/1/0"  # compacted shard 1: a byte flipped
COMMIT_2 = "commits/epoch-1/shard-000002.parquet"  # not compacted: truncated
V_SHARD_3 = "grads.zarr/epoch-1/V/c/3/0/0"  # shard 3's V data: deleted
GROUP_0 = "samples.parquet/checkpoint=epoch-1/part-000000.parquet"  # shards 0 and 1, compacted


def build(url):
    """4 shards: 0 and 1 compacted into samples.parquet, 2 and 3 in commits/."""
    spec, held = make_spec(shard_rows=16)
    create_store(url, spec, CKPT)
    fill(url, spec, held, shards=[0, 1])
    compact(GradientStore.open(url, allow_partial=True))
    fill(url, spec, held, shards=[2, 3])
    return spec, held


def damage(url):
    path = os.path.join(url, C_SHARD_1)
    data = bytearray(open(path, "rb").read())
    data[40] ^= 0x01
    open(path, "wb").write(bytes(data))
    path = os.path.join(url, COMMIT_2)
    open(path, "r+b").truncate(os.path.getsize(path) // 2)
    os.remove(os.path.join(url, V_SHARD_3))


def lines(stderr):
    """stderr's lines, less the JSON progress lines of the store's setup."""
    return [line for line in stderr.strip().splitlines() if not line.startswith("{")]


@pytest.fixture()
def damaged(tmp_path):
    url = str(tmp_path / "store")
    spec, held = build(url)
    damage(url)
    return url, spec, held


def test_info_verify_names_each_damaged_object_exit_1(damaged, cli):
    url, _, _ = damaged
    code, out, err = cli(["info", url])  # footers and a listing: not complete, two things named
    assert code == 0 and "epoch-1: shards 4/4 INCOMPLETE" in out, out
    assert f"DAMAGED: {COMMIT_2}: cannot be read (" in out
    assert "DAMAGED: grads.zarr/epoch-1/V has no data for committed shard(s) 3" in out
    code, out, err = cli(["info", url, "--verify"])
    findings = [line for line in out.splitlines() if line.startswith("FINDING")]
    assert code == 1 and len(findings) == 3, (out, err)
    assert any(f"{C_SHARD_1}: checksum error in " in f and "(rows 16..19, shard 1) is corrupt" in f for f in findings)
    assert any(f"{COMMIT_2}: cannot be read (" in f for f in findings)
    assert any(f"{V_SHARD_3}: missing: the data of committed shard 3 of V" in f for f in findings)
    assert len(lines(err)) == 1 and "3 damaged object(s); `gradlake repair" in err


def test_an_undamaged_store_verifies(tmp_path, cli):
    url = str(tmp_path / "store")
    build(url)
    code, out, err = cli(["info", url, "--verify"])
    assert code == 0 and "verified     every object read: 0 damaged" in out and "complete" in out, (out, err)


def test_deep_checks_find_what_footers_cannot(tmp_path):
    url = str(tmp_path / "store")
    build(url)
    path = os.path.join(url, COMMIT_2)
    page = pq.read_metadata(path).row_group(0).column(3).data_page_offset
    data = bytearray(open(path, "rb").read())
    data[page] ^= 0xFF  # a page header: the footer still reads
    open(path, "wb").write(bytes(data))
    store = GradientStore.open(url)
    assert check_parquet(store) == []
    found = verify(store)
    assert [(f.path, f.shards) for f in found] == [(COMMIT_2, (2,))], found


@pytest.mark.parametrize("damaged_file", [COMMIT_2, GROUP_0])
@pytest.mark.parametrize("argv", [["query", "{url}", "--out", "{tmp}/q.npy"],
                                  ["topk", "{url}", "--query-where", "split == 'test'", "--k", "2", "--metric", "C"]])
def test_a_truncated_sample_file_is_a_named_error(tmp_path, cli, argv, damaged_file):
    url = str(tmp_path / "store")
    build(url)
    path = os.path.join(url, damaged_file)
    open(path, "r+b").truncate(os.path.getsize(path) - 9)
    code, out, err = cli([a.format(url=url, tmp=tmp_path) for a in argv])
    assert code == 1 and len(lines(err)) == 1 and "Traceback" not in err, (out, err)
    assert f"store {url}: {damaged_file} cannot be read (" in err and f"`gradlake repair {url}`" in err
    assert not (tmp_path / "q.npy").exists()
    code, out, _ = cli(["info", url])
    assert code == 0 and "INCOMPLETE" in out and f"DAMAGED: {damaged_file}: cannot be read" in out


@pytest.mark.s3
@pytest.mark.slow  # ~5-7 s on a loaded machine
def test_verify_and_repair_on_s3(s3_bucket):
    import fsspec

    from gradlake.store.verify import repair

    url, options = s3_bucket[0] + "/store", s3_bucket[1]
    spec, held = make_spec(shard_rows=16)
    create_store(url, spec, CKPT, storage_options=options)
    fill(url, spec, held, shards=[0, 1], storage_options=options)
    compact(GradientStore.open(url, options, allow_partial=True))
    fill(url, spec, held, shards=[2, 3], storage_options=options)
    fs, root = fsspec.core.url_to_fs(url, **options)
    fs.pipe_file(f"{root}/{GROUP_0}", fs.cat_file(f"{root}/{GROUP_0}")[:-9])
    fs.rm(f"{root}/{V_SHARD_3}")
    store = GradientStore.open(url, options)
    found = sorted((f.path, f.shards) for f in verify(store))
    assert found == [(V_SHARD_3, (3,)), (GROUP_0, (0, 1))], found
    assert repair(store, verify(store)) == {"epoch-1": [0, 1, 3]}
    store = GradientStore.open(url, options, allow_partial=True)
    assert store.committed_shards() == {2} and verify(store) == []
    held = pq.read_table(f"{root}/{GROUP_0}", filesystem=fs)["shard"].to_pylist()
    assert held == [2] * 16  # rewritten by the compaction of what commits/ still held


def test_repair_then_recompute_equals_a_clean_store(damaged, tmp_path, cli):
    url, spec, held = damaged
    code, out, err = cli(["repair", url])
    assert code == 0, err
    assert "dropped   checkpoint epoch-1: shard(s) 1, 2, 3 (now uncommitted)" in out
    assert sum(line.startswith("damaged") for line in out.splitlines()) == 3
    store = GradientStore.open(url, allow_partial=True)
    assert store.committed_shards() == {0} and verify(store) == [] and not os.path.exists(os.path.join(url, COMMIT_2))
    assert sorted(pq.read_table(os.path.join(url, "samples.parquet"))["shard"].to_pylist()) == [0] * 16
    code, _, err = cli(["query", url, "--out", str(tmp_path / "partial.npy")])
    assert code == 2 and "only 1 of 4 shards are committed" in err
    assert cli(["repair", url])[1].endswith("nothing to repair (every object reads whole, its checksums match)\n")

    fill(url, spec, held, shards=[1, 2, 3])  # what a resumed grads does: the dropped shards again
    compact(GradientStore.open(url))
    clean = str(tmp_path / "clean")
    build(clean)
    compact(GradientStore.open(clean))
    for name, store_url in (("repaired", url), ("clean", clean)):
        for obs in ("C", "V"):
            code, _, err = cli(["query", store_url, "--observable", obs, "--out", str(tmp_path / f"{name}-{obs}.npy")])
            assert code == 0, err
    for obs in ("C", "V"):
        repaired, expected = (np.load(tmp_path / f"{name}-{obs}.npy") for name in ("repaired", "clean"))
        assert repaired.shape == (50, *expected.shape[1:]) and repaired.tobytes() == expected.tobytes()
        assert np.array_equal(np.load(tmp_path / f"repaired-{obs}.rows.npy"), np.load(tmp_path / f"clean-{obs}.rows.npy"))
    assert GradientStore.open(url).samples().drop_columns(["checkpoint"]).equals(
        GradientStore.open(clean).samples().drop_columns(["checkpoint"]))


def test_repair_refuses_a_store_another_driver_writes(damaged, cli):
    from gradlake.store import Lease
    from gradlake.store.layout import StoreFiles

    url, _, _ = damaged
    before = open(os.path.join(url, "store.json"), "rb").read()
    with Lease(StoreFiles(url), "grads"):
        code, out, err = cli(["repair", url])
    assert code == 2 and "being written by" in err and os.path.exists(os.path.join(url, COMMIT_2))
    assert open(os.path.join(url, "store.json"), "rb").read() == before
