"""The exact minibatch mode: the paper's H on many minibatches, their statistics, the agreement.

Minibatches come from :func:`gradlake.reduce.minibatch.plan` (minibatch 0 is the paper's
batch). Each is solved by exact.py — dense or Nyström-preconditioned CG, in output or
parameter space, float64 by default — in :func:`minibatch_work`, which writes its own chunk
of ``results.zarr/exact/H`` and then its record ``exact/done/mb-<m>.json`` (at-least-once
delivery is harmless: a rerun writes the same bytes; a chunk without a record is solved
again). :func:`finish` then aggregates every minibatch (reduce.minibatch) and writes
``exact.json`` last. The Ray driver is gradlake.distributed.exact_tasks.

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
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from gradlake import physics
from gradlake.config import ExactConfig, settings_hash
from gradlake.errors import InputError
from gradlake.reduce import minibatch
from gradlake.reduce.exact import (BatchJacobian, SolverSettings, exact_influence, lanczos_top, normalize_matrix,
                                   relative_frobenius, spearman)
from gradlake.reduce.metric import Metric, Moments
from gradlake.reduce.output import RESULTS, ReduceOutput

EXACT_JSON = "exact.json"
H_ARRAY = "exact/H"
PROJECTED_ARRAY = "exact/projected"


def solve_pairs(pairs, normalize) -> tuple[str, ...]:
    """The pairs to solve: the asked ones, plus the self-pairs cosine needs."""
    extra = {o + o for pair in pairs for o in pair} if "cosine" in normalize else set()
    return tuple(dict.fromkeys([*pairs, *sorted(extra)]))


def normalized(h: dict[str, np.ndarray], pair: str, norm: str) -> np.ndarray:
    """H of ``pair`` under a batch normalisation (cosine reads the self-pairs' diagonals)."""
    diag = (lambda o: np.diag(h[o + o])) if norm == "cosine" else (lambda o: None)
    return normalize_matrix(h[pair], norm, diag(pair[0]), diag(pair[1]))


def solver_settings(settings: ExactConfig) -> SolverSettings:
    return SolverSettings(method=settings.method, space=settings.space, rtol=settings.rtol,
                          max_iter=settings.max_iter, block=settings.block, dense_gb=settings.dense_gb,
                          rank=settings.rank, max_rank=settings.max_rank, seed=settings.seed)


def check_pairs(channels, pairs) -> tuple[str, ...]:
    available = physics.available_observables(channels)
    kept = tuple(p for p in pairs if set(p) <= set(available))
    if not kept:
        raise InputError(f"reduce.pairs: none is available for channels {list(channels)} "
                         f"(observables {', '.join(available)})")
    return kept


def minibatch_work(checkpoint: str, data_url: str, out_url: str, m: int, batch: pa.Table,
                   settings: ExactConfig, damping: float, pairs, normalize,
                   storage_options: dict[str, Any] | None, record: dict[str, Any]) -> dict[str, Any]:
    """Solve minibatch ``m``, write its chunk of H (and of the projected estimates), then its record."""
    from gradlake.data import Dataset
    from gradlake.models.checkpoint import load_checkpoint
    from gradlake.train import resolve_device

    started = time.monotonic()
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
    h, infos = exact_influence(jac, residuals, solved, damping, solver_settings(settings))
    out = ReduceOutput(out_url, storage_options)
    out.open_array(H_ARRAY)[m] = np.stack([h[p] for p in solved])
    info = {o: {"method": i.method, "space": i.space, "iterations": i.iterations, "rank": i.rank,
                "products": i.products, "seconds": i.seconds,
                "max_relative_residual": float(i.relative_residual.max())} for o, i in infos.items()}
    result = {**record, "minibatch": m, "n_outputs": jac.output.numel(), "n_params": jac.n_params,
              "solves": info, "agreement": []}
    if m == 0:
        top = lanczos_top(jac.gram, tuple(jac.output.shape), damping, settings.lanczos_steps, device=device)
        result.update(top_eigenvalue=top["top"], top_eigenvalue_bound=top["bound"], lanczos_steps=top["steps"])
    if m < settings.agreement:
        from gradlake.grads.allocation import calibration_rows

        picked = calibration_rows(ds.index().select(splits=["train"]), 8)
        calibration = (*ds.samples(picked), picked.tolist())
        result["agreement"], projected = _agreement(model, inputs, targets, rows, ds.channels, h, settings,
                                                    damping, pairs, normalize, solved, calibration)
        out.open_array(PROJECTED_ARRAY)[m] = projected
    result["seconds"] = round(time.monotonic() - started, 2)
    out.write_json(f"exact/done/mb-{m:06d}.json", result)
    return result


ALLOCATIONS = ("uniform", "energy")


def _agreement(model, inputs, targets, rows, channels, exact, settings, damping, pairs, normalize, solved,
               calibration):
    """Projected estimates of the solved pairs per (allocation, k) and their agreement rows.

    ``calibration``: (inputs, targets, rows) of train samples for the energy allocation (as
    the grads stage calibrates: on samples other than those compared)."""
    from gradlake.grads import Projector, compute
    from gradlake.grads.allocation import calibrate

    observables = sorted({o for pair in solved for o in pair})
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
                          projector=projector, sample_ids=rows, probes=settings.probes)
            phi = {o: v.detach().double().cpu().numpy() for o, v in phi.items()}
            whitener = Metric.from_moments(Moments(phi["V"].shape[-1]).add(phi["V"]),
                                           f"exact k={k} metric").whitener(damping)
            est = {p: (phi[p[0]] @ whitener) @ (phi[p[1]] @ whitener).T for p in solved}
            per_k.append(np.stack([est[p] for p in solved]))
            for pair in pairs:
                for norm in normalize:
                    e, h = normalized(est, pair, norm), normalized(exact, pair, norm)
                    rows_out.append({"allocation": allocation, "k": k, "k_total": phi["V"].shape[-1], "pair": pair,
                                     "normalization": norm, "relative_frobenius": relative_frobenius(e, h),
                                     "spearman": spearman(e, h)})
        stacked.append(np.stack(per_k))
    return rows_out, np.stack(stacked)


def prepare(out: ReduceOutput, batches: list[pa.Table], settings: ExactConfig, damping: float, pairs,
            normalize, identity: dict[str, Any]) -> tuple[dict[str, Any], set[int]]:
    """Arrays and the batch table for the planned minibatches; returns (record, finished minibatches).

    A previous run with other settings (different hash in its records) is removed first.
    """
    solved = solve_pairs(pairs, normalize)
    record = {"settings": settings_hash(settings, {"damping": damping, "pairs": list(pairs),
                                                   "normalize": list(normalize), **identity})}
    out.remove(EXACT_JSON)
    done = {}
    for entry in out.ls("exact/done"):
        if entry.endswith(".json") and entry.startswith("mb-"):
            done[int(entry[3:-5])] = out.read_json(f"exact/done/{entry}")
    size = batches[0].num_rows
    if any(r.get("settings") != record["settings"] for r in done.values()) or not out.exists(f"{RESULTS}/{H_ARRAY}/zarr.json"):
        for rel in ("exact", "results.zarr/exact", "exact_batches.parquet", "exact_agreement.parquet",
                    "exact_lags.parquet"):
            out.remove(rel)
        done = {}
        out.create_array(H_ARRAY, (len(batches), len(solved), size, size), (1, len(solved), size, size), "float64",
                         ("minibatch", "solved_pair", "response", "perturbation"),
                         coords={"minibatch": np.arange(len(batches)), "solved_pair": list(solved)},
                         description="exact H_AB(i, j) per minibatch (rows of exact_batches.parquet)")
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
    return record, {m for m in done if m < len(batches)}


def finish(out: ReduceOutput, batches: list[pa.Table], settings: ExactConfig, damping: float, pairs,
           normalize, identity: dict[str, Any], started: float) -> dict[str, Any]:
    """Aggregate every minibatch, write the statistics, then exact.json (last); returns the summary."""
    solved = solve_pairs(pairs, normalize)
    records = [out.read_json(f"exact/done/mb-{m:06d}.json") for m in range(len(batches))]
    values = out.open_array(H_ARRAY)[...]
    classes = sorted({c for b in batches for c in b.column("class").to_pylist()})
    n_t = 1 + max(int(np.max(b.column("t").to_numpy())) for b in batches)
    twotime = np.full((len(pairs), len(normalize), len(minibatch.RELATIONS), len(classes), n_t, n_t), np.nan)
    lags, heads = [], {}
    for p, pair in enumerate(pairs):
        for q, norm in enumerate(normalize):
            hs = [normalized(dict(zip(solved, values[m])), pair, norm) for m in range(len(batches))]
            twotime[p, q] = minibatch.twotime(hs, batches, classes, n_t)
            parts = []
            for m, (h, batch) in enumerate(zip(hs, batches)):
                lags += [{"pair": pair, "normalization": norm, **row} for row in minibatch.lag_rows(h, batch, m)]
                parts.append(minibatch.headline(h, batch))
            heads.setdefault(pair, {})[norm] = minibatch.merge_headlines(parts)
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
    solves = [s for r in records for s in r["solves"].values()]
    first = records[0]
    summary = {
        **identity, "minibatches": len(batches), "batch_size": batches[0].num_rows, "classes": classes,
        "split": settings.split, "per_class": settings.per_class,
        "pairs": list(pairs), "solved_pairs": list(solved), "normalize": list(normalize), "damping": damping,
        "rtol": settings.rtol, "dtype": settings.dtype, "n_params": first["n_params"],
        "n_outputs": first["n_outputs"],
        "solver": {"method": sorted({s["method"] for s in solves}), "space": sorted({s["space"] for s in solves}),
                   "median_iterations": float(np.median([s["iterations"] for s in solves])),
                   "max_iterations": int(max(s["iterations"] for s in solves)),
                   "max_rank": int(max(s["rank"] for s in solves)),
                   "max_relative_residual": float(max(s["max_relative_residual"] for s in solves)),
                   "median_seconds_per_minibatch": float(np.median([r["seconds"] for r in records]))},
        "top_eigenvalue": first.get("top_eigenvalue"), "top_eigenvalue_bound": first.get("top_eigenvalue_bound"),
        "headline": heads, "paper": {"CC": {"row-std": {"all": minibatch.PAPER_CE_UNET}},
                                      "source": "Amarel et al. 2025, UNet on CE (tail 0.7-0.9)"},
        "probes": settings.probes, "agreement": agreement,
        "seconds": round(time.monotonic() - started, 2), "complete": True,
    }
    out.write_json(EXACT_JSON, summary)
    return summary
