"""The exact minibatch mode's finish: every minibatch's H and record aggregated (two-time means,
lag rows, headlines at each λ of the sweep, the agreement and spectrum tables), then
``exact.json`` written last."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa

from gradlake.reduce import minibatch
from gradlake.stages.exact_plan import EXACT_JSON, H_ARRAY, SWEEP_ARRAY, ExactSpec, Minibatch, normalized, solve_pairs


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
        "lambdas": list(lambdas), "htol": settings.htol, "rtol": settings.rtol, "dtype": settings.compute_dtype,
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
