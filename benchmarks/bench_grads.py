"""Projected per-example gradients: speed and memory against a training step and dense baselines,
and the accuracy of projected inner products against exact ones.

    python benchmarks/bench_grads.py                 # small UNet and ViT, 64², batch 16, 2 threads
    python benchmarks/bench_grads.py --quick         # tiny models, a smoke run
    python benchmarks/bench_grads.py --study         # projected vs exact inner products, several k
    python benchmarks/bench_grads.py --device cuda --precision bfloat16
    python benchmarks/bench_grads.py --threads 1 --clock cpu --no-memory   # CPU seconds: steadier on a busy machine

Methods, timed in one process with interleaved repeats (medians), same model, batch, threads:
  train     forward + scaled-MSE loss + backward with parameter gradients (a training step)
  floor     forward + activation-only backward with frozen parameters
  gradlake  gradlake.grads.compute, observable "C", Projector(k_in, k_out)
  vmap      torch.func vmap(grad) full per-sample gradients (compute(projector=None)), then P
  loop      a per-sample autograd loop, then P
Peak memory: each method once in a fresh subprocess; peak RSS above the RSS before the method
(Linux VmHWM, reset through /proc/self/clear_refs), or torch.cuda peak allocated on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from gradlake import models, physics
from gradlake.grads import Projector, compute

METHODS = ("train", "floor", "gradlake", "vmap", "loop")


def make_batch(batch: int, resolution: int, device: str, seed: int = 0, offset: float = 1.0):
    """Smooth fields (a few random Fourier modes) around ``offset``, and slightly evolved targets."""
    gen = torch.Generator().manual_seed(seed)
    grid = torch.linspace(0, 2 * torch.pi, resolution + 1)[:-1]
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    fields = torch.zeros(batch, 4, resolution, resolution)
    for _ in range(4):
        kx, ky = torch.randint(1, 4, (2, batch, 4, 1, 1), generator=gen)
        amp, phase = torch.rand((2, batch, 4, 1, 1), generator=gen)
        fields += 0.3 * amp * torch.sin(kx * xx + ky * yy + 2 * torch.pi * phase)
    x = offset + fields
    y = offset + torch.roll(fields, shifts=1, dims=-1)
    return x.to(device), y.to(device)


def method(name: str, model, x, y, projector: Projector, precision: str):
    """A no-argument callable running one batch of ``name``."""
    params = list(model.parameters())

    def train():
        model.zero_grad(set_to_none=True)
        physics.scaled_mse(model(x), y).sum().backward()

    def floor():
        for p in params:
            p.requires_grad_(False)
        try:
            leaf = x.clone().requires_grad_()
            pred = model(leaf)
            r = physics.residuals(pred, x, y, ("C",), [f"c{i}" for i in range(x.shape[1])])["C"]
            torch.autograd.grad(pred, leaf, r)
        finally:
            for p in params:
                p.requires_grad_(True)

    def gradlake():
        compute(model, x, y, ("C",), projector, precision=precision)

    def vmap():
        projector.apply(model, compute(model, x, y, ("C",), None)["C"])

    def loop():
        rows = []
        for b in range(x.shape[0]):
            loss = physics.scaled_mse(model(x[b:b + 1]), y[b:b + 1]).sum()
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
        projector.apply(model, torch.stack(rows))

    return {"train": train, "floor": floor, "gradlake": gradlake, "vmap": vmap, "loop": loop}[name]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_methods(model, x, y, projector, names, repeats, slow_repeats, device, precision, clock=time.perf_counter):
    """Median seconds per batch (``clock``: wall or process CPU time); methods interleaved within each repeat."""
    fns = {n: method(n, model, x, y, projector, precision) for n in names}
    times = {n: [] for n in names}
    for fn in fns.values():  # warm-up (and projector factors generated)
        fn()
    for r in range(repeats):
        for n, fn in fns.items():
            if n in ("vmap", "loop") and r >= slow_repeats:
                continue
            sync(device)
            start = clock()
            fn()
            sync(device)
            times[n].append(clock() - start)
    return {n: statistics.median(t) for n, t in times.items()}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_memory_mib(name, model, x, y, projector, device, precision) -> float:
    """Peak memory of one run of ``name`` above what was held before it (MiB)."""
    fn = method(name, model, x, y, projector, precision)
    if device.startswith("cuda"):
        fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    fn()  # warm-up: lazy initialisation (kernels, caches, imports) is not the method's memory
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    fn()
    return (_rss_kib("VmHWM") - before) / 1024


def build(args, name):
    torch.manual_seed(0)
    model = models.build(name, args.preset, channels=4, resolution=args.resolution).to(args.device)
    x, y = make_batch(args.batch, args.resolution, args.device)
    projector = Projector(seed=0, k_in=args.k, k_out=args.k, conv=args.conv)
    return model, x, y, projector


def memory_child(args) -> None:
    """Runs in a fresh subprocess: one method, prints its peak memory as JSON."""
    torch.set_num_threads(args.threads)
    model, x, y, projector = build(args, args.model)
    print(json.dumps({"peak_mib": peak_memory_mib(args.method, model, x, y, projector, args.device,
                                                  args.precision)}))


def memory(args, name, names) -> dict[str, float]:
    out = {}
    for n in names:
        cmd = [sys.executable, __file__, "--memory-child", "--model", name, "--method", n,
               "--preset", args.preset, "--resolution", str(args.resolution), "--batch", str(args.batch),
               "--threads", str(args.threads), "--k", str(args.k), "--device", args.device,
               "--precision", args.precision, "--conv", args.conv]
        # Large blocks straight from (and back to) the OS, so RSS follows the live tensors.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if result.returncode:
            print(result.stderr[-2000:], file=sys.stderr)
            out[n] = float("nan")
            continue
        out[n] = json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]
    return out


def speed(args) -> None:
    torch.set_num_threads(args.threads)
    names = [m for m in METHODS if m not in args.skip]
    clock = {"wall": time.perf_counter, "cpu": time.process_time}[args.clock]
    print(f"# device {args.device}, {args.threads} threads, {args.clock} clock, batch {args.batch}, {args.resolution}², "
          f"k_in = k_out = {args.k} ({args.conv} conv factor), precision {args.precision}, "
          f"{args.repeats} interleaved repeats ({args.slow_repeats} for vmap/loop), medians")
    for name in args.models:
        model, x, y, projector = build(args, name)
        p = sum(q.numel() for q in model.parameters())
        t = time_methods(model, x, y, projector, names, args.repeats, args.slow_repeats, args.device,
                         args.precision, clock)
        mem = memory(args, name, names) if not args.no_memory else {}
        print(f"\n## {name} {args.preset}: p = {p:,}, k = {projector.k(model):,}")
        print(f"{'method':10s} {'s/batch':>9s} {'samples/s':>10s} {'speed vs train':>15s} "
              f"{'time / floor':>13s} {'peak MiB':>9s} {'mem / train':>12s}")
        for n in names:
            peak = mem.get(n, float("nan"))
            print(f"{n:10s} {t[n]:9.3f} {args.batch / t[n]:10.1f} {t['train'] / t[n]:14.2f}x "
                  f"{t[n] / t['floor']:12.2f}x {peak:9.1f} {peak / mem.get('train', float('nan')):11.2f}x")


def study(args) -> None:
    """Projected vs exact inner products over sample pairs, for several k."""
    torch.set_num_threads(args.threads)
    print(f"# projected vs exact <g_i, g_j> of the scaled-MSE gradients, {args.samples} samples, "
          f"{args.study_resolution}², seeds 0..{args.seeds - 1}; predicted = per-block JL "
          "(Σ_b (|g_ib|²|g_jb|² + <g_ib,g_jb>²) / k_b)")
    for name in args.models:
        torch.manual_seed(0)
        model = models.build(name, "tiny", channels=4, resolution=args.study_resolution)
        # Zero-mean fields: per-sample gradients that differ (not one shared bias direction).
        x, y = make_batch(args.samples, args.study_resolution, "cpu", seed=1, offset=0.0)
        exact = compute(model, x, y, ("C",), None)["C"].double()
        gram = exact @ exact.T
        off = ~torch.eye(len(gram), dtype=torch.bool)
        cos = gram / gram.diag().sqrt().outer(gram.diag().sqrt())
        print(f"\n## {name} tiny: p = {exact.shape[1]:,}; exact cosine between samples: "
              f"mean {cos[off].mean():.3f}, std {cos[off].std():.3f}")
        print(f"{'k_in=k_out':>10s} {'k':>7s} {'corr':>7s} {'rel err':>8s} {'predicted':>9s} "
              f"{'|cos err|':>9s} {'capture=apply':>13s}")
        for k in args.study_k:
            rows = []
            for seed in range(args.seeds):
                projector = Projector(seed=seed, k_in=k, k_out=k, conv=args.conv)
                phi = projector.apply(model, exact.float()).double()
                if seed == 0:  # the capture path gives the same φ (to float32 rounding)
                    captured = compute(model, x, y, ("C",), projector)["C"].double()
                    agree = float((captured - phi).norm() / phi.norm())
                approx = phi @ phi.T
                pcos = approx / approx.diag().sqrt().outer(approx.diag().sqrt())
                corr = torch.corrcoef(torch.stack([approx[off], gram[off]]))[0, 1]
                rows.append((float(corr), float((approx - gram).norm() / gram.norm()),
                             float((pcos - cos)[off].abs().mean())))
            predicted = _predicted_error(model, projector, exact, gram)
            corr, err, cerr = (statistics.mean(r[i] for r in rows) for i in range(3))
            print(f"{k:10d} {projector.k(model):7,d} {corr:7.3f} {err:8.3f} {predicted:9.3f} {cerr:9.3f} "
                  f"{agree:13.1e}")


def _predicted_error(model, projector, exact, gram) -> float:
    """Relative Frobenius error a dense iid JL of each block's k would give, in expectation."""
    variance = torch.zeros_like(gram)
    start = 0
    for block, (_, param) in zip(projector.spec(model)["parameters"], model.named_parameters()):
        g = exact[:, start:start + param.numel()]
        start += param.numel()
        if block["k"] >= param.numel():
            continue  # identity: exact
        norms = (g * g).sum(1)
        variance += (norms.outer(norms) + (g @ g.T) ** 2) / block["k"]
    return float(variance.sum().sqrt() / gram.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models, 32², batch 4, 2 repeats")
    parser.add_argument("--study", action="store_true", help="accuracy of projected inner products")
    parser.add_argument("--models", nargs="+", default=["unet", "vit"], choices=list(models.MODELS))
    parser.add_argument("--preset", default="small", help="model preset for the speed runs")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--k", type=int, default=16, help="k_in = k_out")
    parser.add_argument("--conv", default="full", choices=["separable", "full"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="wall: perf_counter; cpu: process CPU time (all threads; use with --threads 1)")
    parser.add_argument("--slow-repeats", type=int, default=2, help="repeats for vmap and loop")
    parser.add_argument("--skip", nargs="*", default=[], choices=list(METHODS[2:]), help="methods to leave out")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--samples", type=int, default=24, help="study: samples")
    parser.add_argument("--seeds", type=int, default=3, help="study: projector seeds per k")
    parser.add_argument("--study-k", type=int, nargs="+", default=[2, 4, 8, 16], help="study: k_in = k_out values")
    parser.add_argument("--study-resolution", type=int, default=64)
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(args)
    if args.quick:
        args.preset, args.resolution, args.batch, args.repeats, args.slow_repeats = "tiny", 32, 4, 2, 1
        args.samples, args.seeds, args.study_k, args.study_resolution = 8, 1, [2, 4], 32
    os.environ.setdefault("GRADLAKE_QUIET", "1")
    study(args) if args.study else speed(args)


if __name__ == "__main__":
    main()
