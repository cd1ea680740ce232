"""Training-step throughput: samples/s of forward + scaled-MSE loss + backward.

The denominator the gradient stage is measured against. For each model (unet, vit), preset
(tiny, small) and grid (64², 128²): batch 16, median over repeats after warm-up, on the CPU
or one GPU. Prints a table; ratios are relative to the first row measured in the same run.

    python benchmarks/bench_train_step.py [--quick] [--device cuda] [--presets tiny small paper]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from gradlake import models, physics
from gradlake.train import resolve_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_seconds(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, repeats: int,
                 warmup: int) -> float:
    """Median wall time of one forward + loss + backward."""
    times = []
    for i in range(warmup + repeats):
        _sync(inputs.device)
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        physics.scaled_mse(model(inputs), targets).mean().backward()
        _sync(inputs.device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64² only, tiny presets, few repeats (smoke run)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:n]")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--resolutions", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    device = resolve_device(args.device)
    presets, resolutions, repeats = args.presets, args.resolutions, args.repeats
    if args.quick:
        presets, resolutions, repeats = ["tiny"], [64], 3

    rows = []
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"{torch.get_num_threads()} threads), batch {args.batch}, median of {repeats}")
    print(f"{'model':6} {'preset':6} {'grid':>5} {'params':>11} {'ms/step':>9} {'samples/s':>10} {'ratio':>7}")
    for name in models.MODELS:
        for preset in presets:
            for resolution in resolutions:
                torch.manual_seed(0)
                model = models.build(name, preset, channels=4, resolution=resolution).to(device)
                x = torch.randn(args.batch, 4, resolution, resolution, device=device)
                y = x + 0.1 * torch.randn_like(x)
                seconds = step_seconds(model, x, y, repeats, warmup=2)
                row = {"model": name, "preset": preset, "resolution": resolution, "batch": args.batch,
                       "parameters": models.parameter_count(model), "step_s": seconds,
                       "samples_per_s": args.batch / seconds, "device": str(device)}
                rows.append(row)
                ratio = row["samples_per_s"] / rows[0]["samples_per_s"]
                print(f"{name:6} {preset:6} {resolution:>5} {row['parameters']:>11,} {1000 * seconds:>9.1f} "
                      f"{row['samples_per_s']:>10.1f} {ratio:>7.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
