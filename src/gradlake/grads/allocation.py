"""Rows of the projection per layer, by gradient energy: where the per-example gradient is.

A uniform k_in x k_out gives every layer the same rows, though on a UNet two thin output
convs hold most of the per-example gradient norm. :func:`calibrate` measures, on a few
fixed calibration samples, each block's per-example gradient statistics and gives the
total k to the blocks where it removes the most error:

- a sketch of a block g (rows a of P_out, b of P_in for a layer's G = Σ δ aᵀ, k for a
  dense block) estimates ‖g‖² with relative variance ≈ 2(s/a + s/b + 1/(ab)) for
  Kronecker factors (s = Σσ⁴/(Σσ²)² of G's singular values: 1 for a rank-one G) and 2/k
  for a dense factor; an identity side (a = d_out, b = d_in, k = numel) adds nothing;
- the error of the Gram matrix Σ_blocks is then ≈ Σ_b [Q_b/a + Q_b/b + W_b/(ab)] with
  W_b = mean ‖G‖⁴ and Q_b = mean ‖GGᵀ‖_F² over calibration rows (and W/k for dense blocks);
- a spectral weight (:mod:`gradlake.grads.capture_plan`) counts as a layer, keyed by its parameter name;
- :func:`allocate` starts every block at one row per factor and doubles (or completes to the
  identity) the factor with the largest error removed per coordinate added, while it fits.

Deterministic: the statistics are rounded to 4 significant digits, recorded in the
projector spec with the rows they gave, and the greedy order breaks ties by block order, so
the same statistics and total give the same rows bit for bit (:func:`allocate` on the
recorded statistics reproduces the recorded rows).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from gradlake.errors import InputError
from gradlake.grads.capture_plan import Plan, plan
from gradlake.grads.projector import Projector

SIGNIFICANT = 4  # digits the calibration statistics are rounded to before allocating


def _round(x: float) -> float:
    return float(f"{float(x):.{SIGNIFICANT}g}")


def block_statistics(model: nn.Module, grads: torch.Tensor) -> dict[str, dict[str, dict[str, float]]]:
    """Per-block statistics of full per-example gradients ``grads`` [rows, p] (named_parameters order).

    {"layers": {layer: {"energy", "w4", "q", "bias_w4"?}}, "dense": {parameter: {"energy", "w4"}}}:
    energy = mean ‖g‖², w4 = mean ‖g‖⁴, q = mean ‖GGᵀ‖_F² (G: the weight as d_out x d_in),
    each rounded to 4 significant digits.
    """
    model_plan = plan(model)
    grads = grads.double()
    columns, start = {}, 0
    for name, shape in model_plan.parameters:
        numel = int(np.prod(shape)) if shape else 1
        columns[name], start = (start, start + numel), start + numel
    if grads.dim() != 2 or grads.shape[1] != start:
        raise InputError(f"allocation: expected per-example gradients [rows, {start}], got {list(grads.shape)}")

    def block(name):
        lo, hi = columns[name]
        return grads[:, lo:hi]

    layers, dense = {}, {}
    matrices = [(layer.name, layer.weight, layer.d_out, layer.d_in, layer.bias) for layer in model_plan.layers]
    matrices += [(name, name, d_out, d_in, None) for name, d_out, d_in in model_plan.spectral]
    for name, weight, d_out, d_in, bias in matrices:
        g = block(weight).reshape(-1, d_out, d_in)
        norms = (g * g).sum(dim=(1, 2))
        small = g @ g.transpose(1, 2) if d_out <= d_in else g.transpose(1, 2) @ g
        entry = {"energy": norms.mean(), "w4": (norms**2).mean(), "q": (small * small).sum(dim=(1, 2)).mean()}
        if bias:
            entry["bias_w4"] = ((block(bias) ** 2).sum(1) ** 2).mean()
        layers[name] = {key: _round(value) for key, value in entry.items()}
    spectral = {name for name, _, _ in model_plan.spectral}
    for entry in model_plan.ruled:
        for qualified in (q for q, _ in entry.params if q not in spectral):
            norms = (block(qualified) ** 2).sum(1)
            dense[qualified] = {"energy": _round(norms.mean()), "w4": _round((norms**2).mean())}
    return {"layers": layers, "dense": dense}


def _ladder(rows: int, dim: int) -> int:
    """The next rows after ``rows`` for a factor on ``dim`` coordinates: double, or the identity."""
    return dim if 2 * rows >= dim else 2 * rows


class _LayerState:
    def __init__(self, d_out: int, d_in: int, bias: bool, stats: dict[str, float]):
        self.dims, self.bias, self.stats = (d_out, d_in), bias, stats
        self.rows = [1, 1]

    def cost(self, rows) -> int:
        return rows[0] * rows[1] + (rows[0] if self.bias else 0)

    def error(self, rows) -> float:
        (a, b), (m, n), s = rows, self.dims, self.stats
        out, inner = a < m, b < n
        err = (s["q"] / a if out else 0.0) + (s["q"] / b if inner else 0.0)
        err += s["w4"] / (a * b) if (out and inner) else 0.0
        if self.bias and out:
            err += s.get("bias_w4", 0.0) / a
        return err

    def move(self, side: int) -> tuple[float, int, list[int]] | None:
        """(error removed, coordinates added, new rows) of growing ``side`` (0: out, 1: in)."""
        if self.rows[side] >= self.dims[side]:
            return None
        new = list(self.rows)
        new[side] = _ladder(new[side], self.dims[side])
        return self.error(self.rows) - self.error(new), self.cost(new) - self.cost(self.rows), new


class _DenseState:
    def __init__(self, numel: int, stats: dict[str, float]):
        self.dims, self.stats, self.rows = (numel,), stats, [1]

    def cost(self, rows) -> int:
        return rows[0]

    def error(self, rows) -> float:
        return self.stats["w4"] / rows[0] if rows[0] < self.dims[0] else 0.0

    def move(self, side: int):
        if self.rows[0] >= self.dims[0]:
            return None
        new = [_ladder(self.rows[0], self.dims[0])]
        return self.error(self.rows) - self.error(new), new[0] - self.rows[0], new


def allocate(model_plan: Plan, statistics: dict[str, Any], k_total: int) -> dict[str, Any]:
    """Rows per layer and dense parameter within ``k_total`` coordinates (see the module docstring).

    Returns {"layers": {layer: [k_out, k_in]}, "dense": {parameter: k}}; InputError when
    ``k_total`` is below one coordinate per factor, or the statistics miss a block.
    """
    states: list[tuple[str, str, _LayerState | _DenseState]] = []
    try:
        for layer in model_plan.layers:
            states.append(("layers", layer.name, _LayerState(layer.d_out, layer.d_in, layer.bias is not None,
                                                             statistics["layers"][layer.name])))
        for name, d_out, d_in in model_plan.spectral:
            states.append(("layers", name, _LayerState(d_out, d_in, False, statistics["layers"][name])))
        spectral = {name for name, _, _ in model_plan.spectral}
        for entry in model_plan.ruled:
            for qualified in (q for q, _ in entry.params if q not in spectral):
                numel = int(np.prod(dict(model_plan.parameters)[qualified]) or 1)
                states.append(("dense", qualified, _DenseState(numel, statistics["dense"][qualified])))
    except KeyError as missing:
        raise InputError(f"allocation: no calibration statistics for {missing} (measured on another model?)") from None
    used = sum(state.cost(state.rows) for _, _, state in states)
    if k_total < used:
        raise InputError(f"projector k_total: {k_total} is below the {used} coordinates of one row per "
                         "factor; give at least that")
    heap: list[tuple[float, int, int, int]] = []  # (-error removed per coordinate, block, side, version)
    version = [0] * len(states)

    def push(i: int) -> None:
        for side in range(len(states[i][2].dims)):
            move = states[i][2].move(side)
            if move is not None and move[0] > 0:
                heapq.heappush(heap, (-move[0] / move[1], i, side, version[i]))

    for i in range(len(states)):
        push(i)
    while heap:
        _, i, side, seen = heapq.heappop(heap)
        if seen != version[i]:
            continue  # stale: the block grew since
        state = states[i][2]
        gain, cost, new = state.move(side)
        if used + cost > k_total:
            continue  # never fits again (the budget only shrinks); the block's other side may
        used += cost
        state.rows = new
        version[i] += 1
        push(i)
    dims: dict[str, Any] = {"layers": {}, "dense": {}}
    for kind, name, state in states:
        dims[kind][name] = list(state.rows) if kind == "layers" else state.rows[0]
    return dims


def calibration_rows(pool: np.ndarray, count: int) -> np.ndarray:
    """``count`` rows of ``pool`` evenly spaced over it (all of them when it is smaller): the
    calibration samples, a pure function of the pool."""
    count = min(count, len(pool))
    return pool[np.unique(np.linspace(0, len(pool) - 1, count).round().astype(np.int64))] if count else pool[:0]


def calibrate(model: nn.Module, inputs, targets, k_total: int, seed: int = 0, kind: str = "rademacher",
              observables: Sequence[str] = ("C",), channels: Sequence[str] | None = None,
              conv: str = "full", batch: int = 4, rows: Sequence[int] | None = None, task=None) -> Projector:
    """An energy-allocated :class:`Projector` of ``k_total`` coordinates, calibrated on ``inputs``.

    Exact per-example gradients of ``observables`` (probes of "V": 4 per sample, seed 0) on
    the calibration samples, ``batch`` at a time; each observable's rows scaled to unit mean
    squared norm, so every observable counts alike. ``rows`` (dataset rows of the samples)
    go into the record. ``task``: the loss and observables (default: the paper's, physics.Task).
    Small and mid-sized models: a batch's full gradients are formed.
    """
    from gradlake.grads.api import compute

    x, y = torch.as_tensor(np.asarray(inputs)), torch.as_tensor(np.asarray(targets))
    if len(x) == 0:
        raise InputError("allocation: no calibration samples")
    device = next(model.parameters()).device
    per_obs: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(x), batch):
        ids = None if rows is None else list(rows[start:start + batch])
        phi = compute(model, x[start:start + batch].to(device), y[start:start + batch].to(device),
                      observables, None, channels=channels, sample_ids=ids, probes=4, task=task)
        for obs, g in phi.items():
            per_obs.setdefault(obs, []).append(g.reshape(-1, g.shape[-1]).double().cpu())
    scaled = []
    for obs in observables:
        g = torch.cat(per_obs[obs])
        scale = float((g * g).sum(1).mean())
        scaled.append(g / np.sqrt(scale) if scale > 0 else g)
    stats = block_statistics(model, torch.cat(scaled))
    dims = allocate(plan(model), stats, k_total)
    record = {"samples": len(x), "rows": None if rows is None else [int(r) for r in rows],
              "observables": list(observables), "statistics": stats}
    return Projector(seed=seed, kind=kind, conv=conv, allocation="energy", k_total=k_total, dims=dims,
                     calibration=record)
