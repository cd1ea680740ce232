"""Where a store's projection stands against the exact spectrum: the ridge μ_k at which a rank-k
sketch answers (d_eff(μ_k) = k), from an exact run's per-minibatch d_eff on a λ grid."""

from __future__ import annotations

from typing import Any

import numpy as np

from gradlake.reduce.output import ReduceOutput
from gradlake.stages.exact_plan import EXACT_JSON

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
