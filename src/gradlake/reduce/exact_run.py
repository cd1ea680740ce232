"""The exact minibatch mode end to end: pick the paper's batch, solve, compare with projections.

Batch (the paper's shape): for each of the first ``classes`` classes (sorted by name), the
first trajectory (lowest id) of ``split``, transitions t = 0 .. per_class - 1, clipped to
what the dataset has. The exact H_AB comes from exact.py (float64 by default). The
agreement report recomputes H on the same batch from projected gradients
(gradlake.grads.compute with Projector(k_in = k_out = k)) for every k in ``ks``, with the
metric η̃ = (1/m) Σ_{i∈B} Σ_v φ_V φ_Vᵀ from ``probes`` random-cotangent probes of the same
batch — the estimator the aggregate reduce uses — and reports, per (k, pair,
normalisation), the relative Frobenius error and the Spearman rank correlation of the
entries. Normalisations here are those of the batch: row-std over the batch's columns,
cosine with the batch's own diagonals H_AA(i, i), H_BB(j, j) (the self-pairs are solved
for too when cosine is asked for).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from gradlake import physics
from gradlake.config import ExactConfig
from gradlake.errors import InputError
from gradlake.progress import progress
from gradlake.reduce.exact import (BatchJacobian, exact_influence, lanczos_top, normalize_matrix,
                                   relative_frobenius, spearman)
from gradlake.reduce.metric import Metric, Moments
from gradlake.reduce.output import ReduceOutput

EXACT_JSON = "exact.json"


def select_batch(trajectories: pa.Table, n_times: int, settings: ExactConfig) -> pa.Table:
    """The batch's samples: row, trajectory, t, class (see the module docstring)."""
    classes = np.asarray(trajectories.column("class").to_pylist(), dtype=str)
    splits = np.asarray(trajectories.column("split").to_pylist(), dtype=str)
    ids = np.asarray(trajectories.column("trajectory").to_numpy(), dtype=np.int64)
    chosen = []
    for name in sorted(set(classes.tolist())):
        members = ids[(classes == name) & (splits == settings.split)]
        if len(members):
            chosen.append((name, int(members.min())))
        if len(chosen) == settings.classes:
            break
    if not chosen:
        raise InputError(f"exact.split: no trajectory of split {settings.split!r} in the dataset "
                         f"(it has splits {sorted(set(splits.tolist()))})")
    steps = min(settings.per_class, n_times - 1)
    t = np.tile(np.arange(steps, dtype=np.int64), len(chosen))
    trajectory = np.repeat([n for _, n in chosen], steps)
    return pa.table({"position": np.arange(len(t)), "row": trajectory * (n_times - 1) + t,
                     "trajectory": trajectory, "t": t.astype(np.int32),
                     "class": np.repeat([c for c, _ in chosen], steps)})


def _solve_pairs(pairs, normalize) -> tuple[str, ...]:
    extra = {o + o for pair in pairs for o in pair} if "cosine" in normalize else set()
    return tuple(dict.fromkeys([*pairs, *sorted(extra)]))


def _normalized(h: dict[str, np.ndarray], pair: str, norm: str) -> np.ndarray:
    diag = (lambda o: np.diag(h[o + o])) if norm == "cosine" else (lambda o: None)
    return normalize_matrix(h[pair], norm, diag(pair[0]), diag(pair[1]))


def run_exact(checkpoint: str, data_url: str, out_url: str, settings: ExactConfig, damping: float = 1e-4,
              pairs=("CC", "MC", "EC"), normalize=("none", "row-std", "cosine"),
              storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Exact H on the batch and the agreement report; writes them under ``out_url``.

    Writes results.zarr/exact/{exact,projected}, exact_batch.parquet,
    exact_agreement.parquet, then exact.json (last). Returns the summary.
    """
    from gradlake.data import Dataset
    from gradlake.grads import Projector, compute
    from gradlake.models.checkpoint import load_checkpoint
    from gradlake.train import resolve_device

    started = time.monotonic()
    if not damping > 0:
        raise InputError(f"reduce.damping: expected λ > 0, got {damping!r}")
    ds = Dataset.open(data_url, storage_options=storage_options)
    available = physics.available_observables(ds.channels)
    pairs = tuple(p for p in pairs if set(p) <= set(available))
    if not pairs:
        raise InputError(f"reduce.pairs: none is available for channels {list(ds.channels)} "
                         f"(observables {', '.join(available)})")
    device = resolve_device(settings.device)
    dtype = torch.float64 if settings.dtype == "float64" else torch.float32
    batch = select_batch(ds.trajectories, ds.n_times, settings)
    rows = batch.column("row").to_numpy()
    model, meta = load_checkpoint(checkpoint, storage_options, device=device)
    inputs, targets = ds.samples(rows)
    x, y = (torch.from_numpy(a).to(device, dtype) for a in (inputs, targets))
    observables = sorted({o for pair in pairs for o in pair})

    jac = BatchJacobian(model, x, dtype)
    residuals = physics.residuals(jac.output, x, y, observables, ds.channels)
    solve_pairs = _solve_pairs(pairs, normalize)
    n_rhs = len(rows) * len({p[1] for p in solve_pairs})
    bar = progress(n_rhs, "exact: Krylov solves", "rhs")
    exact, infos = exact_influence(jac, residuals, solve_pairs, damping, settings.rtol,
                                   settings.max_iter, settings.block, bar)
    bar.close()
    top = lanczos_top(jac.gram, tuple(jac.output.shape), damping, settings.lanczos_steps,
                      device=jac.output.device)

    projected, agreement = {}, []
    for k in progress_iter(settings.ks, "exact: projected estimates"):
        projector = Projector(seed=settings.seed, k_in=k, k_out=k)
        phi = compute(model, inputs, targets, observables=(*observables, "V"), projector=projector,
                      channels=ds.channels, sample_ids=rows, probes=settings.probes)
        phi = {o: v.detach().double().cpu().numpy() for o, v in phi.items()}
        metric = Metric.from_moments(Moments(phi["V"].shape[-1]).add(phi["V"]), f"exact k={k} metric")
        w = metric.whitener(damping)
        est = {p: (phi[p[0]] @ w) @ (phi[p[1]] @ w).T for p in solve_pairs}
        projected[k] = est
        for pair in pairs:
            for norm in normalize:
                e, h = _normalized(est, pair, norm), _normalized(exact, pair, norm)
                agreement.append({"k": k, "k_total": phi["V"].shape[-1], "pair": pair, "normalization": norm,
                                  "relative_frobenius": relative_frobenius(e, h), "spearman": spearman(e, h)})

    out = ReduceOutput(out_url, storage_options)
    out.remove(EXACT_JSON)
    coords = {"pair": list(solve_pairs), "response": rows.tolist(), "perturbation": rows.tolist()}
    out.write_array("exact/exact", np.stack([exact[p] for p in solve_pairs]), ("pair", "response", "perturbation"),
                    coords=coords, description="exact H_AB(i, j) on the batch (float64)")
    out.write_array("exact/projected", np.stack([np.stack([projected[k][p] for p in solve_pairs])
                                                 for k in settings.ks]),
                    ("k", "pair", "response", "perturbation"), coords={"k": list(settings.ks), **coords},
                    description="projected estimate of H_AB on the batch, per k_in = k_out = k")
    out.write_table("exact_batch.parquet", batch)
    out.write_table("exact_agreement.parquet", pa.Table.from_pylist(agreement))
    summary = {
        "checkpoint": checkpoint, "epoch": meta.get("epoch"), "dataset": data_url, "batch_size": len(rows),
        "classes": sorted(set(batch.column("class").to_pylist())), "pairs": list(pairs),
        "solved_pairs": list(solve_pairs), "damping": damping, "rtol": settings.rtol, "dtype": settings.dtype,
        "n_params": jac.n_params, "device": str(device),
        "cg": {o: {"iterations": info.iterations, "max_relative_residual": float(info.relative_residual.max())}
               for o, info in infos.items()},
        "top_eigenvalue": top["top"], "top_eigenvalue_bound": top["bound"], "lanczos_steps": top["steps"],
        "probes": settings.probes, "agreement": agreement,
        "seconds": round(time.monotonic() - started, 2), "complete": True,
    }
    out.write_json(EXACT_JSON, summary)
    return summary


def progress_iter(items, desc: str):
    """Iterate with a progress reporter."""
    items = list(items)
    bar = progress(len(items), desc, "k")
    for item in items:
        yield item
        bar.update(1)
    bar.close()
