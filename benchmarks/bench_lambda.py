"""Beyond the paper: the exact H's temporal locality against λ and against model size.

For trained checkpoints (``--checkpoint`` may be repeated; each a UNet of some width) on the
paper's batch shape (3 classes × ``--per-class`` transitions of the first test trajectory),
one eigendecomposition of the Gram gives the exact H_CC at every λ of a sweep over decades
(gradlake.reduce.exact.solve_hat, method dense). Printed per (model, λ): row-std H at Δt = 0,
|Δt| = 1, |Δt| ≥ 3 and across classes, the diagonal's dominance (Δt = 0 over |Δt| = 1), the
effective dimension Σ μ/(μ+λ) of the NTK, and p / (N·d): with p > N·d and λ → 0, Π → I
and H collapses onto same-sample blocks (an artefact, not learned locality); with p < N·d the
locality that survives λ → 0 is the model's. A figure (``--figure``, PNG) draws the
dominance and the tail against λ for every model.

    python benchmarks/bench_lambda.py --data URL --checkpoint DIR [--checkpoint DIR ...]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("GRADLAKE_QUIET", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gradlake import physics  # noqa: E402
from gradlake.data import Dataset  # noqa: E402
from gradlake.models.checkpoint import load_checkpoint  # noqa: E402
from gradlake.reduce import minibatch  # noqa: E402
from gradlake.reduce.exact import BatchJacobian, SolverSettings, normalize_matrix, solve_hat  # noqa: E402


def study(checkpoint: str, ds: Dataset, per_class: int, lambdas: list[float]) -> list[dict]:
    batch = minibatch.plan(ds.trajectories, ds.n_times, "test", 3, per_class, 1)[0]
    x, y = (torch.from_numpy(a).double() for a in ds.samples(batch.column("row").to_numpy()))
    model, meta = load_checkpoint(checkpoint)
    jac = BatchJacobian(model, x)
    res = physics.residuals(jac.output, x, y, ("C",), ds.channels)
    solve = solve_hat(jac, res, ("CC",), lambdas[0], SolverSettings(method="dense"), lambdas=lambdas[1:])
    mu = solve.eigenvalues
    rows = []
    for lam in lambdas:
        h = solve.at(lam, ("CC",))
        head = minibatch.merge_headlines([minibatch.headline(normalize_matrix(h["CC"], "row-std"), batch)])["all"]
        rows.append({"checkpoint": f"p={jac.n_params}", "p": jac.n_params,
                     "Nd": jac.output.numel(), "lambda": lam, **head,
                     "dominance": head["dt0"] / head["dt1"] if head["dt1"] else float("nan"),
                     "d_eff": float(np.sum(mu / (mu + lam))), "top": float(mu[0]),
                     "val_smse": (meta.get("metrics") or {}).get("val_smse")})
    return rows


def figure(rows: list[dict], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    for name in dict.fromkeys(r["checkpoint"] for r in rows):
        part = [r for r in rows if r["checkpoint"] == name]
        label = f"{name}: p/(N·d) = {part[0]['p'] / part[0]['Nd']:.2g}"
        lam = [r["lambda"] for r in part]
        axes[0].plot(lam, [r["dominance"] for r in part], marker="o", label=label)
        axes[1].plot(lam, [r["tail"] for r in part], marker="o", label=label)
    for ax, title in zip(axes, ("diagonal dominance: row-std H at Δt=0 ÷ |Δt|=1", "row-std H at |Δt| ≥ 3 (tail)")):
        ax.set_xscale("log")
        ax.set_xlabel("λ")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--checkpoint", action="append", required=True)
    parser.add_argument("--per-class", type=int, default=4)
    parser.add_argument("--lambdas", default="1e-8,1e-6,1e-4,1e-3,1e-2,1e-1,1,10")
    parser.add_argument("--figure", default="")
    args = parser.parse_args()
    ds = Dataset.open(args.data)
    lambdas = [float(v) for v in args.lambdas.split(",")]
    rows = [r for ckpt in args.checkpoint for r in study(ckpt, ds, args.per_class, lambdas)]
    print(f"{'model':>12} {'p/(N·d)':>8} {'λ':>8} {'Δt=0':>6} {'|Δt|=1':>7} {'tail':>6} {'other':>6} "
          f"{'dom.':>6} {'d_eff':>8}")
    for r in rows:
        print(f"{r['checkpoint']:>12} {r['p'] / r['Nd']:8.3g} {r['lambda']:8.0e} {r['dt0']:6.2f} {r['dt1']:7.2f} "
              f"{r['tail']:6.2f} {r['other_class']:6.2f} {r['dominance']:6.2f} {r['d_eff']:8.1f}")
    if args.figure:
        figure(rows, args.figure)
        print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
