"""The reduce's results do not depend on how it was scheduled: same bits for 1, 2 or 8 tasks at once."""

import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from reduce_helpers import make_dataset, make_store

from gradlake.config import RayConfig, ReduceConfig
from gradlake.streaming import OrderedSum


def test_ordered_sum_tree_depends_only_on_the_count():
    for n, expected in [(1, "0"), (2, "(0+1)"), (3, "((0+1)+2)"), (5, "(((0+1)+(2+3))+4)"),
                        (7, "(((0+1)+(2+3))+((4+5)+6))")]:
        total = OrderedSum(lambda a, b: f"({a}+{b})")
        for i in range(n):
            total.push(str(i))
        assert total.result() == expected


@pytest.mark.slow
def test_reduce_outputs_are_bit_identical_for_any_number_of_workers(tmp_path, ray_session, monkeypatch):
    from gradlake.distributed import reduce_tasks
    from gradlake.distributed.reduce_tasks import run_reduce

    ds = make_dataset(str(tmp_path / "data"), per_class=6, n_times=9)
    store = make_store(str(tmp_path / "store"), ds, checkpoints=("epoch-0001",), k=24)
    settings = ReduceConfig(damping=1e-3, pairs=("CC", "EC"), normalize=("none", "row-std"), block_rows=8,
                            topk=0, distance_pairs=0, tile_max=0)
    outputs = {}
    for workers in (1, 2, 8):
        monkeypatch.setattr(reduce_tasks, "tasks_in_flight", lambda w=workers: w)
        name = f"w{workers}"
        run_reduce(store.url, dataclasses.replace(settings, name=name), RayConfig())
        url = store.reduce_url(name)
        group = zarr.open_group(f"{url}/results.zarr/epoch-0001", mode="r")
        arrays = {key: group[key][:] for key in ("metric", "twotime", "class_twotime", "transfer")}
        lags = pq.read_table(f"{url}/lag_stats.parquet/checkpoint=epoch-0001/part-0.parquet")
        outputs[workers] = arrays | {"lag_median": lags.column("median").to_numpy(),
                                     "pooled": lags.column("pooled_mean").to_numpy()}
    assert outputs[1]["metric"].any()
    for workers in (2, 8):
        for key, value in outputs[1].items():
            assert value.tobytes() == outputs[workers][key].tobytes(), (key, workers)
