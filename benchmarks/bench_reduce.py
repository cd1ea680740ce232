"""Reduce benchmarks, ratios measured in one run (medians over repeats).

1. Aggregate reduce (metric, perturbation and response passes; no tiles/top-k/distance)
   on a store of N and of 4N samples: time ratio (target <= 4.4, i.e. linear).
2. Peak memory of that reduce at N and 4N: driver RSS increase and the largest Ray worker
   RSS (target: ratio ~1, independent of N).
3. Pairwise tiles: a row band of H tiles (the work of one tile task: rows read from the
   store, preconditioned, multiplied tile by tile with the next block prefetched) against a
   numpy matmul of the same shapes in memory (target >= 0.70), without and with the zarr
   write of the tiles.

    python benchmarks/bench_reduce.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time

os.environ.setdefault("GRADLAKE_QUIET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import ray  # noqa: E402,F401  (puts its bundled psutil on the path)
import psutil  # noqa: E402

from gradlake.config import RayConfig, ReduceConfig  # noqa: E402
from gradlake.store import ShardWriter, StoreSpec, create_store  # noqa: E402

STEPS = 16  # transitions per trajectory


def make_store(url: str, n_rows: int, k: int, shard_rows: int = 4096, seed: int = 0):
    """A complete float16 store of random φ: 3 classes, 16 transitions per trajectory."""
    n_traj = n_rows // STEPS
    rows = np.arange(n_traj * STEPS)
    traj = rows // STEPS
    split = np.array(["train"] * 13 + ["val"] + ["test"] * 6)[traj % 20]
    index = pa.table({"row": rows, "trajectory": traj, "t": (rows % STEPS).astype(np.int32),
                      "class": np.array(["rp", "crp", "rpui"])[traj % 3], "split": split})
    spec = StoreSpec(dataset={"url": "", "n_times": STEPS + 1}, model={}, projector={},
                     observables=("C", "M", "E", "V"), probes=1, probe_seed=0, k=k, dtype="float16",
                     n_rows=len(rows), shard_rows=shard_rows, chunk_rows=256,
                     splits=("train", "val", "test"), n_samples=len(rows),
                     n_shards=-(-len(rows) // shard_rows))
    store = create_store(url, spec, {"ck": {"sha256": "0" * 64}})
    writer = ShardWriter(url)
    rng = np.random.default_rng(seed)
    for s in range(spec.n_shards):
        part = index.slice(s * shard_rows, shard_rows)
        n = part.num_rows
        phis = {o: rng.normal(size=(n, k)).astype(np.float32) for o in "CME"}
        phis["V"] = rng.normal(size=(n, 1, k)).astype(np.float32)
        writer.commit("ck", s, part, np.zeros(n), phis)
    store.refresh()
    return store


class PeakMemory:
    """Samples the RSS of this process and of its Ray worker processes every 20 ms."""

    def __init__(self):
        self.me = psutil.Process()
        self.driver = self.worker = 0
        self._stop = threading.Event()

    def _workers(self):
        for child in self.me.children(recursive=True):
            try:
                if child.cmdline()[:1] and child.cmdline()[0].startswith("ray::"):
                    yield child
            except psutil.Error:
                continue

    def _run(self):
        while not self._stop.is_set():
            self.driver = max(self.driver, self.me.memory_info().rss)
            for w in self._workers():
                try:
                    self.worker = max(self.worker, w.memory_info().rss)
                except psutil.Error:
                    pass
            time.sleep(0.02)

    def __enter__(self):
        self.base = self.me.memory_info().rss
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()


def bench_aggregates(root: str, n: int, repeats: int, block_rows: int, k: int):
    from gradlake.distributed.reduce_tasks import run_reduce

    results = {}
    for size in (n, 4 * n):
        store = make_store(f"{root}/store-{size}", size, k)
        times, driver, worker = [], [], []
        for r in range(repeats + 1):
            settings = ReduceConfig(name=f"bench-{r}", block_rows=block_rows, tile_max=0, topk=0,
                                    distance_pairs=0)
            with PeakMemory() as mem:
                start = time.perf_counter()
                run_reduce(store.url, settings, RayConfig())
                elapsed = time.perf_counter() - start
            if r:  # the first run warms up the Ray workers
                times.append(elapsed)
                driver.append(mem.driver - mem.base)
                worker.append(mem.worker)
        results[size] = (statistics.median(times), statistics.median(driver), statistics.median(worker))
        print(f"  N={size:>7}: {results[size][0]:.2f} s, driver +{results[size][1] / 2**20:.0f} MiB, "
              f"largest worker {results[size][2] / 2**20:.0f} MiB")
    (t1, d1, w1), (t4, d4, w4) = results[n], results[4 * n]
    return t4 / t1, (d4 + 1) / (d1 + 1), w4 / w1


def bench_tiles(root: str, band: int, size: int, k: int, repeats: int):
    from gradlake import streaming
    from gradlake.reduce.metric import Metric
    from gradlake.reduce.output import ReduceOutput
    from gradlake.reduce.pairwise import precondition, tile

    n_cols = 4 * size
    store = make_store(f"{root}/tiles", max(band, n_cols), k)
    from gradlake.stages.reduce_pairwise import tile_work
    from gradlake.stages.reduce_source import StoreRef

    src = StoreRef(store.url, {}, "ck")
    inverse = Metric(np.eye(k) * 3.0).inverse(1e-4)
    rows_a, cols = np.arange(band), streaming.row_blocks(np.arange(n_cols), size)
    out = ReduceOutput(f"{root}/tiles-out")
    out.create_array("t/CC", (band, n_cols), (size, size), "float32", ("response", "perturbation"))
    a_mem = np.random.default_rng(0).normal(size=(band, k)).astype(np.float32)
    b_mem = np.random.default_rng(1).normal(size=(n_cols, k)).astype(np.float32)

    def compute():  # what a tile task does, minus the write
        a = precondition(src.read("C", rows_a), inverse)
        return [tile(a, b) for b in streaming.prefetched(lambda rows: src.read("C", rows), cols)]

    def timed(fn):
        fn()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    t_np = timed(lambda: [a_mem @ b_mem[i:i + size].T for i in range(0, n_cols, size)])
    t_band = timed(compute)
    t_write = timed(lambda: tile_work(src, "CC", inverse, rows_a, cols, out, "t/CC", 0))
    return t_np / t_band, t_np / t_write


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    args = parser.parse_args()
    n, repeats, band, tile_size = (2048, 1, 1024, 512) if args.quick else (16384, 3, 4096, 1024)
    from gradlake.distributed.cluster import ensure_ray

    ensure_ray(num_cpus=2)
    with tempfile.TemporaryDirectory() as root:
        print(f"aggregate reduce (k=64, 3 pairs x 3 normalisations, N={n} and {4 * n}):")
        time_ratio, driver_ratio, worker_ratio = bench_aggregates(root, n, repeats, 4096, 64)
        print(f"tiles (k=256, a band of {band} x {4 * tile_size}, tiles of {tile_size}):")
        tile_ratio, tile_write_ratio = bench_tiles(root, band, tile_size, 256, max(repeats, 3))
    print(f"aggregate time 4N / N          = {time_ratio:.2f}   (target <= 4.4)")
    print(f"driver peak memory 4N / N      = {driver_ratio:.2f}   (target ~1)")
    print(f"worker peak memory 4N / N      = {worker_ratio:.2f}   (target ~1)")
    print(f"tile throughput / numpy matmul = {tile_ratio:.2f}   (target >= 0.70)")
    print(f"  ... including the zarr write = {tile_write_ratio:.2f}")


if __name__ == "__main__":
    main()
