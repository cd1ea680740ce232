"""Exact minibatch influence: the solvers against a dense float64 computation, and their cost.

1. Agreement: a tiny UNet on a batch small enough to form J by reverse mode (3 classes ×
   ``--small-per-class`` transitions at ``--small-res``²). The exact H_CC of every solver
   (dense in both spaces, block Lanczos, Nyström-PCG) against H = G_Cᵀ (JᵀJ + λI)⁻¹ G_C from
   the dense J in numpy (target: relative error <= 1e-6). Printed with times.
2. Speed at equal accuracy (``--checkpoint`` and ``--data`` of a trained model: the NTK spectrum of
   a trained model is what decides; paper-mini-ce's minibatch 0, 3 × ``--per-class``): the dense
   H (eigendecomposition, float64) is the reference; block Lanczos (float64 and float32 products)
   and Nyström-PCG at rtol 1e-6 are timed at the run's λ and for an 8-λ sweep (PCG: one solve per
   λ; Lanczos and dense: one for all), each with its products K·v and its row-std error against
   the dense H (relative Frobenius of the row-std H). Ratios PCG ÷ Lanczos are measured in this run.
   The paper's own solve (float32, stacked, restarted MINRES to 1.5e-2) is reported beside them.
   ``--block-pcg RANK``: a trial of block PCG in output space (one Nyström sketch of rank RANK,
   one block for the batch's right-hand sides) at the run's λ, stopped by the proven
   |ΔH_ij| ≤ ‖r_i‖‖r_j‖ in row-std units (it measured slower than block Lanczos: not in src/).
3. ``--big-per-class 16``: the paper's batch shape (48 samples) with block Lanczos alone (the dense
   path does not fit) within ``--big-products`` K·v: which λ of 1e-3 … 10 it bounds to htol, with
   d_eff(λ), products and time (``--checkpoint`` of a p > N·d model, e.g. the tiny UNet at width 8).

    python benchmarks/bench_exact.py [--quick] [--checkpoint DIR --data URL] [--big-per-class 16]
        [--threads 1 --clock cpu]        # CPU seconds of this process: steadier on a shared machine
        [--reference FILE.npz]           # keep the dense reference (computed once, reused after)
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
from gradlake.errors import GradlakeError  # noqa: E402
from gradlake.config import DataConfig  # noqa: E402
from gradlake.data import generate  # noqa: E402
from gradlake.reduce import minibatch  # noqa: E402
from gradlake.reduce.exact import (BatchJacobian, SolverSettings, error_in_units, exact_influence,  # noqa: E402
                                   normalize_matrix, relative_frobenius, solve_hat)
from gradlake.reduce.jacobian import blocked  # noqa: E402
from gradlake.reduce.krylov import NystromPreconditioner, nystrom  # noqa: E402


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
    return models.build("unet", preset, channels=4, resolution=res, **({"width": args.width} if args.width else {}))


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
    model = model_for(argparse.Namespace(checkpoint=None, width=0), args.small_res, "tiny")
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
    for method, space in (("dense", "output"), ("dense", "parameter"), ("lanczos", "output"), ("pcg", "output"),
                          ("pcg", "parameter")):
        t = time.perf_counter()
        h, info = exact_influence(jac, res, ("CC",), args.damping,
                                  SolverSettings(method=method, space=space, rtol=1e-6, htol=1e-9, rank=args.rank,
                                                 max_rank=args.max_rank, max_iter=args.max_iter, block=args.block))
        i = info
        err = relative_frobenius(h["CC"], want)
        errors.append(err)
        print(f"  {method:5s} {space:9s}: rel. error {err:.2e}, {time.perf_counter() - t:6.1f} s, "
              f"iterations {i.iterations}, rank {i.rank}, products {i.products}")
    return errors


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
SWEEP = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 1e-1, 1.0, 10.0)  # PCG needs > 10⁴ products per λ below 1e-4


def row_std_error(h, want) -> float:
    return relative_frobenius(normalize_matrix(h, "row-std"), normalize_matrix(want, "row-std"))


def dense_reference(args, jac, res, lam, sweep) -> tuple[dict[float, np.ndarray], float, float, float]:
    """({λ: dense H_CC}, seconds, d_eff(λ), top eigenvalue); kept in ``--reference`` when given (the
    eigendecomposition is the slowest part of the run, and the same for every solver run against it)."""
    lams = (lam, *sweep)
    if args.reference and os.path.exists(args.reference):
        saved = np.load(args.reference)
        if np.array_equal(saved["lambdas"], lams) and saved["n"] == jac.output.numel():
            return {v: saved["h"][i] for i, v in enumerate(lams)}, float(saved["seconds"]), float(saved["d_eff"]), \
                float(saved["top"])
    t = CLOCK[args.clock]()
    dense = solve_hat(jac, res, ("CC",), lam, SolverSettings(method="dense"), lambdas=sweep)
    seconds = CLOCK[args.clock]() - t
    want = {v: dense.at(v, ("CC",))["CC"] for v in lams}
    d_eff, top = dense.d_eff(lam), dense.eigenvalues[0]
    if args.reference:
        np.savez(args.reference, lambdas=np.array(lams), n=jac.output.numel(), h=np.stack([want[v] for v in lams]),
                 seconds=seconds, d_eff=d_eff, top=top)
    return want, seconds, d_eff, top


def block_pcg(apply, b: torch.Tensor, lam: float, precondition, htol: float, max_iter: int):
    """(H [s, s], products, iterations): block PCG on (K + λI) X = B (rows), search blocks kept
    orthonormal (breakdown-free); H = BᵀB − λ(XᵀB + BᵀX − Xᵀ(B − R)), whose error λ r_iᵀ(K + λI)⁻¹ r_j
    is at most ‖r_i‖‖r_j‖, until that bound is ≤ htol in row-std units."""
    def hat(x, r):
        h = b @ b.T - lam * (x @ b.T + b @ x.T - x @ (b - r).T)
        return (0.5 * (h + h.T)).numpy()

    def basis(z):
        u, sv, _ = torch.linalg.svd(z.T, full_matrices=False)
        return u[:, sv > 1e-12 * sv[0]].T.contiguous()

    x, r, products = torch.zeros_like(b), b.clone(), 0
    p = basis(precondition(r))
    for it in range(1, max_iter + 1):
        q = apply(p) + lam * p
        products += p.shape[0]
        pq = 0.5 * (p @ q.T + q @ p.T)
        alpha = torch.linalg.solve(pq, p @ r.T)
        x, r = x + alpha.T @ p, r - alpha.T @ q
        e = torch.linalg.vector_norm(r, dim=1).numpy()
        if error_in_units({"CC": hat(x, r)}, {"CC": np.outer(e, e)}, "CC", "row-std") <= htol:
            break
        z = precondition(r)
        p = basis(z - torch.linalg.solve(pq, q @ z.T).T @ p)
    r = b - apply(x) - lam * x  # the true residual (the recurrence drifts)
    return hat(x, r), products + b.shape[0], it


def speed(args, root: str) -> None:
    """Dense reference, block Lanczos and Nyström-PCG at one λ and over an 8-λ sweep, on one minibatch."""
    clock = CLOCK[args.clock]
    url = args.data or dataset(root, args.res, args.per_class)
    ds, x, y = batch(url, args.per_class)
    model = model_for(args, args.res, "tiny")
    lam, sweep = args.damping, [v for v in SWEEP if v != args.damping]
    trained = "trained checkpoint" if args.checkpoint else "fresh initialisation (not a trained NTK)"
    jac = BatchJacobian(model, x)
    res = physics.residuals(jac.output, x, y, ("C",), ds.channels)
    print(f"speed case: {x.shape[0]} samples at {args.res}², {trained}, n = {jac.output.numel()} outputs, "
          f"p = {jac.n_params}, λ = {lam:g}, {torch.get_num_threads()} threads, {args.clock} clock")
    want, dense_s, d_eff, top = dense_reference(args, jac, res, lam, sweep)
    print(f"  dense (eigendecomposition, every λ): {dense_s:7.1f} s; d_eff(λ) = {d_eff:,.0f}, "
          f"top eigenvalue {top:.3g}")
    runs = {}
    for name, dtype in (("lanczos float64", torch.float64), ("lanczos float32", torch.float32)):
        jac_k = jac if dtype == torch.float64 else BatchJacobian(model, x, dtype)
        for label, extra in (("one λ", ()), ("8 λ", sweep)):
            t = clock()
            try:
                solve = solve_hat(jac_k, res, ("CC",), lam, SolverSettings(method="lanczos", htol=args.htol,
                                                                            block=args.block), lambdas=extra)
            except GradlakeError as refused:  # float32 products below their round-off floor
                print(f"  {name:16s} {label:6s}: refused: {refused}")
                continue
            seconds = clock() - t
            worst = max(row_std_error(solve.at(v, ("CC",))["CC"], want[v]) for v in (lam, *extra))
            runs[(name, label)] = (seconds, solve.info.products)
            print(f"  {name:16s} {label:6s}: {seconds:7.1f} s, products {solve.info.products:6d}, "
                  f"row-std error {worst:.1e} (bound {max(v['bound'] for v in solve.info.sweep.values()):.1e}), "
                  f"d_eff(λ) ≈ {solve.d_eff(lam):,.0f}")
    if args.block_pcg:
        t = clock()
        apply = blocked(lambda u: jac.gram(u.reshape(-1, *jac.output.shape)).reshape(u.shape[0], -1), args.block)
        sketch = nystrom(apply, jac.output.numel(), lam, args.block_pcg, args.block_pcg, seed=0)
        h, products, it = block_pcg(apply, jac.placed(res["C"]).double(), lam, NystromPreconditioner(sketch, lam),
                                    args.htol, args.max_iter)
        print(f"  block pcg rank {args.block_pcg:<5d} one λ : {clock() - t:7.1f} s, products "
              f"{products + sketch.products:6d} ({sketch.products} in the sketch, {it} iterations), "
              f"row-std error {row_std_error(h, want[lam]):.1e}")
    pcg_s = pcg_products = 0
    for v in (lam, *sweep):
        t = clock()
        h, info = exact_influence(jac, res, ("CC",), v, SolverSettings(method="pcg", rtol=1e-6, rank=args.rank,
                                                                       max_rank=args.max_rank, max_iter=args.max_iter,
                                                                       block=args.block))
        seconds = clock() - t
        if v == lam:
            runs[("pcg", "one λ")] = (seconds, info.products)
            print(f"  pcg rtol 1e-6    one λ : {seconds:7.1f} s, products {info.products:6d}, "
                  f"row-std error {row_std_error(h['CC'], want[v]):.1e}")
        pcg_s, pcg_products = pcg_s + seconds, pcg_products + info.products
    runs[("pcg", "8 λ")] = (pcg_s, pcg_products)
    print(f"  pcg rtol 1e-6    8 λ   : {pcg_s:7.1f} s, products {pcg_products:6d}")
    t = clock()
    h, info = exact_influence(jac, res, ("CC",), lam, SolverSettings(method="paper", max_iter=args.paper_iter))
    print(f"  paper (PDEHats)  one λ : {clock() - t:7.1f} s, products {info.products:6d}, stacked "
          f"residual {info.history[-1]:.2e} ({'reached' if info.converged else 'did not reach'} 1.5e-2), row-std "
          f"error {row_std_error(h['CC'], want[lam]):.2f}")
    for label in ("one λ", "8 λ"):
        for name in ("lanczos float64", "lanczos float32"):
            if (name, label) not in runs:
                continue
            (ps, pp), (ls, lp) = runs[("pcg", label)], runs[(name, label)]
            print(f"ratio pcg ÷ {name}, {label}: time {ps / ls:.2f}, products {pp / lp:.2f}")


BIG_SWEEP = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


def big_batch(args, root: str) -> None:
    """The paper's batch shape with block Lanczos within a budget of ``--big-products`` K·v: which λ
    of BIG_SWEEP it bounds to htol, with d_eff(λ), the products and the time."""
    url = args.data or dataset(root, args.res, args.big_per_class)
    ds, x, y = batch(url, args.big_per_class)
    model = model_for(args, args.res, "tiny")
    dtype = torch.float32 if args.big_float32 else torch.float64
    jac = BatchJacobian(model, x, dtype)
    res = physics.residuals(jac.output, x, y, ("C",), ds.channels)
    n = jac.output.numel()
    clock = CLOCK[args.clock]
    top, rest = max(BIG_SWEEP), tuple(v for v in BIG_SWEEP if v != max(BIG_SWEEP))
    blocks = 3 * args.big_per_class + 8  # the start block: residual columns and d_eff probes
    settings = SolverSettings(method="lanczos", htol=args.htol, block=args.block, krylov_gb=args.krylov_gb,
                              max_iter=max(1, args.big_products // blocks), probes=8)
    t = clock()
    solve = solve_hat(jac, res, ("CC",), top, settings, lambdas=rest)
    seconds = clock() - t
    print(f"paper batch: {x.shape[0]} samples at {args.res}², n = {n}, p = {jac.n_params} (p > N·d: "
          f"{jac.n_params > n}), {dtype} products, {torch.get_num_threads()} threads: {seconds:.0f} s, "
          f"products {solve.info.products}, Krylov dimension {solve.info.rank}, "
          f"{seconds / max(solve.info.products, 1):.2f} s per product")
    for lam, v in sorted(solve.info.sweep.items()):
        print(f"  λ = {lam:g}: d_eff ≈ {solve.d_eff(lam):,.0f}, bound {v['bound']:.1e} "
              f"({'within' if v['converged'] else 'NOT within'} htol {args.htol:g})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the agreement case only")
    parser.add_argument("--no-agreement", action="store_true", help="skip the agreement case")
    parser.add_argument("--htol", type=float, default=1e-3)
    parser.add_argument("--big-per-class", type=int, default=0, help="also the 3 × N batch with block Lanczos")
    parser.add_argument("--big-float32", action="store_true")
    parser.add_argument("--big-products", type=int, default=1500, help="the 48-sample run's budget of K·v")
    parser.add_argument("--krylov-gb", type=float, default=6.0)
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--small-res", type=int, default=16)
    parser.add_argument("--small-per-class", type=int, default=2)
    parser.add_argument("--res", type=int, default=16)
    parser.add_argument("--per-class", type=int, default=4)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--max-rank", type=int, default=2048)
    parser.add_argument("--max-iter", type=int, default=3000)
    parser.add_argument("--paper-iter", type=int, default=300, help="the paper's solve: iterations at most")
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--block-pcg", type=int, default=0, help="also block PCG with a Nyström sketch of this rank")
    parser.add_argument("--checkpoint", default="")
    parser.add_argument("--width", type=int, default=0, help="without --checkpoint: the fresh tiny UNet's width "
                                                                 "(8: p = 81.6k > N·d = 49,152 for 48 samples at 16²)")
    parser.add_argument("--data", default="")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--clock", default="wall", choices=sorted(CLOCK), help="cpu: this process' CPU seconds")
    parser.add_argument("--reference", default="", help="an .npz keeping the speed case's dense reference")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as root:
        errors = [] if args.no_agreement else agreement(args, root)
        if not args.quick:
            speed(args, root)
        if args.big_per_class:
            big_batch(args, root)
    if errors:
        print(f"exact: worst relative error vs dense float64 {max(errors):.1e} (target <= 1e-6)")


if __name__ == "__main__":
    main()
