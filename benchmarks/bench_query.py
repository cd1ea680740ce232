"""Top-k queries at bandwidth: one scoring pass over a store against the storage's raw
sequential read, on local disk and on S3 (a moto server), side by side.

    python benchmarks/bench_query.py [--quick] [--rows N] [--k K] [--repeats R] [--shard-rows S]
                                     [--no-ray] [--no-s3]

One store (φ_C only, float16) is written to both backends. Per repeat, interleaved:
  raw        every object of grads.zarr/<checkpoint>/C read once, in order: local files one
             after another, cold (this store's files dropped from the page cache with
             posix_fadvise before each timing); S3 objects with one fsspec ``cat`` of all keys
  Q=1/Q=256  gradlake.query.topk over every row (the metric given, so the pass reads φ_C
             only), in this process (parts in threads, one per core); local: cold
  ray        the same pass as Ray tasks (two parts per CPU)
Prints MB/s of φ payload and pass ÷ raw (median of the per-repeat ratios; target >= 0.70),
the CPU cost of each stage (MB per CPU-second, thread CPU time: robust to other load) and
the cores a pass at 0.7 x raw would need, the approximate index's recall, then one line
``query: ...`` holding the ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from synthetic_store import CHECKPOINT, spec_for, write_store  # noqa: E402

from gradlake.fsio import filesystem  # noqa: E402
from gradlake.query import open_store, topk  # noqa: E402
from gradlake.reduce.metric import Metric  # noqa: E402

for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                    ("AWS_DEFAULT_REGION", "us-east-1"), ("RAY_AUTH_MODE", "token")):
    os.environ.setdefault(name, value)  # dummy credentials of the local moto server only


def drop_cache(root: str) -> None:
    """Drop this folder's files from the page cache (only ours; no privileges needed)."""
    os.sync()  # dirty pages cannot be dropped
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
                               "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return server, endpoint
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError("moto_server did not start")


def raw_read(fs, paths: list[str], local: bool) -> int:
    if local:
        total = 0
        for path in paths:
            with open(path, "rb") as f:
                total += len(f.read())
        return total
    return sum(len(v) for v in fs.cat(paths).values())


def array_objects(url: str, storage_options) -> tuple:
    """(fs, keys of the objects of the C array's data, in order)."""
    fs, root = filesystem(f"{url}/grads.zarr/{CHECKPOINT}/C", storage_options)
    return fs, sorted(p for p in fs.find(root) if not p.endswith("zarr.json"))


def stage_rates(store, metric, k: int, rows: int = 16384, repeats: int = 5) -> dict[str, float]:
    """MB of φ payload per CPU-second of each stage of the pass, in one thread with one BLAS
    thread (medians of thread CPU time, so other load on the machine barely moves them):
    store.read of a warm block as the pass reads it (chunk fetch, crc32c, float16 as stored),
    and the scoring of Q = 1 and Q = 256 queries (cast slices, GEMM, TopK merge)."""
    from threadpoolctl import threadpool_limits

    from gradlake.reduce.pairwise import TopK, precondition, tile

    block = np.arange(min(rows, store.n_rows))
    for _ in range(2):  # warm: first calls pay for lazy set-up
        phi = store.read(CHECKPOINT, "C", block, dtype=store.spec.dtype)
    mb = len(block) * k * 2 / 1e6

    def rate(step) -> float:
        seconds = []
        for _ in range(repeats):
            start = time.thread_time()
            step()
            seconds.append(time.thread_time() - start)
        return mb / max(statistics.median(seconds), 1e-9)

    with threadpool_limits(1):
        out = {"read": rate(lambda: store.read(CHECKPOINT, "C", block, dtype=store.spec.dtype))}
        for q in (1, 256):
            a = precondition(phi[:q].astype(np.float32), metric.inverse(1.0))
            best = TopK(np.arange(q) - 10 * store.n_rows, 10)  # ids that are no candidate
            best.update(tile(a, phi), block)  # a full list, as in a pass
            out[f"score Q={q}"] = rate(lambda: best.update(tile(a, phi), block + store.n_rows))
    return out


def index_recall(url: str, queries: int, k: int = 10) -> list[str]:
    """Recall@k of the approximate index (default factory) against the brute-force pass."""
    try:
        from gradlake.approximate_index import ApproximateIndex, build_index
    except ImportError:
        return ["index: faiss-cpu is not installed (pip install 'gradlake[index]')"]
    start = time.perf_counter()
    record = build_index(url, where="", metric="C", damping=1.0)
    lines = [f"index {record['factory']} over {record['rows']} rows built in {time.perf_counter() - start:.1f} s"]
    store, where = open_store(url), f"row < {queries}"
    start = time.perf_counter()
    exact = topk(store, where, "", k=k, metric="C", damping=1.0)
    brute = time.perf_counter() - start
    index = ApproximateIndex(url)
    for nprobe in (1, 8, 32):
        start = time.perf_counter()
        approx = index.topk(where, k=k, nprobe=nprobe)
        seconds = time.perf_counter() - start
        hits = []
        for kind in ("top", "bottom"):
            pick = lambda t: {(r["query_row"], r["row"]) for r in t.to_pylist() if r["kind"] == kind}  # noqa: E731
            hits.append(len(pick(exact) & pick(approx)) / (queries * k))
        lines.append(f"index nprobe={nprobe:3d}: recall@{k} top {hits[0]:.3f} bottom {hits[1]:.3f}; "
                     f"{queries} queries in {seconds:.2f} s (brute-force pass {brute:.2f} s, metric pass included)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small store, one repeat (smoke run)")
    parser.add_argument("--rows", type=int, default=0)
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shard-rows", type=int, default=0, help="rows per shard (default: GradsConfig's)")
    parser.add_argument("--chunk-rows", type=int, default=0, help="rows per chunk (default: ~256 KB chunks)")
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--no-s3", action="store_true", help="local disk only: no moto server beside the pass")
    args = parser.parse_args()
    n = args.rows or (32768 if args.quick else 262144)
    repeats = 1 if args.quick else args.repeats
    spec = spec_for(n, args.k, observables=("C",), probes=1, shard_rows=args.shard_rows or None,
                    chunk_rows=args.chunk_rows or None)
    payload = n * args.k * 2
    root = tempfile.mkdtemp(prefix="bench-query-")
    urls, options, server = {"local": os.path.join(root, "store")}, {"local": None}, None
    try:
        if not args.no_s3:
            import boto3

            server, endpoint = start_moto()
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
            urls["s3"], options["s3"] = "s3://bench/store", {"endpoint_url": endpoint}
        started = time.perf_counter()
        for backend, url in urls.items():
            write_store(url, spec, options[backend])
        print(f"N={n} k={args.k} float16 payload={payload / 1e6:.1f} MB shard_rows={spec.shard_rows} "
              f"chunk_rows={spec.chunk_rows} (stores written in {time.perf_counter() - started:.1f} s)")
        metric = Metric(np.eye(args.k))
        for backend, url in urls.items():  # first-call costs (imports) outside the timings
            topk(open_store(url, options[backend]), "row < 1", "row < 64", k=10, metric=metric, damping=1.0)
        cases = ["raw", "Q=1", "Q=256"]
        if not args.no_ray:
            from gradlake.distributed.cluster import ensure_ray
            from gradlake.distributed.query_tasks import ray_mapper

            ensure_ray()
            import ray

            parts = 2 * int(ray.cluster_resources().get("CPU", 1))
            cases += ["Q=1 ray", "Q=256 ray"]
        seconds = {(b, c): [] for b in urls for c in cases}
        for _ in range(repeats):
            for backend, url in urls.items():
                local = backend == "local"
                for case in cases:
                    store = open_store(url, options[backend])
                    if local:
                        drop_cache(os.path.join(url, "grads.zarr"))
                    start = time.perf_counter()
                    if case == "raw":
                        got = raw_read(*array_objects(url, options[backend]), local)
                        assert got >= payload, (got, payload)
                    else:
                        q = int(case.split()[0][2:])
                        ray_args = ({"mapper": ray_mapper(), "parts": parts}
                                    if case.endswith("ray") else {})
                        table = topk(store, f"row < {q}", "", k=10, metric=metric, damping=1.0, **ray_args)
                        assert table.num_rows == 2 * 10 * q
                    seconds[backend, case].append(time.perf_counter() - start)
        per_core = stage_rates(open_store(urls["local"]), metric, args.k)
        recall = index_recall(urls["local"], 16 if args.quick else 64)
    finally:
        if server is not None:
            server.kill()
        shutil.rmtree(root, ignore_errors=True)
    med = statistics.median
    summary = []
    for backend in urls:
        raw = seconds[backend, "raw"]
        print(f"{backend:5s} raw read {payload / 1e6 / med(raw):8.1f} MB/s")
        for case in cases[1:]:
            ratio = med(r / s for r, s in zip(raw, seconds[backend, case]))
            print(f"{backend:5s} top-k {case:10s} {payload / 1e6 / med(seconds[backend, case]):8.1f} MB/s   "
                  f"pass / raw = {ratio:.2f}  (target >= 0.70)")
            summary.append(f"{backend} {case.replace(' ', '-')} {ratio:.2f}")
    print("per CPU-second (local, warm, one thread): "
          + "   ".join(f"{name} {rate:.0f} MB" for name, rate in per_core.items()))
    for q in (1, 256):
        per_mb = 1 / per_core["read"] + 1 / per_core[f"score Q={q}"]  # CPU-seconds per MB of the pass
        print(f"cores a pass at 0.7 x local raw needs at Q={q}: {0.7 * payload / 1e6 / med(seconds['local', 'raw']) * per_mb:.1f}")
    for line in recall:
        print(line)
    print("query: " + ", ".join(summary))


if __name__ == "__main__":
    main()
