"""Residuals by autograd: their share of a projected-gradient batch.

The cotangents r_A = ∂O_A/∂ŷ of the observables are taken by autograd on each observable's
per-sample scalar (:func:`gradlake.physics.residuals`). This prints the time of the residuals of
"C", "M", "E" (the paper's task) and of a user task's loss and two observables, against the
time of :func:`gradlake.grads.compute` on the same batch (small UNet, Projector(16, 16)),
as medians of interleaved repeats; the ratio is the share residuals add to the capture.

    python benchmarks/bench_residuals.py [--quick] [--resolution 64] [--batch 16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from gradlake import models, physics
from gradlake.grads import Projector, compute
from gradlake.plugins import use_paths
from timing import timed


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny UNet, 32², batch 4, 2 repeats")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    preset = "small"
    if args.quick:
        preset, args.resolution, args.batch, args.repeats = "tiny", 32, 4, 2
    torch.set_num_threads(args.threads)
    use_paths([str(Path(__file__).resolve().parents[1] / "examples")])
    from byo_surrogate.task import RelativeL2Task

    torch.manual_seed(0)
    model = models.build("unet", preset, channels=4, resolution=args.resolution)
    x = 1.0 + 0.1 * torch.rand(args.batch, 4, args.resolution, args.resolution)
    y = 0.98 * x
    channels = physics.EULER_CHANNELS
    with torch.no_grad():
        pred = model(x)
    paper, user = physics.PDETask(), RelativeL2Task()
    calls = {
        "residuals_paper": lambda: physics.residuals(pred, x, y, ("C", "M", "E"), channels, task=paper),
        "residuals_user": lambda: physics.residuals(pred, x, y, ("C", "K", "mass_drift"), channels, task=user),
        "compute": lambda: compute(model, x, y, ("C", "M", "E"), Projector(seed=0, k_in=16, k_out=16),
                                   channels=channels),
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(args.repeats + 1):  # the first round warms up
        for name, call in calls.items():
            seconds = timed(call)
            if round_:
                times[name].append(seconds)
    median = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "model": f"unet {preset}", "grid": args.resolution, "batch": args.batch, "threads": args.threads,
        "seconds": {name: round(value, 5) for name, value in median.items()},
        "residuals_paper_per_compute": round(median["residuals_paper"] / median["compute"], 4),
        "residuals_user_per_compute": round(median["residuals_user"] / median["compute"], 4),
    }
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return result


if __name__ == "__main__":
    main()
