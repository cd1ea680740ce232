"""Full per-example gradients J_iᵀ r_i ∈ R^p (``projector=None``), for small models.

Independent of the hook-based capture: ``torch.func`` maps a per-sample VJP of the whole
model over the batch; a model that vmap cannot run (in-place writes into fresh tensors, as
in FNO spectral convolutions) takes a per-sample autograd loop instead (logged). A complex
parameter's gradient is its (real, imaginary) pairs. Memory is O(batch × p), so this is the
validation path, not the production one.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap

from gradlake.grads.capture import Cotangents, gather, slots_of
from gradlake.grads.routes import frozen
from gradlake.grads.tensors import flat, inner

log = logging.getLogger(__name__)


def full_grads(model: nn.Module, inputs: torch.Tensor,
               cotangents: Cotangents) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """{name: float32 [B, p] or [B, m, p]} in ``model.named_parameters()`` order, and pred."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    with torch.no_grad(), frozen(model):
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
            rows.append(torch.cat([flat(g[name], 1)[0] for name in params]))
        return torch.stack(rows)

    with torch.enable_grad(), frozen(model):
        try:
            phi = vmap(per_sample)(inputs, stacked)  # [B, slots, p]
        except Exception as exc:  # noqa: BLE001 - vmap cannot run this model: one sample at a time
            log.info("grads full gradients: vmap failed (%s: %s); per-sample autograd loop",
                     type(exc).__name__, str(exc).splitlines()[0][:160])
            phi = _loop(model, params, buffers, inputs, stacked)
    return gather(phi.float().transpose(0, 1), slots), pred


def _loop(model: nn.Module, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
          inputs: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """[B, slots, p] by plain autograd, one sample at a time."""
    out = []
    for b in range(inputs.shape[0]):
        leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
        pred = functional_call(model, (leaves, buffers), (inputs[b:b + 1].clone(),))
        rows = []
        for j, cot in enumerate(stacked[b].unbind(0)):
            grads = torch.autograd.grad(inner(pred, cot.unsqueeze(0)), list(leaves.values()), allow_unused=True,
                                        retain_graph=j + 1 < stacked.shape[1])
            rows.append(torch.cat([flat(torch.zeros_like(p) if g is None else g, 1)[0]
                                   for p, g in zip(leaves.values(), grads)]))
        out.append(torch.stack(rows))
    return torch.stack(out)
