"""Accuracy per stored dimension: projected vs exact Gram matrices of per-example gradients, at equal k.

    python benchmarks/bench_projection.py                 # small UNet and ViT, 32², 16 samples
    python benchmarks/bench_projection.py --quick         # tiny models, a smoke run
    python benchmarks/bench_projection.py --resolution 64 --repeats 5
    python benchmarks/bench_projection.py --threads 1 --clock cpu   # CPU seconds: steadier on a busy machine

Methods, at one total k (that of the uniform k_in = k_out = --k projector):
  uniform   gradlake.grads.compute, Projector(k_in = k_out = k): the same rows for every layer
  energy    gradlake.grads.compute, rows per layer by gradient energy (gradlake.grads.allocation),
            calibrated on --calibration other samples (its one-off cost is printed apart)
  dense     exact per-sample gradients (torch.func vmap), then a dense Gaussian k x p projection
            generated on the fly in column blocks (what TRAK and dattri do on a CPU)
Exact reference: the per-sample gradients of the scaled-MSE loss (compute(projector=None)),
G = g gᵀ over the samples. Per method, medians over --repeats projector seeds (the timings
interleaved within each repeat): corr = Pearson correlation of the off-diagonal entries of
the projected Gram with the exact one (corr all: every entry), rel = ‖G̃ − G‖_F / ‖G‖_F,
diag = median over samples of |G̃_ii − G_ii| / G_ii, s/batch and dense time / method time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_grads import make_batch  # noqa: E402

from gradlake import models  # noqa: E402
from gradlake.grads import Projector, compute  # noqa: E402
from gradlake.grads.allocation import calibrate  # noqa: E402

COLUMNS = 8192  # columns of the dense projection generated at a time


def dense_projection(grads: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """grads [n, p] @ Pᵀ with P a k x p Gaussian (variance 1/k), generated block by block."""
    gen = torch.Generator(device=grads.device).manual_seed(seed)
    out = torch.zeros(grads.shape[0], k, device=grads.device)
    for start in range(0, grads.shape[1], COLUMNS):
        block = grads[:, start:start + COLUMNS]
        p = torch.randn(k, block.shape[1], generator=gen, device=grads.device)
        out += block @ p.T
    return out / k**0.5


def gram_agreement(phi: torch.Tensor, gram: torch.Tensor) -> dict[str, float]:
    approx = phi.double() @ phi.double().T
    off = ~torch.eye(len(gram), dtype=torch.bool)
    return {
        "corr": float(torch.corrcoef(torch.stack([approx[off], gram[off]]))[0, 1]),
        "corr_all": float(torch.corrcoef(torch.stack([approx.flatten(), gram.flatten()]))[0, 1]),
        "rel": float((approx - gram).norm() / gram.norm()),
        "diag": float(((approx.diag() - gram.diag()).abs() / gram.diag()).median()),
    }


def run(args, name: str) -> None:
    torch.manual_seed(0)
    model = models.build(name, args.preset, channels=4, resolution=args.resolution)
    x, y = make_batch(args.samples, args.resolution, "cpu", seed=1, offset=0.0)
    xc, yc = make_batch(args.calibration, args.resolution, "cpu", seed=2, offset=0.0)
    p = sum(q.numel() for q in model.parameters())
    exact = compute(model, x, y, ("C",), None)["C"]
    gram = exact.double() @ exact.double().T
    uniform = Projector(seed=0, k_in=args.k, k_out=args.k)
    k = uniform.k(model)
    started = time.perf_counter()
    energy = calibrate(model, xc, yc, k_total=k, seed=0)
    calibration_s = time.perf_counter() - started

    def projectors(seed):
        return {"uniform": Projector(seed=seed, k_in=args.k, k_out=args.k),
                "energy": Projector(seed=seed, allocation="energy", k_total=k, dims=energy.dims)}

    def method(m, seed):
        if m == "dense":
            return lambda: dense_projection(compute(model, x, y, ("C",), None)["C"], k, seed)
        projector = projectors(seed)[m]
        return lambda: compute(model, x, y, ("C",), projector)["C"]

    names = ("uniform", "energy", "dense")
    for m in names:
        method(m, 0)()  # warm-up (and the projector's factors generated)
    times = {m: [] for m in names}
    accuracy = {m: [] for m in names}
    for r in range(args.repeats):
        for m in names:
            fn = method(m, r)
            if m != "dense":
                fn()  # this seed's factors generated outside the timing (they are cached in a run)
            start = args.timer()
            phi = fn()
            times[m].append(args.timer() - start)
            accuracy[m].append(gram_agreement(phi, gram))
    t = {m: statistics.median(v) for m, v in times.items()}
    print(f"\n## {name} {args.preset}, {args.resolution}², {args.samples} samples: p = {p:,}, k = {k:,} "
          f"(uniform k_in = k_out = {args.k}; energy: k = {energy.k(model):,}, calibrated on "
          f"{args.calibration} other samples in {calibration_s:.1f} s)")
    print(f"{'method':8s} {'k':>6s} {'corr':>6s} {'corr all':>8s} {'rel':>6s} {'diag':>6s} {'s/batch':>8s} "
          f"{'dense / method':>14s}")
    for m in names:
        med = {key: statistics.median(a[key] for a in accuracy[m]) for key in accuracy[m][0]}
        k_m = k if m != "energy" else energy.k(model)
        print(f"{m:8s} {k_m:6,d} {med['corr']:6.3f} {med['corr_all']:8.3f} {med['rel']:6.3f} {med['diag']:6.3f} "
              f"{t[m]:8.3f} {t['dense'] / t[m]:13.1f}x")
    top = sorted(((a * b, n, (a, b)) for n, (a, b) in energy.dims["layers"].items()), reverse=True)[:4]
    print("energy: largest layer blocks (k_out x k_in): " + ", ".join(f"{n} {a}x{b}" for _, n, (a, b) in top))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models, 16², 8 samples, 2 repeats")
    parser.add_argument("--models", nargs="+", default=["unet", "vit"], choices=list(models.MODELS))
    parser.add_argument("--preset", default="small")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--calibration", type=int, default=4, help="calibration samples (a different batch)")
    parser.add_argument("--k", type=int, default=8, help="k_in = k_out of the uniform projector; sets the total k")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="wall: perf_counter; cpu: process CPU time (all threads; use with --threads 1)")
    args = parser.parse_args()
    args.timer = {"wall": time.perf_counter, "cpu": time.process_time}[args.clock]
    if args.quick:
        args.preset, args.resolution, args.samples, args.repeats, args.k = "tiny", 16, 8, 2, 4
    torch.set_num_threads(args.threads)
    os.environ.setdefault("GRADLAKE_QUIET", "1")
    print(f"# projected vs exact Gram of per-example scaled-MSE gradients; "
          f"{args.threads} threads, {args.clock} clock, "
          f"medians of {args.repeats} seeds (timings interleaved); corr = off-diagonal entries")
    for name in args.models:
        run(args, name)


if __name__ == "__main__":
    main()
