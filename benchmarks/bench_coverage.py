"""Capture ÷ training step per architecture, and which modules take the slower per-sample rules.

    python benchmarks/bench_coverage.py                      # every architecture, batch 8
    python benchmarks/bench_coverage.py --models fno-2d unet --batch 16 --repeats 7
    python benchmarks/bench_coverage.py --threads 1 --clock cpu   # CPU seconds: steadier on a busy machine

For each model, timed in one process with interleaved repeats (medians), same batch and threads:
  train    forward + backward of ⟨model(x), r⟩ with parameter gradients (a training step)
  capture  gradlake.grads.capture.projected_grads, one cotangent, Projector(k_in = k_out = k)
ratio = capture / train. The last column lists the modules whose parameters take the
per-sample rules "vmap" (torch.func over the module; where the parameters are all the module's
own, it runs so in the batch's forward with per-sample copies of them, no rerun) or "loop"
(per-sample autograd: modules vmap cannot run, e.g. data-dependent branches), from
gradlake.grads.describe; "kron", "affine", "additive" and "spectral" modules cost about what
their share of a training step does. At batch 8 the small models here spend a fixed ~0.1-0.3 ms
per hooked module and capture on Python hooks, a visible share of a 5-30 ms training step;
--batch 32 shows the ratio with that share small.

The third-party-style models are those of tests/grads/thirdparty_models.py; FNO/TFNO need
neuraloperator (skipped without it). The Well's 8 models (tests/grads/well_models.py, 32², 4
channels) are added as "well-<name>" where the_well and its neuraloperator 0.3 load, as in the
environment ``make test-well`` builds:

    PYTHONPATH=src .venv-well/bin/python benchmarks/bench_coverage.py --models well-FNO well-TFNO well-AFNO
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "grads"))

import thirdparty_models as tp  # noqa: E402
import well_models  # noqa: E402

from gradlake import models  # noqa: E402
from gradlake.grads import Projector, describe  # noqa: E402
from gradlake.grads.capture import projected_grads  # noqa: E402


def _fno(dims, factorization=None, width=16):
    from neuralop.models import FNO, TFNO

    kwargs = {"factorization": factorization, "rank": 0.5} if factorization else {}
    cls = TFNO if factorization else FNO
    return cls(n_modes=(8,) * dims if dims < 3 else (4, 4, 4), hidden_channels=width, in_channels=4,
               out_channels=4, n_layers=4, **kwargs)


def architectures(resolution: int) -> dict:
    """name: (model factory, input shape without the batch)."""
    r = resolution
    return {
        "unet": (lambda: models.build("unet", "small", channels=4, resolution=r), (4, r, r)),
        "vit": (lambda: models.build("vit", "small", channels=4, resolution=r), (4, r, r)),
        "fno-2d": (lambda: _fno(2), (4, r, r)),
        "tfno-2d": (lambda: _fno(2, "tucker"), (4, r, r)),
        "fno-1d": (lambda: _fno(1), (4, 4 * r)),
        "fno-3d": (lambda: _fno(3, width=8), (4, r // 4, r // 4, r // 4)),
        "timm-style-vit": (lambda: tp.TimmViT(4, r, 4, 64, 4, 4), (4, r, r)),
        "swin-style": (lambda: tp.SwinLike(4, 32, 4), (4, r, r)),
        "torchvision-style-vit": (lambda: tp.TorchvisionViT(4, r, 4, 64, 4, 4), (4, r, r)),
        "convnext-style": (lambda: tp.ConvNeXtNet(4, 32), (4, r, r)),
        "afno": (lambda: tp.ChannelsLast(tp.AFNOModel(4, 32)), (4, r, r)),
        "spectral-norm-mlp": (lambda: tp.SpectralNormMLP(4, 64, 4), (4, r * r)),
        "conv-1d": (lambda: tp.Conv1dNet(4, 32), (4, 4 * r)),
        "conv-3d": (lambda: tp.Conv3dNet(4, 16), (4, r // 4, r // 4, r // 4)),
    }


def well_architectures() -> dict:
    """The Well's models, where they load (32², 4 channels whatever the resolution asked)."""
    if well_models.available() is not None:
        return {}
    shape = (well_models.CHANNELS, *well_models.RESOLUTION)
    return {f"well-{name}": (partial(well_models.build, name), shape) for name in well_models.NAMES}


def bench(name, factory, shape, args) -> dict:
    torch.manual_seed(0)
    model = factory().eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, *shape, generator=gen)
    with torch.no_grad():
        r = torch.randn(model(x).shape, generator=gen)
    projector = Projector(seed=0, k_in=args.k, k_out=args.k)
    params = list(model.parameters())

    def train():
        model.zero_grad(set_to_none=True)
        (model(x) * r).sum().backward()

    def capture():
        projected_grads(model, x, lambda pred: {"C": r}, projector)

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    runs = {"train": train, "capture": capture}
    for fn in runs.values():  # warm-up (and the capture's one dry run)
        fn()
    times = {n: [] for n in runs}
    for _ in range(args.repeats):
        for n, fn in runs.items():
            start = clock()
            fn()
            times[n].append(clock() - start)
    model.zero_grad(set_to_none=True)
    rows = describe(model, x, projector)
    slow = [f"{row['module'] or '<model>'}({row['type']}):{row['path']}" for row in rows
            if {"vmap", "loop"} & set(row["path"].split("+"))]
    train_s, capture_s = statistics.median(times["train"]), statistics.median(times["capture"])
    return {"name": name, "params": sum(p.numel() for p in params), "train_s": train_s,
            "capture_s": capture_s, "ratio": capture_s / train_s, "slow": slow}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, help="architectures (default: all)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--k", type=int, default=16, help="k_in = k_out")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # third-party deprecation notes
    torch.set_num_threads(args.threads)
    table = {**architectures(args.resolution), **well_architectures()}
    names = args.models or list(table)
    print(f"batch {args.batch}, resolution {args.resolution}, k_in = k_out = {args.k}, {args.threads} threads, "
          f"{args.clock} clock, median of {args.repeats} interleaved repeats; ratio = capture time ÷ train time")
    print(f"{'model':<24}{'params':>9}{'train s':>10}{'capture s':>11}{'ratio':>8}  modules on vmap/loop")
    for name in names:
        factory, shape = table[name]
        try:
            row = bench(name, factory, shape, args)
        except ImportError as exc:
            print(f"{name:<24}  skipped: {exc}")
            continue
        print(f"{name:<24}{row['params']:>9}{row['train_s']:>10.4f}{row['capture_s']:>11.4f}{row['ratio']:>8.2f}  "
              + (", ".join(row["slow"]) or "-"))


if __name__ == "__main__":
    main()
