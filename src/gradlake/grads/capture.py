"""Projected per-example gradients from one batched forward and one backward per cotangent.

:func:`projected_grads` runs the model once on the batch under the hooks of
:mod:`gradlake.grads.hooks` (which project each module's per-example gradient blocks into φ),
then one backward per cotangent slot (each observable, each probe of "V"), and gathers φ per
observable. Which modules' hooks cover which parameters is found (and checked against
autograd) before the first batch of a model and input shape: :mod:`gradlake.grads.routes`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torch.func import functional_call

from gradlake.errors import GradlakeError, InputError
from gradlake.grads.capture_plan import Plan, plan
from gradlake.grads.hooks import BatchHooks
from gradlake.grads.projector import Projector
from gradlake.grads.routes import Routes, frozen, per_sample_copies, routes
from gradlake.grads.tensors import flat

Cotangents = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def slots_of(cotangents: dict[str, torch.Tensor], pred: torch.Tensor) -> list[tuple[str, int | None, torch.Tensor]]:
    """(observable, probe index or None, [B, *out] cotangent) for every backward pass."""
    slots = []
    for obs, cot in cotangents.items():
        if cot.shape == pred.shape:
            slots.append((obs, None, cot))
        elif cot.dim() == pred.dim() + 1 and cot.shape[0] == pred.shape[0] and cot.shape[2:] == pred.shape[1:]:
            slots.extend((obs, j, cot[:, j]) for j in range(cot.shape[1]))
        else:
            raise GradlakeError(f"cotangent {obs!r} has shape {list(cot.shape)}; expected the model "
                                f"output's {list(pred.shape)} or [batch, m, *output]")
    return slots


def gather(phi: torch.Tensor, slots: list[tuple[str, int | None, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """[slots, B, k] -> {obs: [B, k] or [B, m, k]} in the order of the cotangents."""
    out: dict[str, list[torch.Tensor]] = {}
    single = {}
    for i, (obs, probe, _) in enumerate(slots):
        out.setdefault(obs, []).append(phi[i])
        single[obs] = probe is None
    return {obs: rows[0] if single[obs] else torch.stack(rows, dim=1) for obs, rows in out.items()}


def projected_grads(model: nn.Module, inputs: torch.Tensor, cotangents: Cotangents, projector: Projector,
                    dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """φ = P J_iᵀ r_i for every cotangent r that ``cotangents(pred)`` returns, and pred.

    ``cotangents`` maps the (detached) batched prediction to {name: [B, *out]} or
    {name: [B, m, *out]}; the result has {name: float32 [B, k]} or [B, m, k].
    ``dtype``: the precision of the projections and outer products (float32, or bfloat16
    on GPUs); φ is accumulated and returned in float32. The first call for a model and
    input shape prepares and checks the capture against autograd on two samples (:func:`routes`).
    """
    if dtype not in (torch.float32, torch.bfloat16):
        raise InputError(f"grads precision: expected float32 or bfloat16, got {dtype}")
    model_plan = plan(model)
    covered = routes(model, model_plan, inputs, projector, partial(_check, model, model_plan, projector))
    return _capture(model, model_plan, covered, inputs, cotangents, projector, dtype)


def _capture(model, model_plan, covered, inputs, cotangents, projector, dtype):
    capture = BatchHooks(model_plan, covered.ruled(model_plan, model), covered.reached, projector,
                         inputs.shape[0], inputs.device, dtype)
    autocast = torch.autocast(inputs.device.type, dtype=dtype, enabled=dtype != torch.float32)
    copies = per_sample_copies(model, [q for _, qs in covered.expanded for q in qs], inputs.shape[0])
    with frozen(model), torch.enable_grad(), capture.hooks(), autocast:
        pred = functional_call(model, copies, (inputs,)) if copies else model(inputs)
        if not pred.requires_grad:
            raise GradlakeError("the model output does not depend on any of its parameters")
        slots = slots_of(cotangents(pred.detach()), pred)
        capture.phi = torch.empty(len(slots), inputs.shape[0], capture.k, device=inputs.device)
        capture.slots = len(slots)
        for i, (_, _, cot) in enumerate(slots):
            capture.slot = i
            grads = torch.autograd.grad(pred, [*capture.roots, *copies.values(), *(c for *_, c in capture.copies)],
                                        cot.to(pred.dtype), retain_graph=i + 1 < len(slots), allow_unused=True)
            grads = [None if g is None else flat(g.float() if g.dtype == torch.bfloat16 else g, inputs.shape[0])
                     for g in grads[len(capture.roots):]]
            for name, g in zip(copies, grads):
                if g is not None:
                    capture.add_dense(name, g)
            for (entry, local, _), g in zip(capture.copies, grads[len(copies):]):
                if g is not None:
                    capture.add_per_sample(entry, {local: g})
            capture.flush()
    return gather(capture.phi, slots), pred.detach()


def _check(model, model_plan: Plan, projector: Projector, covered: Routes, x: torch.Tensor,
           cot: torch.Tensor) -> torch.Tensor:
    """φ [B, k] of samples ``x`` for one cotangent, float32 (what :func:`routes` checks)."""
    return _capture(model, model_plan, covered, x, lambda pred: {"C": cot}, projector, torch.float32)[0]["C"]
