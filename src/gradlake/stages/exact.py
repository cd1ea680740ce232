"""The exact minibatch mode: the paper's H on many minibatches, their statistics, the agreement.

Minibatches come from :func:`gradlake.reduce.minibatch.plan` (minibatch 0 is the paper's
batch). Each is solved by exact.py — dense or Nyström-preconditioned CG, in output or
parameter space, float64 by default — in :func:`run_unit`, which writes its own chunk
of ``results.zarr/exact/H`` and then its record ``exact/done/mb-<m>.json`` (at-least-once
delivery is harmless: a rerun writes the same bytes; a chunk without a record is solved
again). :func:`finish` then aggregates every minibatch (reduce.minibatch) and writes
``exact.json`` last. The stage's shape: :class:`ExactSpec`, :func:`plan` (the minibatches),
:func:`resume` (the finished ones), :func:`run_unit`, :func:`finish`; the driver that runs the
units on the executor is gradlake.distributed.exact_tasks.

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
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from gradlake import physics
from gradlake.config import ExactConfig, settings_hash
from gradlake.errors import InputError
from gradlake.reduce import minibatch
from gradlake.reduce.agreement import normalize_matrix, relative_frobenius, spearman
from gradlake.reduce.exact import PAPER, SolverSettings, solve_hat
from gradlake.reduce.jacobian import BatchJacobian
from gradlake.reduce.metric import Metric, Moments, full_rank_probes
from gradlake.reduce.output import RESULTS, ReduceOutput
from gradlake.stages.records import Records, other_settings

EXACT_JSON = "exact.json"
H_ARRAY = "exact/H"
SWEEP_ARRAY = "exact/H_sweep"
PROJECTED_ARRAY = "exact/projected"
DONE = "exact/done"  # the minibatches' completion records, mb-<m>.json (gradlake.stages.records)


@dataclass(frozen=True)
class ExactSpec:
    """One exact run: what its units and its finish read (``pairs``: of the dataset's channels,
    see :func:`check_pairs`; ``lambdas``: the sweep's other λ)."""

    checkpoint: str
    data_url: str
    out_url: str
    settings: ExactConfig
    damping: float
    lambdas: tuple[float, ...] = ()
    pairs: tuple[str, ...] = ("CC", "MC", "EC")
    normalize: tuple[str, ...] = ("none", "row-std", "cosine")
    storage_options: dict[str, Any] | None = None
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def record(self) -> dict[str, Any]:
        """What every minibatch's record carries: the hash of the run's settings."""
        return {"settings": settings_hash(self.settings, {
            "damping": self.damping, "lambdas": list(self.lambdas), "pairs": list(self.pairs),
            "normalize": list(self.normalize), **self.identity})}

    def output(self) -> ReduceOutput:
        return ReduceOutput(self.out_url, self.storage_options, provenance=self.identity)

    def records(self) -> Records:
        return Records(self.output(), DONE, "mb-")


@dataclass(frozen=True)
class Minibatch:
    """One unit: minibatch ``index`` and its samples (position, row, trajectory, t, class)."""

    index: int
    rows: pa.Table


def plan(spec: ExactSpec) -> list[Minibatch]:
    """Every minibatch of the run (gradlake.reduce.minibatch.plan; minibatch 0 is the paper's)."""
    from gradlake.data import Dataset

    ds = Dataset.open(spec.data_url, storage_options=spec.storage_options)
    s = spec.settings
    return [Minibatch(m, batch) for m, batch in
            enumerate(minibatch.plan(ds.trajectories, ds.n_times, s.split, s.classes, s.per_class, s.minibatches))]


def solve_pairs(pairs, normalize) -> tuple[str, ...]:
    """The pairs to solve: the asked ones, plus the self-pairs cosine needs."""
    extra = {o + o for pair in pairs for o in pair} if "cosine" in normalize else set()
    return tuple(dict.fromkeys([*pairs, *sorted(extra)]))


def normalized(h: dict[str, np.ndarray], pair: str, norm: str) -> np.ndarray:
    """H of ``pair`` under a batch normalisation (cosine reads the self-pairs' diagonals)."""
    diag = (lambda o: np.diag(h[o + o])) if norm == "cosine" else (lambda o: None)
    return normalize_matrix(h[pair], norm, diag(pair[0]), diag(pair[1]))


def solver_settings(settings: ExactConfig) -> SolverSettings:
    return SolverSettings(method=settings.method, space=settings.space, htol=settings.htol, rtol=settings.rtol,
                          max_iter=settings.max_iter, block=settings.block, dense_gb=settings.dense_gb,
                          dense_side=settings.dense_side,
                          krylov_gb=settings.krylov_gb, rank=settings.rank, max_rank=settings.max_rank,
                          probes=settings.deff_probes, seed=settings.seed)


DEFF_GRID = tuple(float(x) for x in np.logspace(-8, 8, 33))  # λ at which every minibatch reports d_eff


def effective_ridge(d_eff, k: float) -> float:
    """μ_k with d_eff(μ_k) = k (bisection in log μ; d_eff decreases in μ): the ridge at which a rank-k
    sketch answers. 0 where k ≥ d_eff at every μ ≥ 1e-12 (the sketch holds the whole spectrum)."""
    lo, hi = -12.0, 12.0
    if d_eff(10 ** lo) <= k:
        return 0.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if d_eff(10 ** mid) > k else (lo, mid)
    return float(10 ** hi)


def ridge_of_store(out: ReduceOutput, k: int) -> dict[str, Any] | None:
    """What an exact run in ``out`` says of a store of rank k: the run's λ and d_eff(λ), and μ_k with
    d_eff(μ_k) = k (median spectrum over minibatches, log-log interpolated on its λ grid; outside the
    grid ``mu_k`` is None and ``mu_k_beyond`` names the grid's end it lies beyond). None before an
    exact run has written its spectrum."""
    if not (out.exists(EXACT_JSON) and out.exists("exact_spectrum.parquet")):
        return None
    summary = out.read_json(EXACT_JSON)
    rows = out.read_tables("exact_spectrum.parquet", partitioned=False).to_pylist()
    grid = sorted({r["lambda"] for r in rows})
    median = [float(np.median([r["d_eff"] for r in rows if r["lambda"] == lam])) for lam in grid]
    ridge = {"damping": summary["damping"], "d_eff": summary.get("d_eff"), "n_outputs": summary["n_outputs"],
             "k": k, "mu_k": None, "mu_k_beyond": None}
    if not median[-1] <= k <= median[0]:
        ridge["mu_k_beyond"] = grid[-1] if k < median[-1] else grid[0]
        return ridge
    log_lam, log_d = np.log(grid), np.log(np.maximum(median, 1e-300))
    ridge["mu_k"] = effective_ridge(lambda mu: float(np.exp(np.interp(np.log(mu), log_lam, log_d))), k)
    return ridge


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


def check_pairs(channels, pairs) -> tuple[str, ...]:
    available = physics.available_observables(channels)
    kept = tuple(p for p in pairs if set(p) <= set(available))
    if not kept:
        raise InputError(f"reduce.pairs: none is available for channels {list(channels)} "
                         f"(observables {', '.join(available)})")
    return kept


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
    dtype = torch.float64 if settings.dtype == "float64" else torch.float32
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


ALLOCATIONS = ("uniform", "energy")


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


def completed(spec: ExactSpec) -> dict[int, dict[str, Any]]:
    """Minibatch -> its completion record, of every minibatch with one (of any settings)."""
    return {int(name): record for name, record in spec.records().load().items()}


def resume(spec: ExactSpec, units: list[Minibatch]) -> set[int]:
    """Arrays and the batch table for the planned minibatches; returns the finished minibatches.

    A previous run with other settings (different hash in its records) is removed first.
    """
    out, batches, settings, lambdas = spec.output(), [u.rows for u in units], spec.settings, spec.lambdas
    solved = solve_pairs(spec.pairs, spec.normalize)
    record = spec.record
    out.remove(EXACT_JSON)
    done = completed(spec)
    size = batches[0].num_rows
    if other_settings(done, record["settings"]) or not out.exists(f"{RESULTS}/{H_ARRAY}/zarr.json"):
        for rel in ("exact", "results.zarr/exact", "exact_batches.parquet", "exact_agreement.parquet",
                    "exact_lags.parquet", "exact_sweep.parquet", "exact_spectrum.parquet"):
            out.remove(rel)
        done = {}
        out.create_array(H_ARRAY, (len(batches), len(solved), size, size), (1, len(solved), size, size), "float64",
                         ("minibatch", "solved_pair", "response", "perturbation"),
                         coords={"minibatch": np.arange(len(batches)), "solved_pair": list(solved)},
                         description="exact H_AB(i, j) per minibatch (rows of exact_batches.parquet)")
        if lambdas:
            out.create_array(SWEEP_ARRAY, (len(batches), len(lambdas), len(solved), size, size),
                             (1, len(lambdas), len(solved), size, size), "float64",
                             ("minibatch", "lambda", "solved_pair", "response", "perturbation"),
                             coords={"minibatch": np.arange(len(batches)), "lambda": list(lambdas),
                                     "solved_pair": list(solved)},
                             description="exact H_AB(i, j) per minibatch at each λ of the sweep (from the same solve)")
        agreement = min(settings.agreement, len(batches))
        if agreement:
            shape = (len(ALLOCATIONS), len(settings.ks), len(solved), size, size)
            out.create_array(PROJECTED_ARRAY, (agreement, *shape), (1, *shape), "float64",
                             ("agreement_minibatch", "allocation", "k", "solved_pair", "response", "perturbation"),
                             coords={"k": list(settings.ks), "allocation": list(ALLOCATIONS)},
                             description="projected estimate of H_AB per agreement minibatch, allocation of the "
                                         "projection (uniform k_in = k_out = k, or energy at the same total k)")
        table = pa.concat_tables([b.append_column("minibatch", pa.array(np.full(b.num_rows, m, np.int32)))
                                  for m, b in enumerate(batches)])
        out.write_table("exact_batches.parquet", table)
    return {m for m in done if m < len(batches)}


def _headlines(hs: list[dict[str, np.ndarray]], batches, pairs, normalize) -> dict:
    """{pair: {normalisation: merged headline}} of the minibatches' H (dicts of solved pairs)."""
    return {pair: {norm: minibatch.merge_headlines([minibatch.headline(normalized(h, pair, norm), batch)
                                                    for h, batch in zip(hs, batches)])
                   for norm in normalize} for pair in pairs}


def finish(spec: ExactSpec, units: list[Minibatch], records: dict[int, dict[str, Any]],
           started: float) -> dict[str, Any]:
    """Aggregate every minibatch (``records``: minibatch -> its completion record), write the
    statistics, then exact.json (last); returns the summary."""
    out, batches, settings, damping = spec.output(), [u.rows for u in units], spec.settings, spec.damping
    lambdas, pairs, normalize, identity = spec.lambdas, spec.pairs, spec.normalize, spec.identity
    solved = solve_pairs(pairs, normalize)
    records = [records[u.index] for u in units]
    values = out.open_array(H_ARRAY)[...]
    classes = sorted({c for b in batches for c in b.column("class").to_pylist()})
    n_t = 1 + max(int(np.max(b.column("t").to_numpy())) for b in batches)
    twotime = np.full((len(pairs), len(normalize), len(minibatch.RELATIONS), len(classes), n_t, n_t), np.nan)
    lags = []
    hs = [dict(zip(solved, values[m])) for m in range(len(batches))]
    for p, pair in enumerate(pairs):
        for q, norm in enumerate(normalize):
            normed = [normalized(h, pair, norm) for h in hs]
            twotime[p, q] = minibatch.twotime(normed, batches, classes, n_t)
            for m, (h, batch) in enumerate(zip(normed, batches)):
                lags += [{"pair": pair, "normalization": norm, **row} for row in minibatch.lag_rows(h, batch, m)]
    heads = _headlines(hs, batches, pairs, normalize)
    out.write_array("exact/twotime", twotime, ("pair", "normalization", "relation", "class", "t_response",
                                               "t_perturbation"),
                    coords={"pair": list(pairs), "normalization": list(normalize),
                            "relation": list(minibatch.RELATIONS), "class": classes,
                            "t_response": list(range(n_t)), "t_perturbation": list(range(n_t))},
                    description="mean exact H over minibatches, per relation, class and time pair")
    out.write_table("exact_lags.parquet", pa.Table.from_pylist(lags))
    agreement = [{"minibatch": r["minibatch"], **row} for r in records for row in r["agreement"]]
    if agreement:
        out.write_table("exact_agreement.parquet", pa.Table.from_pylist(agreement))
    solves = [r["solve"] for r in records]
    spectrum = [{"minibatch": r["minibatch"], **row} for r in records for row in r["solve"].get("d_eff", [])]
    if spectrum:
        out.write_table("exact_spectrum.parquet", pa.Table.from_pylist(spectrum))
    sweep = _sweep_rows(out, batches, records, damping, lambdas, pairs, normalize, heads)
    if sweep:
        out.write_table("exact_sweep.parquet", pa.Table.from_pylist(sweep))
    d_eff = [row["d_eff"] for row in spectrum if row["lambda"] == damping]
    bounds = [s["h_error_bound"] for s in solves if s["h_error_bound"] is not None]
    paper = [{"minibatch": r["minibatch"], **row} for r in records for row in r.get("paper_check", [])]
    first = records[0]
    summary = {
        **identity, "minibatches": len(batches), "batch_size": batches[0].num_rows, "classes": classes,
        "split": settings.split, "per_class": settings.per_class,
        "pairs": list(pairs), "solved_pairs": list(solved), "normalize": list(normalize), "damping": damping,
        "lambdas": list(lambdas), "htol": settings.htol, "rtol": settings.rtol, "dtype": settings.dtype,
        "n_params": first["n_params"], "n_outputs": first["n_outputs"],
        "solver": {"method": sorted({s["method"] for s in solves}), "space": sorted({s["space"] for s in solves}),
                   "median_products": float(np.median([s["products"] for s in solves])),
                   "max_krylov_dimension": int(max(s["krylov_dimension"] for s in solves)),
                   "max_h_error_bound": max(bounds) if bounds else None,
                   "max_relative_residual": float(max(s["max_relative_residual"] for s in solves)),
                   "median_seconds_per_minibatch": float(np.median([r["seconds"] for r in records]))},
        "top_eigenvalue": max((s["top_eigenvalue"] for s in solves if "top_eigenvalue" in s), default=None),
        "d_eff": float(np.median(d_eff)) if d_eff else None,
        "effective_ridge": sorted({(row["k_total"], row["mu_k"]) for row in agreement if row["mu_k"] is not None}),
        "headline": heads, "paper": {"CC": {"row-std": {"all": minibatch.PAPER_CE_UNET}},
                                      "source": "Amarel et al. 2025, UNet on CE (tail 0.7-0.9)"},
        "paper_solver": paper, "probes": settings.probes, "agreement": agreement,
        "seconds": round(time.monotonic() - started, 2), "complete": True,
    }
    out.write_json(EXACT_JSON, summary)
    return summary


def _sweep_rows(out, batches, records, damping, lambdas, pairs, normalize, heads) -> list[dict[str, Any]]:
    """The headline numbers at the run's λ and every λ of the sweep, with d_eff and whether every
    minibatch's solve met its bound there."""
    solved = solve_pairs(pairs, normalize)
    per_lambda = {damping: heads}
    if lambdas:
        sweep = out.open_array(SWEEP_ARRAY)[...]
        for li, lam in enumerate(lambdas):
            per_lambda[lam] = _headlines([dict(zip(solved, sweep[m, li])) for m in range(len(batches))], batches,
                                         pairs, normalize)
    rows = []
    for lam, head in sorted(per_lambda.items()):
        d_eff = [row["d_eff"] for r in records for row in r["solve"].get("d_eff", []) if row["lambda"] == lam]
        met = [v["converged"] for r in records for v in r["solve"]["sweep"] if v["lambda"] == lam]
        for pair, by_norm in head.items():
            for norm, cells in by_norm.items():
                for name, numbers in cells.items():
                    rows.append({"lambda": lam, "pair": pair, "normalization": norm, "class": name, **numbers,
                                 "d_eff": float(np.median(d_eff)) if d_eff else None,
                                 "converged": all(met) if met else True})
    return rows
