"""The reduce at scale: blocks planned part by part (the driver never holds a row per sample),
one reduce per output folder at a time (its lease), consolidated results.zarr."""

import threading

import numpy as np
import pytest
from reduce_helpers import make_dataset, make_store

from gradlake.stages.reduce_blocks import BlockPlan, PartIndex
from gradlake.streaming import row_blocks


def whole_table_trajectory_blocks(trajectory: np.ndarray, block_rows: int) -> list[tuple[int, int]]:
    """The reference cut, on the whole selection at once: (start, stop) positions, cut only
    between trajectories, a block ending at the first trajectory start >= block_rows after its own."""
    starts = np.flatnonzero(np.r_[True, trajectory[1:] != trajectory[:-1]])
    bounds, begin = [], 0
    for s in starts[1:]:
        if s - begin >= block_rows:
            bounds.append((begin, int(s)))
            begin = int(s)
    bounds.append((begin, len(trajectory)))
    return bounds


def _part(rows, trajectory, reference, kept, queries, tiles, shards):
    sel = lambda mask: rows[mask]  # noqa: E731
    return PartIndex(shards=shards, samples=len(rows), classes=("a",), max_t=3, reference=sel(reference),
                     response=int(kept.sum()), perturbation=0, kept=sel(kept), kept_trajectory=trajectory[kept],
                     queries=sel(queries), tile_rows=sel(tiles), tile_cols=sel(~tiles))


@pytest.mark.parametrize("seed", range(6))
def test_the_streamed_plan_cuts_as_the_whole_table_would(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 9, 60)  # trajectories of 1..8 rows, contiguous in row order
    trajectory = np.repeat(np.arange(len(lengths)), lengths)
    n = len(trajectory)
    rows = np.arange(n) * 2 + 1  # rows need not be dense
    reference, kept, queries, tiles = (rng.random((4, n)) < [[0.6], [0.7], [0.3], [0.5]])
    block_rows, query_rows, tile_max = int(rng.integers(1, 12)), int(rng.integers(1, 6)), int(rng.integers(0, 20))
    plan = BlockPlan(block_rows, query_rows, tile_max)
    cuts = np.sort(rng.choice(np.arange(1, n), size=int(rng.integers(0, 12)), replace=False))
    for i, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, n])):  # parts cut anywhere, even inside a trajectory
        s = slice(lo, hi)
        plan.add(_part(rows[s], trajectory[s], reference[s], kept[s], queries[s], tiles[s], (i, i + 1)))
    end = rows[-1] + 1

    def rows_in(spans, mask):
        return [rows[mask & (rows >= lo) & (rows < hi)] for lo, hi in spans]

    expected = [rows[kept][a:b] for a, b in whole_table_trajectory_blocks(trajectory[kept], block_rows)]
    got = rows_in(plan.trajectory_blocks(end), kept)
    assert [g.tolist() for g in got] == [e.tolist() for e in expected]
    for spans, mask, size in ((plan.reference_blocks(end), reference, block_rows),
                              (plan.query_blocks(end), queries, query_rows)):
        assert [g.tolist() for g in rows_in(spans, mask)] == [b.tolist() for b in row_blocks(rows[mask], size)]
    assert plan.tile_rows.tolist() == rows[tiles][:tile_max].tolist()
    assert plan.tile_cols.tolist() == rows[~tiles][:tile_max].tolist()
    assert (plan.samples, plan.response, plan.reference, plan.queries) == (n, kept.sum(), reference.sum(),
                                                                           queries.sum())


@pytest.mark.slow
def test_one_reduce_per_name_at_a_time_and_results_alike_however_planned(tmp_path, ray_session, monkeypatch,
                                                                          cli):
    """A second reduce of the same name is refused while the first holds the lease (exit 2,
    one line, nothing written); another name runs meanwhile, planned in many small parts,
    and its results are bit-identical; results.zarr's metadata is consolidated."""
    import pyarrow.dataset as pads
    import xarray as xr
    import zarr

    import gradlake.stages.query
    from gradlake.config import RayConfig, ReduceConfig
    from gradlake.distributed import reduce_tasks
    from gradlake.distributed.reduce_tasks import run_reduce
    from gradlake.store import GradientStore

    ds = make_dataset(str(tmp_path / "data"), per_class=4, n_times=6)
    store = make_store(str(tmp_path / "store"), ds, checkpoints=("epoch-0001",), k=8, shard_rows=8)
    settings = dict(damping=1e-3, pairs=("CC", "EC"), normalize=("none", "row-std"), block_rows=7, topk=2,
                    distance_pairs=0, tile_max=0, topk_queries="split == 'test'")
    holding, release = threading.Event(), threading.Event()
    real_ensure_ray = reduce_tasks.ensure_ray

    def ensure_ray(*args):  # the first reduce holds its lease until released
        if threading.current_thread().name == "first":
            holding.set()
            assert release.wait(120)
        return real_ensure_ray(*args)

    monkeypatch.setattr(reduce_tasks, "ensure_ray", ensure_ray)
    reads = []  # the driver's reads of the samples table (the tasks run elsewhere)
    real_samples = GradientStore.samples

    def samples(self, checkpoint=None, where=None, **kwargs):
        reads.append(kwargs.get("shards"))
        return real_samples(self, checkpoint, where, **kwargs)

    monkeypatch.setattr(GradientStore, "samples", samples)
    first = threading.Thread(target=run_reduce, name="first",
                             args=(store.url, ReduceConfig(name="one", **settings), RayConfig()))
    first.start()
    try:
        assert holding.wait(120)
        code, out, err = cli(["reduce", store.url, "--name", "one", "--quiet"])
        assert code == 2 and out == ""
        assert len(err.strip().splitlines()) == 1 and "being written by" in err and "reduce 'one'" in err
        assert sorted(p.name for p in (tmp_path / "store/reduce/one").iterdir()) == ["lease.json"]
        monkeypatch.setattr(gradlake.stages.query, "PART_ROWS", 5)  # many parts, cut inside trajectories
        run_reduce(store.url, ReduceConfig(name="two", **settings), RayConfig())
    finally:
        release.set()
        first.join()
    assert not (tmp_path / "store/reduce/one/lease.json").exists()  # released
    assert reads and None not in reads  # the driver reads the samples table part by part, never whole

    groups = {name: zarr.open_consolidated(f"{store.reduce_url(name)}/results.zarr") for name in ("one", "two")}
    listed = set(groups["one"].metadata.consolidated_metadata.flattened_metadata)
    assert {"epoch-0001/twotime", "epoch-0001/transfer", "epoch-0001/metric", "epoch-0001/pair"} <= listed
    for key in ("twotime", "class_twotime", "transfer", "metric"):
        assert groups["one"][f"epoch-0001/{key}"][...].tobytes() == groups["two"][f"epoch-0001/{key}"][...].tobytes()
    for folder in ("topk.parquet", "self_influence.parquet", "lags.parquet", "lag_stats.parquet"):
        one, two = (sorted(map(repr, pads.dataset(f"{store.reduce_url(n)}/{folder}", partitioning="hive")
                               .to_table().to_pylist())) for n in ("one", "two"))
        assert one == two and one, folder
    ds_x = xr.open_zarr(f"{store.reduce_url('one')}/results.zarr", group="epoch-0001", consolidated=True)
    assert ds_x["transfer"].dims == ("lambda", "pair", "normalization", "response_class", "perturbation_class")
    assert list(ds_x["pair"].values) == ["CC", "EC"]


@pytest.mark.parametrize("setting, message", [
    ({"tile_rows": "t <"}, "reduce.tile_rows: "), ({"response": "t > 99"}, "reduce.response: 't > 99' selects no"),
    ({"perturbation": "class == 'zz'"}, "reduce.perturbation: "), ({"reference_split": "val"}, "no sample of split 'val'"),
])
def test_bad_selections_are_refused_before_anything_is_written(tmp_path, monkeypatch, setting, message):
    import gradlake.stages.query
    from gradlake.config import RayConfig, ReduceConfig
    from gradlake.stages.reduce_plan import check_settings
    from gradlake.errors import InputError
    from gradlake.distributed.reduce_tasks import run_reduce

    ds = make_dataset(str(tmp_path / "data"), per_class=2, n_times=4)
    store = make_store(str(tmp_path / "store"), ds, checkpoints=("epoch-0001",), k=4, shard_rows=8)
    monkeypatch.setattr(gradlake.stages.query, "PART_ROWS", 5)  # checked beyond the first part too
    with pytest.raises(InputError, match=message):
        run_reduce(store.url, ReduceConfig(**setting), RayConfig())
    assert not (tmp_path / "store/reduce").exists()
    last = f"row >= {store.n_rows - 1}"  # in the last part only: found there
    assert check_settings(store, ReduceConfig(response=last, perturbation=last)) == ["epoch-0001"]
