"""Exact per-example gradients J_iᵀ r_i ∈ R^p (``projector=None``), for small models.

Independent of the hook-based capture: ``torch.func`` maps a per-sample VJP of the whole
model over the batch. Memory is O(batch × p), so this is the validation path, not the
production one.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap

from gradlake.grads.capture import Cotangents, gather, slots_of


def exact_grads(model: nn.Module, inputs: torch.Tensor,
                cotangents: Cotangents) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """{name: float32 [B, p] or [B, m, p]} in ``model.named_parameters()`` order, and pred."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    with torch.no_grad():
        pred = model(inputs)
    slots = slots_of(cotangents(pred), pred)
    stacked = torch.stack([cot for _, _, cot in slots], dim=1)  # [B, slots, *out]

    def per_sample(x: torch.Tensor, cots: torch.Tensor) -> torch.Tensor:
        def output(p):
            return functional_call(model, (p, buffers), (x.unsqueeze(0),)).squeeze(0)

        _, pullback = vjp(output, params)
        rows = []
        for cot in cots.unbind(0):
            (g,) = pullback(cot)
            rows.append(torch.cat([g[name].reshape(-1) for name in params]))
        return torch.stack(rows)

    with torch.enable_grad():
        phi = vmap(per_sample)(inputs, stacked)  # [B, slots, p]
    return gather(phi.float().transpose(0, 1), slots), pred
