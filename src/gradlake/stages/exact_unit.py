"""One unit of the exact minibatch mode: solve a minibatch's H, write its chunk, then its record.

Each minibatch is solved by gradlake.reduce.exact — dense or Nyström-preconditioned CG, in
output or parameter space, float64 by default.

Agreement: on the first ``agreement`` minibatches H is recomputed from projected gradients
(gradlake.grads.compute with Projector(k_in = k_out = k), and with the energy allocation of
the same total k calibrated on 8 train samples) for every k in ``ks``, with the
metric η̃ = (1/m) Σ_{i∈B} Σ_v φ_V φ_Vᵀ from ``probes`` random-cotangent probes of the same
batch — the estimator the aggregate reduce uses — and reported per (minibatch, k, pair,
normalisation) as the relative Frobenius error and the Spearman rank correlation.
Normalisations are those of the batch: row-std over the batch's columns (the paper's),
cosine with the batch's own diagonals H_AA(i, i), H_BB(j, j) (the self-pairs are solved for
too when cosine is asked for).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from gradlake import physics
from gradlake.config import ExactConfig
from gradlake.reduce.agreement import relative_frobenius, spearman
from gradlake.reduce.exact import PAPER, SolverSettings, solve_hat
from gradlake.reduce.jacobian import BatchJacobian
from gradlake.reduce.metric import Metric, Moments, full_rank_probes
from gradlake.reduce.output import ReduceOutput
from gradlake.stages.exact_plan import (ALLOCATIONS, H_ARRAY, PROJECTED_ARRAY, SWEEP_ARRAY, ExactSpec, Minibatch,
                                        normalized, solve_pairs)
from gradlake.stages.exact_ridge import DEFF_GRID, effective_ridge


def solver_settings(settings: ExactConfig) -> SolverSettings:
    return SolverSettings(method=settings.method, space=settings.space, htol=settings.htol, rtol=settings.rtol,
                          max_iter=settings.max_iter, block=settings.block, dense_gb=settings.dense_gb,
                          dense_side=settings.dense_side,
                          krylov_gb=settings.krylov_gb, rank=settings.rank, max_rank=settings.max_rank,
                          probes=settings.deff_probes, seed=settings.seed)


def _solve_record(solve, damping: float, lambdas) -> dict[str, Any]:
    i = solve.info
    record = {"method": i.method, "space": i.space, "iterations": i.iterations, "krylov_dimension": i.rank,
              "products": i.products, "seconds": i.seconds, "converged": bool(i.converged),
              "max_relative_residual": float(i.relative_residual.max()) if i.relative_residual.size else 0.0,
              "h_error_bound": None if np.isnan(i.bound) else float(i.bound),
              "sweep": [{"lambda": lam, **v} for lam, v in sorted(i.sweep.items())]}
    values = solve.eigenvalues
    if values.size:
        record["top_eigenvalue"] = float(values[0])
        record["d_eff"] = [{"lambda": lam, "d_eff": solve.d_eff(lam)}
                           for lam in sorted({damping, *lambdas, *DEFF_GRID})]
    return record


def run_unit(spec: ExactSpec, unit: Minibatch) -> dict[str, Any]:
    """Solve minibatch ``m``, write its chunk of H (and of the projected estimates), then its record."""
    from gradlake.data import Dataset
    from gradlake.models.checkpoint import load_checkpoint
    from gradlake.train import resolve_device

    started = time.monotonic()
    checkpoint, data_url, out_url, m, batch = spec.checkpoint, spec.data_url, spec.out_url, unit.index, unit.rows
    settings, damping, lambdas, pairs, normalize = spec.settings, spec.damping, spec.lambdas, spec.pairs, spec.normalize
    storage_options, record = spec.storage_options, spec.record
    ds = Dataset.open(data_url, storage_options=storage_options)
    device = resolve_device(settings.device)
    dtype = torch.float64 if settings.compute_dtype == "float64" else torch.float32
    rows = batch.column("row").to_numpy()
    model, _ = load_checkpoint(checkpoint, storage_options, device=device)
    inputs, targets = ds.samples(rows)
    x, y = (torch.from_numpy(a).to(device, dtype) for a in (inputs, targets))
    solved = solve_pairs(pairs, normalize)
    observables = sorted({o for pair in solved for o in pair})
    jac = BatchJacobian(model, x, dtype)
    residuals = physics.residuals(jac.output, x, y, observables, ds.channels)
    solve = solve_hat(jac, residuals, solved, damping, solver_settings(settings), lambdas, normalize)
    h = solve.at(damping, solved)
    out = ReduceOutput(out_url, storage_options)
    out.open_array(H_ARRAY)[m] = np.stack([h[p] for p in solved])
    if lambdas:
        out.open_array(SWEEP_ARRAY)[m] = np.stack([np.stack([v[p] for p in solved])
                                                   for v in (solve.at(lam, solved) for lam in lambdas)])
    result = {**record, "minibatch": m, "n_outputs": jac.output.numel(), "n_params": jac.n_params,
              "solve": _solve_record(solve, damping, lambdas), "agreement": []}
    if m < settings.paper_check and solve.quad is not None:
        result["paper_check"] = _paper_check(jac, residuals, solved, pairs, normalize, damping, settings, h)
    if m < settings.agreement:
        from gradlake.grads.allocation import calibration_rows

        picked = calibration_rows(ds.index().select(splits=["train"]), 8)
        calibration = (*ds.samples(picked), picked.tolist())
        result["agreement"], projected = _agreement(model, inputs, targets, rows, ds.channels, solve, settings,
                                                    damping, pairs, normalize, solved, calibration)
        out.open_array(PROJECTED_ARRAY)[m] = projected
    result["seconds"] = round(time.monotonic() - started, 2)
    spec.records().write(f"{m:06d}", result)
    return result


def _paper_check(jac, residuals, solved, pairs, normalize, damping, settings, converged) -> list[dict[str, Any]]:
    """The paper's own solve (method "paper") on the same minibatch, against the converged H."""
    paper = solve_hat(jac, residuals, solved, damping, replace(solver_settings(settings), method="paper"))
    h = paper.at(damping, solved)
    i = paper.info
    return [{"pair": pair, "normalization": norm, "relative_frobenius": relative_frobenius(
        normalized(h, pair, norm), normalized(converged, pair, norm)), "spearman": spearman(
        normalized(h, pair, norm), normalized(converged, pair, norm)), "products": i.products,
        "iterations": i.iterations, "reached_stop": bool(i.converged), "stacked_residual": i.history[-1] if i.history else None,
        "stop": PAPER["rtol"], "restart": PAPER["restart"]} for pair in pairs for norm in normalize]


def _agreement(model, inputs, targets, rows, channels, solve, settings, damping, pairs, normalize, solved,
               calibration):
    """Projected estimates of the solved pairs per (allocation, k) and their agreement rows: against the
    exact H at λ, and (spectral solves) at the sketch's effective ridge μ_k, d_eff(μ_k) = k.

    ``calibration``: (inputs, targets, rows) of train samples for the energy allocation (as
    the grads stage calibrates: on samples other than those compared)."""
    from gradlake.grads import Projector, compute
    from gradlake.grads.allocation import calibrate

    observables = sorted({o for pair in solved for o in pair})
    exact = solve.at(damping, solved)
    rows_out, stacked = [], []
    for allocation in ALLOCATIONS:
        per_k = []
        for k in settings.ks:
            projector = Projector(seed=settings.seed, k_in=k, k_out=k)
            if allocation == "energy":
                cx, cy, crows = calibration
                projector = calibrate(model, cx, cy, projector.k(model), seed=settings.seed,
                                      observables=observables, channels=channels, rows=crows)
            phi = compute(model, inputs, targets, observables=(*observables, "V"), channels=channels,
                          projector=projector, sample_ids=rows,
                          probes=settings.probes or full_rank_probes(projector.k(model), len(rows)))
            phi = {o: v.detach().double().cpu().numpy() for o, v in phi.items()}
            whitener = Metric.from_moments(Moments(phi["V"].shape[-1]).add(phi["V"]),
                                           f"exact k={k} metric").whitener(damping)
            est = {p: (phi[p[0]] @ whitener) @ (phi[p[1]] @ whitener).T for p in solved}
            per_k.append(np.stack([est[p] for p in solved]))
            k_total = phi["V"].shape[-1]
            mu = effective_ridge(solve.d_eff, k_total) if solve.quad is not None else None
            at_mu = solve.at(mu, solved) if mu else None
            for pair in pairs:
                for norm in normalize:
                    e, h = normalized(est, pair, norm), normalized(exact, pair, norm)
                    row = {"allocation": allocation, "k": k, "k_total": k_total, "probes": phi["V"].shape[1],
                           "pair": pair, "normalization": norm, "relative_frobenius": relative_frobenius(e, h),
                           "spearman": spearman(e, h), "mu_k": mu, "relative_frobenius_mu_k": None,
                           "spearman_mu_k": None}
                    if at_mu is not None:
                        h_mu = normalized(at_mu, pair, norm)
                        row.update(relative_frobenius_mu_k=relative_frobenius(e, h_mu), spearman_mu_k=spearman(e, h_mu))
                    rows_out.append(row)
        stacked.append(np.stack(per_k))
    return rows_out, np.stack(stacked)
