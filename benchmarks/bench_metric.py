"""How well η̃ from reference samples × probes stands in for the k-space metric P η Pᵀ, and what helps.

    python benchmarks/bench_metric.py                  # tiny UNet, 8², 12 reference samples (d = 256 outputs each)
    python benchmarks/bench_metric.py --quick

The exact k-space metric of the reference set, η̃* = Σ_i (P J_iᵀ)(P J_iᵀ)ᵀ, is formed from
P J_iᵀ e_o for every output o (one backward pass per output, d = C·H·W of them): the
probe estimate with the whole basis. Against H* = φ_Cᵀ (η̃* + λI)⁻¹ φ_C on the reference
samples themselves (the paper's minibatch shape), each estimator of the metric is scored by
the relative Frobenius error of H (raw, and row-std normalised as the paper plots it):
  probes m    η̃ = Σ_i (1/m) Σ_v φ_V φ_Vᵀ with m ±1 probes per sample (gradlake's reduce)
  span        (η̃ + λI)⁻¹ on the span of η̃ only, 0 on the directions no probe reached
  shrink      Ledoit–Wolf shrinkage of the per-vector second moment towards (trace / k) I
Medians over --repeats probe draws; λ relative to η̃*'s largest eigenvalue.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from gradlake import models, physics
from gradlake.grads import Projector
from gradlake.grads.capture import projected_grads
from gradlake.reduce.metric import Metric, Moments


def basis_phis(model, x, y, projector):
    """(φ_C [n, k], P J_iᵀ e_o for every output o [n, d, k]) by one backward pass per output."""
    channels = [f"c{i}" for i in range(x.shape[1])]

    def cotangents(pred):
        d = pred[0].numel()
        basis = torch.eye(d).reshape(1, d, *pred.shape[1:]).expand(pred.shape[0], -1, *pred.shape[1:])
        return {"C": physics.residuals(pred, x, y, ("C",), channels)["C"], "basis": basis}

    with torch.no_grad():
        model.eval()
    phi, _ = projected_grads(model, x, cotangents, projector)
    return phi["C"].double().numpy(), phi["basis"].double().numpy()


def influence(phi, inverse):
    return phi @ inverse @ phi.T


def row_std(h):
    return h / h.std(axis=1, keepdims=True)


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def estimators(vectors: np.ndarray, samples: int, probes: int, lam: float) -> dict[str, np.ndarray]:
    """(η̃ + λI)⁻¹ of each estimator from probe vectors [samples * probes, k]."""
    moments = Moments(vectors.shape[1]).add(vectors.reshape(samples, probes, -1))
    plain = Metric.from_moments(moments)
    kept = plain.eigenvalues > 1e-12 * plain.eigenvalues[0]
    span = plain.eigenvectors[:, kept]
    return {"probes": plain.inverse(lam), "span": (span / (plain.eigenvalues[kept] + lam)) @ span.T,
            "shrink": Metric.from_moments(moments, estimator="shrink").inverse(lam)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="unet", choices=list(models.MODELS))
    parser.add_argument("--resolution", type=int, default=8)
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--k", type=int, default=4, help="k_in = k_out")
    parser.add_argument("--probes", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--lambdas", type=float, nargs="+", default=[1e-2, 1e-4, 1e-6])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.quick:
        args.resolution, args.samples, args.probes, args.lambdas, args.repeats = 8, 2, [1, 16], [1e-4], 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = models.build(args.model, "tiny", channels=4, resolution=args.resolution)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.samples, 4, args.resolution, args.resolution, generator=gen)
    y = torch.roll(x, 1, dims=-1) + 0.1 * torch.randn(x.shape, generator=gen)
    projector = Projector(seed=0, k_in=args.k, k_out=args.k)
    phi_c, basis = basis_phis(model, x, y, projector)
    n, d, k = basis.shape
    exact_eta = np.einsum("nok,nol->kl", basis, basis)
    top = np.linalg.eigvalsh(exact_eta)[-1]
    print(f"# {args.model} tiny, {args.resolution}²: {n} reference samples × d = {d} outputs, k = {k}; "
          f"rank of η̃* {np.linalg.matrix_rank(exact_eta)}; medians of {args.repeats} probe draws")
    print("# relative Frobenius error of H_CC on the reference samples vs H with η̃* (raw | row-std)")
    print(f"{'λ / top':>8s} {'probes':>6s} {'n·m':>6s} " + " ".join(f"{e:>15s}" for e in ("probes", "span", "shrink")))
    rng = np.random.default_rng(0)
    for lam_rel in args.lambdas:
        lam = lam_rel * top
        reference = influence(phi_c, np.linalg.inv(exact_eta + lam * np.eye(k)))
        for m in args.probes:
            errors: dict[str, list[tuple[float, float]]] = {}
            for _ in range(args.repeats):
                signs = rng.choice([-1.0, 1.0], size=(n, m, d))
                vectors = np.einsum("nmo,nok->nmk", signs, basis).reshape(n * m, k)
                for name, inverse in estimators(vectors, n, m, lam).items():
                    h = influence(phi_c, inverse)
                    errors.setdefault(name, []).append((rel(h, reference), rel(row_std(h), row_std(reference))))
            cells = " ".join(f"{statistics.median(e[0] for e in v):7.3f} |{statistics.median(e[1] for e in v):6.3f}"
                             for v in errors.values())
            print(f"{lam_rel:8.0e} {m:6d} {n * m:6d} {cells}")


if __name__ == "__main__":
    main()
