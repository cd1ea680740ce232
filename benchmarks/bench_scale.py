"""Scale: how every command grows with N, on synthetic stores written through gradlake.store.

    python benchmarks/bench_scale.py [--quick] [--sizes N1,N2,...] [--k K] [--repeats R] [--dir DIR]
                                     [--steps info,query,...]

Builds one store per size (φ_C and φ_V with 2 probes, float16, the store's default layout;
N = 1.25e5, 5e5, 2e6 rows, each 4x the last; --quick: 2e4, 8e4) and runs on each, in a
fresh process per step (its peak RSS from wait4):
  write    the store written shard by shard (gradlake.store.ShardWriter), once per size
  info     open + summary() (N, shards done, bytes on storage)
  query    export of a filtered selection ("class == 'rp' and t < 4", ~7 % of rows) to Parquet
  topk1    batched top-k of 1 query over the train split, metric from V (two passes)
  topk256  the same with 256 queries in the same pass
  reduce   the aggregate reduce (CC, none + row-std; no tiles, top-k or distance pairs) on
           Ray; Ray's start-up is outside the timing, the peak RSS is the driver's
--steps runs only the steps named (the stores are always written). Steps other than write are
repeated ``--repeats`` times, sizes interleaved; medians.
Prints per size the seconds, peak MB and object counts, then per 4x N the time ratios
(target <= 4.4, linear), peak-memory ratios (target ~1, flat) and object-count ratios,
and ends with one line ``scale: ...`` holding the ratios (largest step of sizes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

STEPS = ("write", "info", "query", "topk1", "topk256", "reduce")


# --------------------------------------------------------------------------- one step (child process)
def run_step(step: str, url: str, n: int, k: int, name: str) -> float:
    """Run one step on the store at ``url``; returns its seconds (set-up excluded)."""
    if step == "write":
        from synthetic_store import spec_for, write_store

        start = time.perf_counter()
        write_store(url, spec_for(n, k))
        return time.perf_counter() - start
    if step == "reduce":
        from gradlake.config import RayConfig, ReduceConfig
        from gradlake.distributed.cluster import ensure_ray
        from gradlake.progress import set_quiet
        from gradlake.distributed.reduce_tasks import run_reduce

        set_quiet(True)
        ensure_ray()
        settings = ReduceConfig(name=name, pairs=("CC",), normalize=("none", "row-std"), topk=0,
                                distance_pairs=0, tile_max=0)
        start = time.perf_counter()
        run_reduce(url, settings, RayConfig())
        return time.perf_counter() - start
    from gradlake.query import export, open_store, topk

    start = time.perf_counter()
    store = open_store(url)
    if step == "info":
        store.summary()
    elif step == "query":
        out = os.path.join(os.path.dirname(url), f"{name}.parquet")
        export(store, out, "class == 'rp' and t < 4", "C")
        os.remove(out)
    else:
        q = int(step[len("topk"):])
        topk(store, f"row < {q}", "split == 'train'", k=10)
    return time.perf_counter() - start


def child(step: str, url: str, n: int, k: int, name: str) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one step in a fresh process (its progress lines hidden)."""
    env = dict(os.environ, GRADLAKE_QUIET="1")
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, __file__, "--step", step, "--url", url, "--n", str(n),
                                 "--k", str(k), "--name", name], stdout=subprocess.PIPE, stderr=err, env=env)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            err.seek(0)
            raise RuntimeError(f"step {step} at N={n} failed (exit {proc.returncode}):\n"
                               + err.read().decode(errors="replace")[-3000:])
    return json.loads(out.decode().strip().splitlines()[-1])["seconds"], usage.ru_maxrss / 1024


def objects(root: str) -> dict[str, int]:
    counts = {}
    for part in ("grads.zarr", "samples.parquet", "commits", ""):
        folder = os.path.join(root, part)
        counts[part or "all"] = sum(len(files) for _, _, files in os.walk(folder))
    return counts


# --------------------------------------------------------------------------- driver
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (2e4, 8e4)")
    parser.add_argument("--sizes", default="", help="comma-separated row counts (each 4x the last)")
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=0, help="default: 3 with --quick, else 1")
    parser.add_argument("--dir", default=None, help="where to build the stores (default: a temp dir)")
    parser.add_argument("--steps", default=",".join(STEPS[1:]),
                        help=f"comma-separated steps to run besides write (of {', '.join(STEPS[1:])})")
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--name", default="bench", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        print(json.dumps({"seconds": run_step(args.step, args.url, args.n, args.k, args.name)}))
        return
    sizes = [int(float(s)) for s in args.sizes.split(",")] if args.sizes else (
        [20_000, 80_000] if args.quick else [125_000, 500_000, 2_000_000])
    repeats = args.repeats or (3 if args.quick else 1)
    steps = ["write", *(s for s in STEPS[1:] if s in args.steps.split(","))]
    unknown = set(args.steps.split(",")) - set(STEPS)
    if unknown:
        parser.error(f"--steps: unknown step(s) {', '.join(sorted(unknown))}; choose from {', '.join(STEPS[1:])}")
    root = tempfile.mkdtemp(prefix="bench-scale-", dir=args.dir)
    seconds = {(n, s): [] for n in sizes for s in STEPS}
    peak = {(n, s): [] for n in sizes for s in STEPS}
    counts = {}
    try:
        for n in sizes:
            url = os.path.join(root, f"store-{n}")
            t, m = child("write", url, n, args.k, "w")
            seconds[n, "write"].append(t)
            peak[n, "write"].append(m)
            counts[n] = objects(url)
            print(f"N={n:>9,}: written in {t:7.1f} s, {counts[n]['all']:,} objects, "
                  f"{sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(url) for f in fs) / 1e9:.2f} GB",
                  flush=True)
        for r in range(repeats):
            for step in steps[1:]:
                for n in sizes:
                    t, m = child(step, os.path.join(root, f"store-{n}"), n, args.k, f"r{r}")
                    seconds[n, step].append(t)
                    peak[n, step].append(m)
                    print(f"  repeat {r} {step:8s} N={n:>9,}: {t:7.2f} s  peak {m:7.0f} MB", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = statistics.median
    print(f"\nk={args.k}, float16, C + V (2 probes); medians of {repeats} repeat(s)")
    print(f"{'N':>10} " + " ".join(f"{s + ' s':>10}" for s in steps) + "   peak MB " + "/".join(steps))
    for n in sizes:
        print(f"{n:>10,} " + " ".join(f"{med(seconds[n, s]):10.2f}" for s in steps) + "   "
              + "/".join(f"{med(peak[n, s]):.0f}" for s in steps)
              + f"   objects {counts[n]['all']:,} (zarr {counts[n]['grads.zarr']:,}, parquet "
                f"{counts[n]['samples.parquet']:,}, commits {counts[n]['commits']:,})")
    ratios = {}
    for small, big in zip(sizes, sizes[1:]):
        time_r = {s: med(seconds[big, s]) / med(seconds[small, s]) for s in steps}
        mem_r = {s: med(peak[big, s]) / med(peak[small, s]) for s in steps}
        obj_r = counts[big]["all"] / counts[small]["all"]
        ratios = {"time": time_r, "memory": mem_r, "objects": obj_r, "from": small, "to": big}
        print(f"{small:,} -> {big:,} ({big / small:.0f}x N): time " + " ".join(f"{s} {v:.2f}" for s, v in time_r.items())
              + "  (target <= 4.4)")
        print(f"{'':>{len(f'{small:,} -> {big:,} ({big / small:.0f}x N)')}}  peak memory "
              + " ".join(f"{s} {v:.2f}" for s, v in mem_r.items()) + f"  (target ~1)   objects {obj_r:.2f}")
    print(f"scale: N {ratios['from']}->{ratios['to']} time " + " ".join(f"{s}={v:.2f}" for s, v in ratios["time"].items())
          + " | memory " + " ".join(f"{s}={v:.2f}" for s, v in ratios["memory"].items())
          + f" | objects={ratios['objects']:.2f}")


if __name__ == "__main__":
    main()
