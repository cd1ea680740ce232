"""The spectral rule: per-example gradients of a Fourier layer's weights as outer products per mode.

A spectral convolution (neuraloperator's ``SpectralConv``, 0.3 and 2.x: the module calls its
``_contract(x_modes, weight, separable=...)`` on the retained Fourier modes of its input)
computes, per retained mode m, y_{o,m} = Σ_i x_{i,m} W_{i,o,m} (complex). The gradient of
sample b's ⟨y, δ⟩ w.r.t. the weight used is, per mode, the outer product conj(x_{b,i,m}) δ_{b,o,m}
of the input's and the output gradient's Fourier coefficients (separable: conj(x_{b,i,m}) δ_{b,i,m});
the module's parameters get theirs through the (linear) backward of the weight's construction
from them (a slice, a complex view, a tltorch factorisation's reconstruction), batched over
samples. Parameters the output reaches other than through the contraction (the bias) get theirs
by one backward per sample through the batched graph, which reaches only them. So one batched
forward and backward of the module replace the per-sample loop; the rule is used only where it
matches that loop on two samples (:class:`gradlake.grads.modules.ModuleGrads`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def supported(module: nn.Module) -> bool:
    """Whether ``module`` contracts its Fourier modes through its own ``_contract`` function."""
    return callable(vars(module).get("_contract"))


def spectral_grads(module: nn.Module, run: Callable, params: dict[str, torch.Tensor], args: tuple, kwargs: dict,
                   delta: torch.Tensor, pick: Callable, inner: Callable) -> dict[str, torch.Tensor]:
    """{name: [B, *shape]} per-sample gradients of ⟨pick(run(params, args, kwargs)), δ⟩ (None: unused)."""
    batch = delta.shape[0]
    leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]] = []
    original = module._contract

    def contract(x, weight, separable=False, **_):
        w = weight if torch.is_tensor(weight) else weight.to_tensor()
        out = torch.einsum("bi...,i...->bi..." if separable else "bi...,io...->bo...", x.detach(), w.detach())
        calls.append((x.detach(), w, out.requires_grad_(), separable))
        return out

    module._contract = contract
    try:
        with torch.enable_grad():
            y = pick(run(leaves, args, kwargs))
    finally:
        module._contract = original
    names = list(leaves)
    with torch.enable_grad():
        found = torch.autograd.grad(inner(y, delta), [c[2] for c in calls] + list(leaves.values()),
                                    allow_unused=True, retain_graph=True)
    out: dict[str, torch.Tensor | None] = dict.fromkeys(names)

    def add(name, g):
        out[name] = g if out[name] is None else out[name] + g

    for (x, w, _, separable), d in zip(calls, found[:len(calls)]):
        if d is None or not w.requires_grad:
            continue
        g = x.conj() * d if separable else torch.einsum("bi...,bo...->bio...", x.conj(), d)
        with torch.enable_grad():
            per_sample = torch.autograd.grad(w, list(leaves.values()), g, is_grads_batched=True,
                                             allow_unused=True, retain_graph=True)
        for name, pg in zip(names, per_sample):
            if pg is not None:
                add(name, pg)
    direct = [n for n, g in zip(names, found[len(calls):]) if g is not None]
    if direct:  # reached other than through the contraction: one backward per sample, to them only
        rows = []
        for b in range(batch):
            masked = torch.zeros_like(delta)
            masked[b] = delta[b]
            with torch.enable_grad():
                rows.append(torch.autograd.grad(inner(y, masked), [leaves[n] for n in direct], retain_graph=True))
        for i, name in enumerate(direct):
            add(name, torch.stack([row[i] for row in rows]))
    return out
