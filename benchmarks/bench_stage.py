"""The grads stage: its throughput against in-process capture, and worker memory vs data size.

    python benchmarks/bench_stage.py [--quick] [--no-ray] [--device cpu|cuda]

Prints, measured in one run (medians over --repeats):
  io_ratio      = ShardWorker throughput (read samples + capture + commit to the store, no Ray)
                  / in-process capture throughput (samples already in memory, nothing written)
  stage_ratio_1 = stage throughput with 1 Ray worker / in-process capture throughput
  stage_ratio_2 = stage throughput with 2 Ray workers / (2 x in-process capture throughput)
                  (stage throughput = samples / wall time of run_grads, actor start-up included;
                  "steady" leaves out the start-up: actors starting and loading the model)
  rss_ratio     = peak RSS of a worker at 4N samples / at N samples (no Ray; bounded by shard)
Ray is started once before any timing (ensure_ray); every run computes into a new store.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import statistics
import tempfile
import time

import numpy as np

from gradlake.config import GradsConfig

CHANNELS = ("rho", "rho_vx", "rho_vy", "E")


def write_inputs(root: str, n_traj: int, n_times: int, res: int, model: str, seed: int = 0):
    """A random Euler-like dataset and one checkpoint of a tiny model: (data URL, checkpoint path)."""
    import torch

    from gradlake import models
    from gradlake.data import DatasetWriter
    from gradlake.models.checkpoint import save_checkpoint

    rng = np.random.default_rng(seed)
    url = f"{root}/data-{n_traj}"
    writer = DatasetWriter(url, n_trajectories=n_traj, times=np.arange(n_times) * 0.1,
                           channels=CHANNELS, resolution=(res, res), family="euler")
    for i in range(n_traj):
        writer.write(i, 1.0 + rng.random((1, n_times, len(CHANNELS), res, res)))
    writer.finish(classes=["rp"] * n_traj, splits=["train"] * n_traj, sources=["bench"] * n_traj,
                  params=[{}] * n_traj, provenance={"bench": True})
    config = models.config(model, "tiny", len(CHANNELS), res)
    torch.manual_seed(0)
    path = save_checkpoint(f"{root}/train/checkpoints/epoch-0001", models.from_config(config), config,
                           {"epoch": 1, "channels": list(CHANNELS)})
    return url, path


def in_process(data: str, checkpoint: str, settings: GradsConfig, repeats: int) -> float:
    """Capture throughput (samples/s) with the samples already in memory."""
    from gradlake.data import Dataset
    from gradlake.stages.grads_unit import Capture

    ds = Dataset.open(data)
    rows = ds.index().select()
    x, y = ds.samples(rows)
    capture = Capture(settings, ds.channels, None)
    model = capture.load(checkpoint)
    capture(model, x[:settings.batch_size], y[:settings.batch_size], rows[:settings.batch_size])  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(rows), settings.batch_size):
            sl = slice(i, i + settings.batch_size)
            capture(model, x[sl], y[sl], rows[sl])
        _sync(settings.device)
        times.append(time.perf_counter() - start)
    return len(rows) / statistics.median(times)


def shard_worker(data: str, checkpoint: str, store: str, settings: GradsConfig) -> tuple[float, float]:
    """(samples/s, peak RSS MB) of a ShardWorker committing every shard into a new store, no Ray."""
    from gradlake.stages.grads_plan import prepare
    from gradlake.stages.grads_unit import ShardWorker, WorkerSettings

    plan = prepare(data, [checkpoint], store, settings, {})
    worker = ShardWorker(WorkerSettings(data, store, settings))
    worker.run(plan.tasks[0])  # loads the model; not timed (the in-process side warms up too)
    start = time.perf_counter()
    records = [worker.run(task) for task in plan.tasks[1:]]
    _sync(settings.device)
    seconds = time.perf_counter() - start
    return sum(r["samples"] for r in records) / seconds, max(r["peak_rss_mb"] for r in records)


def _rss_child(args, queue) -> None:
    queue.put(shard_worker(*args)[1])


def peak_rss(data: str, checkpoint: str, store: str, settings: GradsConfig) -> float:
    """Peak RSS of a fresh process that works through every shard (spawned: nothing inherited)."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_rss_child, args=((data, checkpoint, store, settings), queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def stage(data: str, checkpoint: str, store: str, settings: GradsConfig) -> tuple[float, float]:
    """(samples/s over the whole run, samples/s after start-up) of run_grads."""
    from gradlake.distributed.grads_stage import run_grads

    summary = run_grads(data, [checkpoint], store, settings)
    samples, seconds = summary["samples_computed"], summary["seconds"]
    return samples / seconds, samples / (seconds - summary["startup_s"])


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat (smoke run)")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray stage runs")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the capture's device)")
    parser.add_argument("--model", default="unet", help="unet or vit (tiny preset)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    n_traj, res, repeats = (8, 32, 1) if args.quick else (32, 64, args.repeats)
    n_times = 9
    settings = GradsConfig(observables=("C", "V"), k_in=8, k_out=8, shard_rows=32, batch_size=16,
                           device=args.device, threads_per_worker=1, workers=1)
    if args.device == "cpu":
        import torch

        torch.set_num_threads(1)  # the same as each CPU worker
    with tempfile.TemporaryDirectory(prefix="bench-stage-") as root:
        data, checkpoint = write_inputs(root, n_traj, n_times, res, args.model)
        big, big_checkpoint = write_inputs(f"{root}/x4", 4 * n_traj, n_times, res, args.model)
        n = n_traj * (n_times - 1)
        print(f"model={args.model} tiny, res={res}, N={n} samples, observables C,V, k_in=k_out=8, "
              f"device={args.device}, repeats={repeats}")
        base = in_process(data, checkpoint, settings, repeats)
        io = statistics.median(shard_worker(data, checkpoint, f"{root}/sw{i}", settings)[0]
                               for i in range(repeats))
        print(f"in-process capture {base:8.1f} samples/s   shard worker (read+capture+commit) {io:8.1f} "
              f"samples/s   io_ratio = {io / base:.3f}  (overhead target <= 10%)")
        if not args.no_ray:
            from gradlake.distributed.cluster import ensure_ray

            ensure_ray(num_cpus=2)
            for workers in (1, 2):
                runs = [stage(data, checkpoint, f"{root}/stage{workers}-{i}",
                              dataclasses.replace(settings, workers=workers)) for i in range(repeats)]
                rate, steady = (statistics.median(r[j] for r in runs) for j in (0, 1))
                print(f"stage, {workers} worker(s) {rate:8.1f} samples/s (steady {steady:.1f})   "
                      f"stage_ratio_{workers} = {rate / (workers * base):.3f}, steady "
                      f"{steady / (workers * base):.3f}  (overhead target <= 10%)")
        small = peak_rss(data, checkpoint, f"{root}/rss-n", settings)
        large = peak_rss(big, big_checkpoint, f"{root}/rss-4n", settings)
        print(f"worker peak RSS: N={n}: {small:.0f} MB, 4N={4 * n}: {large:.0f} MB   "
              f"rss_ratio = {large / small:.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
