"""Exact minibatch influence: the solvers' agreement with a dense float64 computation, and their cost.

1. Agreement: a tiny UNet on a batch small enough to form J by reverse mode (3 classes ×
   ``--small-per-class`` transitions at ``--small-res``²). The exact H_CC of every solver
   (dense and Nyström-PCG, output and parameter space) against H = G_Cᵀ (JᵀJ + λI)⁻¹ G_C from
   the dense J in numpy (target: relative error <= 1e-6 at rtol 1e-6). Printed with times.
2. The paper's batch: 3 classes × 16 transitions (48 samples) of a UNet at ``--res``²
   (``--preset small`` by default): time, PCG iterations, Nyström rank, operator products,
   worst residual, with ``--method auto`` (the stage's choice) and the others asked for.
   The products are machine-independent; times depend on the machine and its load.

Data: built-in Euler trajectories at the asked resolution; weights: ``--checkpoint`` (a
trained checkpoint of the same resolution) or a freshly initialised model (then the NTK
spectrum is not a trained one: say so when quoting the numbers).

    python benchmarks/bench_exact.py [--quick] [--checkpoint DIR --data URL]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("GRADLAKE_QUIET", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gradlake import models, physics  # noqa: E402
from gradlake.config import DataConfig  # noqa: E402
from gradlake.data import generate  # noqa: E402
from gradlake.reduce import minibatch  # noqa: E402
from gradlake.reduce.exact import BatchJacobian, SolverSettings, exact_influence, relative_frobenius  # noqa: E402


def batch(data_url: str, per_class: int):
    from gradlake.data import Dataset

    ds = Dataset.open(data_url)
    b = minibatch.plan(ds.trajectories, ds.n_times, "test", 3, per_class, 1)[0]
    x, y = (torch.from_numpy(a).double() for a in ds.samples(b.column("row").to_numpy()))
    return ds, x, y


def dataset(root: str, res: int, steps: int) -> str:
    url = os.path.join(root, f"euler-{res}")
    generate(DataConfig(family="euler", classes=("rp", "crp", "rpui"), trajectories=4, steps=steps + 1,
                        resolution=res, seed=0, splits=(0.5, 0.0, 0.5)), url)
    return url


def model_for(args, res: int, preset: str):
    if args.checkpoint:
        from gradlake.models.checkpoint import load_checkpoint

        return load_checkpoint(args.checkpoint)[0]
    torch.manual_seed(0)
    return models.build("unet", preset, channels=4, resolution=res)


def reference_jacobian(model, x: torch.Tensor) -> np.ndarray:
    """Dense J [outputs, p] row by row with plain autograd (no torch.func): the independent route.
    Keep n = outputs small: the reference eigendecomposes K = J Jᵀ [n, n]."""
    model = model.double().eval()
    params = [q for q in model.parameters()]
    rows = []
    for i in range(x.shape[0]):
        out = model(x[i:i + 1]).reshape(-1)
        for k in range(out.numel()):
            grads = torch.autograd.grad(out[k], params, retain_graph=k + 1 < out.numel())
            rows.append(torch.cat([g.reshape(-1) for g in grads]).numpy())
    return np.stack(rows)


def agreement(args, root: str) -> list[float]:
    url = args.data or dataset(root, args.small_res, args.small_per_class)
    ds, x, y = batch(url, args.small_per_class)
    model = model_for(argparse.Namespace(checkpoint=None), args.small_res, "tiny")
    jac = BatchJacobian(model, x)
    res = physics.residuals(jac.output, x, y, ("C",), ds.channels)
    n, p = jac.output.numel(), jac.n_params
    t = time.perf_counter()
    J = reference_jacobian(model, x)
    B = x.shape[0]
    d = n // B
    # H = Rᵀ Q diag(μ/(μ+λ)) Qᵀ R from the eigendecomposition of K = J Jᵀ (the solvers use Cholesky or PCG)
    mu, q = np.linalg.eigh(J @ J.T)
    mu = np.clip(mu, 0.0, None)
    r = np.zeros((n, B))
    for i in range(B):
        r[i * d:(i + 1) * d, i] = res["C"][i].reshape(-1).numpy()
    qr = q.T @ r
    want = qr.T @ (qr * (mu / (mu + args.damping))[:, None])
    dense_s = time.perf_counter() - t
    print(f"agreement case: {B} samples at {args.small_res}², n = {n} outputs, p = {p} parameters, "
          f"λ = {args.damping:g}; numpy reference {dense_s:.1f} s")
    errors = []
    for method, space in (("dense", "output"), ("dense", "parameter"), ("pcg", "output"), ("pcg", "parameter")):
        t = time.perf_counter()
        h, info = exact_influence(jac, res, ("CC",), args.damping,
                                  SolverSettings(method=method, space=space, rtol=1e-6, rank=args.rank,
                                                 max_rank=args.max_rank, max_iter=args.max_iter, block=args.block))
        i = info["C"]
        err = relative_frobenius(h["CC"], want)
        errors.append(err)
        print(f"  {method:5s} {space:9s}: rel. error {err:.2e}, {time.perf_counter() - t:6.1f} s, "
              f"iterations {i.iterations}, rank {i.rank}, products {i.products}")
    return errors


def paper_batch(args, root: str) -> None:
    url = args.data or dataset(root, args.res, args.per_class)
    ds, x, y = batch(url, args.per_class)
    model = model_for(args, args.res, args.preset)
    jac = BatchJacobian(model, x)
    res = physics.residuals(jac.output, x, y, ("C",), ds.channels)
    trained = "trained checkpoint" if args.checkpoint else "fresh initialisation (not a trained NTK)"
    print(f"paper batch: {x.shape[0]} samples at {args.res}², UNet {args.preset} ({trained}), "
          f"n = {jac.output.numel()}, p = {jac.n_params}, λ = {args.damping:g}, rtol 1e-6, {torch.get_num_threads()} threads")
    for method in args.methods.split(","):
        t = time.perf_counter()
        try:
            _, info = exact_influence(jac, res, ("CC",), args.damping,
                                      SolverSettings(method=method, rtol=1e-6, rank=args.rank, max_rank=args.max_rank,
                                                     max_iter=args.max_iter, block=args.block))
        except Exception as err:  # a budget ran out: report it, go on
            print(f"  {method:5s}: {type(err).__name__}: {err}  ({time.perf_counter() - t:.0f} s)")
            continue
        i = info["C"]
        print(f"  {method:5s} ({i.space}): {time.perf_counter() - t:7.1f} s, iterations {i.iterations}, rank {i.rank}, "
              f"products {i.products}, worst residual {i.relative_residual.max():.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the agreement case only")
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--small-res", type=int, default=16)
    parser.add_argument("--small-per-class", type=int, default=2)
    parser.add_argument("--res", type=int, default=32)
    parser.add_argument("--per-class", type=int, default=16)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--methods", default="auto")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--max-rank", type=int, default=2048)
    parser.add_argument("--max-iter", type=int, default=500)
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--checkpoint", default="")
    parser.add_argument("--data", default="")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        errors = agreement(args, root)
        if not args.quick:
            paper_batch(args, root)
    print(f"exact: worst relative error vs dense float64 {max(errors):.1e} (target <= 1e-6)")


if __name__ == "__main__":
    main()
