"""Gradient store I/O: write bandwidth vs one raw file, bytes on disk, read bandwidth.

    python benchmarks/bench_store.py [--quick] [--dir DIR]

Prints medians over repeats measured in one run (ratios: the median of each repeat's pair,
store and raw run back to back, so that load drifting on a shared machine cancels):
  write_ratio  = store write bandwidth / raw single-file write bandwidth (same bytes, same disk)
  disk_ratio   = bytes of grads.zarr on disk / (N * k * 2)   (float16)
  read_ratio   = store read bandwidth (all rows, float32 out) / raw file read (np.fromfile)
Both sides end with os.sync(), so the page cache is flushed inside the timing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
import pyarrow as pa

from gradlake.config import GradsConfig
from gradlake.store import GradientStore, ShardWriter, StoreSpec, create_store
from gradlake.store.spec import chunk_rows_for


def make_spec(n_rows: int, k: int, shard_rows: int) -> StoreSpec:
    return StoreSpec(
        dataset={"url": "bench", "fingerprint": "0" * 64}, model={"name": "bench"},
        projector={"seed": 0}, observables=("C",), probes=1, probe_seed=0, k=k, dtype="float16",
        n_rows=n_rows, shard_rows=shard_rows, chunk_rows=chunk_rows_for(shard_rows, k * 2),
        splits=("train",), n_samples=n_rows, n_shards=-(-n_rows // shard_rows),
    )


def index_table(rows: np.ndarray) -> pa.Table:
    return pa.table({"row": rows, "trajectory": rows // 8, "t": (rows % 8).astype(np.int32),
                     "class": pa.array(["rp"] * len(rows)), "split": pa.array(["train"] * len(rows))})


def write_store(url: str, phi: np.ndarray, shard_rows: int) -> float:
    n, k = phi.shape
    spec = make_spec(n, k, shard_rows)
    start = time.perf_counter()
    create_store(url, spec, {"bench": {"sha256": "0" * 64}})
    writer = ShardWriter(url)
    loss = np.ones(n, dtype=np.float32)
    for shard in range(spec.n_shards):
        lo, hi = spec.shard_range(shard)
        rows = np.arange(lo, hi, dtype=np.int64)
        writer.commit("bench", shard, index_table(rows), loss[lo:hi], {"C": phi[lo:hi]})
    os.sync()
    return time.perf_counter() - start


def write_raw(path: str, phi: np.ndarray) -> float:
    start = time.perf_counter()
    with open(path, "wb") as f:
        f.write(memoryview(phi.astype(np.float16)))  # the same conversion as the store's
    os.sync()
    return time.perf_counter() - start


def disk_bytes(root: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat (smoke run)")
    parser.add_argument("--dir", default=None, help="directory on the disk to measure (default: a temp dir)")
    parser.add_argument("--shard-rows", type=int, default=GradsConfig().shard_rows,
                        help="rows per shard (default: GradsConfig's)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    n, k, repeats = (2048, 1024, 1) if args.quick else (16384, 2048, args.repeats)
    phi = np.random.default_rng(0).standard_normal((n, k)).astype(np.float32)
    nbytes = n * k * 2
    root = tempfile.mkdtemp(prefix="bench-store-", dir=args.dir)
    write_s, raw_s, read_s, raw_read_s = [], [], [], []
    try:
        for i in range(repeats):
            url, raw = os.path.join(root, f"store{i}"), os.path.join(root, f"raw{i}.bin")
            write_s.append(write_store(url, phi, args.shard_rows))
            raw_s.append(write_raw(raw, phi))
            store = GradientStore.open(url)
            start = time.perf_counter()
            data = store.read("bench", "C")
            read_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            np.fromfile(raw, dtype=np.float16).reshape(n, k).astype(np.float32)
            raw_read_s.append(time.perf_counter() - start)
            assert np.array_equal(data, phi.astype(np.float16).astype(np.float32))
        zarr_bytes = disk_bytes(os.path.join(root, "store0", "grads.zarr"))
        store_bytes = disk_bytes(os.path.join(root, "store0"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = statistics.median
    mb = nbytes / 1e6
    print(f"N={n} k={k} float16 payload={mb:.1f} MB shard_rows={args.shard_rows} repeats={repeats}")
    print(f"store write {mb / med(write_s):8.1f} MB/s   raw write {mb / med(raw_s):8.1f} MB/s   "
          f"write_ratio = {med(r / w for r, w in zip(raw_s, write_s)):.3f}  (target >= 0.70)")
    print(f"grads.zarr on disk {zarr_bytes / 1e6:.2f} MB   disk_ratio = {zarr_bytes / nbytes:.4f}  (target <= 1.05)"
          f"   whole store (with samples.parquet, commits) = {store_bytes / nbytes:.4f}")
    print(f"store read {mb / med(read_s):8.1f} MB/s   raw read {mb / med(raw_read_s):8.1f} MB/s   "
          f"read_ratio = {med(r / s for r, s in zip(raw_read_s, read_s)):.3f}")


if __name__ == "__main__":
    main()
