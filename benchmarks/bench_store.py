"""Gradient store I/O: write bandwidth vs one raw file, bytes on disk, read bandwidth; the layout at scale.

    python benchmarks/bench_store.py [--quick] [--dir DIR] [--rows 100000,1000000]

Prints medians over repeats measured in one run (ratios: the median of each repeat's pair,
store and raw run back to back, so that load drifting on a shared machine cancels):
  write_ratio  = store write bandwidth / raw single-file write bandwidth (same bytes, same disk)
  disk_ratio   = bytes of grads.zarr on disk / (N * k * 2)   (float16)
  read_ratio   = store read bandwidth (all rows, float32 out) / raw file read (np.fromfile)
Both sides end with os.sync(), so the page cache is flushed inside the timing.

Then, per N of --rows (C and V with 2 probes, k = 64), the store's own layout (shards sized
by the store, compacted) against small shards left uncompacted (512 rows, as every store
was before format 2), interleaved: objects in the store, write time (create, commit every
shard, compact) and open time (open, summary as `info` does, the whole samples table):
  objects_ratio, write_ratio, open_ratio = small-shard layout / the store's layout
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
from gradlake.store import GradientStore, ShardWriter, StoreSpec, compact, create_store
from gradlake.store.spec import chunk_rows_for, shard_rows_for

SMALL_SHARD_ROWS = 512  # every store's shard size before format 2


def make_spec(n_rows: int, k: int, shard_rows: int, observables=("C",), probes: int = 1) -> StoreSpec:
    return StoreSpec(
        dataset={"url": "bench", "fingerprint": "0" * 64}, model={"name": "bench"},
        projector={"seed": 0}, observables=tuple(observables), probes=probes, probe_seed=0, k=k,
        dtype="float16", n_rows=n_rows, shard_rows=shard_rows, chunk_rows=chunk_rows_for(shard_rows, k * 2),
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


def count_objects(root: str) -> int:
    return sum(len(fs) for _, _, fs in os.walk(root))


LAYOUT_K, LAYOUT_PROBES = 64, 2


def layout_store(url: str, n: int, shard_rows: int, compacted: bool) -> tuple[float, float, int]:
    """(write s, open s, objects) of a synthetic C + V store of ``n`` rows."""
    spec = make_spec(n, LAYOUT_K, shard_rows, ("C", "V"), LAYOUT_PROBES)
    rng = np.random.default_rng(1)
    start = time.perf_counter()
    create_store(url, spec, {"bench": {"sha256": "0" * 64}}, index=index_table(np.arange(n, dtype=np.int64)))
    writer = ShardWriter(url)
    for shard in range(spec.n_shards):
        lo, hi = spec.shard_range(shard)
        phis = {"C": rng.standard_normal((hi - lo, LAYOUT_K), dtype=np.float32),
                "V": rng.standard_normal((hi - lo, LAYOUT_PROBES, LAYOUT_K), dtype=np.float32)}
        writer.commit("bench", shard, index_table(np.arange(lo, hi, dtype=np.int64)),
                      np.ones(hi - lo, np.float32), phis)
    if compacted:
        compact(GradientStore.open(url))
    os.sync()
    write_s = time.perf_counter() - start
    start = time.perf_counter()
    store = GradientStore.open(url)
    summary = store.summary()
    rows = store.samples().num_rows
    open_s = time.perf_counter() - start
    assert summary["checkpoints"]["bench"]["complete"] and rows == n
    return write_s, open_s, count_objects(url)


def layout_section(sizes: list[int], repeats: int, root: str) -> None:
    widest = LAYOUT_K * 2 * LAYOUT_PROBES
    for n in sizes:
        auto = shard_rows_for(n, widest)
        results = {"store": [], "small": []}
        for i in range(repeats):
            for name, shard_rows, compacted in (("store", auto, True), ("small", SMALL_SHARD_ROWS, False)):
                url = os.path.join(root, f"layout-{name}-{n}-{i}")
                results[name].append(layout_store(url, n, shard_rows, compacted))
                shutil.rmtree(url)
        med = statistics.median
        store, small = results["store"], results["small"]
        print(f"layout N={n} k={LAYOUT_K} C+V(probes {LAYOUT_PROBES}) repeats={repeats}: "
              f"store's layout shard_rows={auto} objects={store[0][2]} write {med(r[0] for r in store):.2f} s "
              f"open {med(r[1] for r in store):.3f} s | {SMALL_SHARD_ROWS}-row shards uncompacted "
              f"objects={small[0][2]} write {med(r[0] for r in small):.2f} s open {med(r[1] for r in small):.3f} s")
        print(f"layout N={n}: objects_ratio = {small[0][2] / store[0][2]:.1f}  "
              f"write_ratio = {med(b[0] / a[0] for a, b in zip(store, small)):.2f}  "
              f"open_ratio = {med(b[1] / a[1] for a, b in zip(store, small)):.2f}  (small shards / store's layout)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat (smoke run)")
    parser.add_argument("--dir", default=None, help="directory on the disk to measure (default: a temp dir)")
    parser.add_argument("--shard-rows", type=int, default=GradsConfig().shard_rows,
                        help="rows per shard (default: sized by the store)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", default="100000,1000000", help="N of the layout section, comma-separated")
    parser.add_argument("--layout-repeats", type=int, default=3)
    args = parser.parse_args()
    n, k, repeats = (2048, 1024, 1) if args.quick else (16384, 2048, args.repeats)
    shard_rows = args.shard_rows or shard_rows_for(n, k * 2)
    phi = np.random.default_rng(0).standard_normal((n, k)).astype(np.float32)
    nbytes = n * k * 2
    root = tempfile.mkdtemp(prefix="bench-store-", dir=args.dir)
    write_s, raw_s, read_s, raw_read_s = [], [], [], []
    try:
        for i in range(repeats):
            url, raw = os.path.join(root, f"store{i}"), os.path.join(root, f"raw{i}.bin")
            write_s.append(write_store(url, phi, shard_rows))
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
        sizes = [10_000, 100_000] if args.quick else [int(n) for n in args.rows.split(",")]
        layout_section(sizes, 1 if args.quick else args.layout_repeats, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = statistics.median
    mb = nbytes / 1e6
    print(f"N={n} k={k} float16 payload={mb:.1f} MB shard_rows={shard_rows} repeats={repeats}")
    print(f"store write {mb / med(write_s):8.1f} MB/s   raw write {mb / med(raw_s):8.1f} MB/s   "
          f"write_ratio = {med(r / w for r, w in zip(raw_s, write_s)):.3f}  (target >= 0.70)")
    print(f"grads.zarr on disk {zarr_bytes / 1e6:.2f} MB   disk_ratio = {zarr_bytes / nbytes:.4f}  (target <= 1.05)"
          f"   whole store (with samples.parquet, commits) = {store_bytes / nbytes:.4f}")
    print(f"store read {mb / med(read_s):8.1f} MB/s   raw read {mb / med(raw_read_s):8.1f} MB/s   "
          f"read_ratio = {med(r / s for r, s in zip(raw_read_s, read_s)):.3f}")


if __name__ == "__main__":
    main()
