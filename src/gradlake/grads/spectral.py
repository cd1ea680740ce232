"""The spectral rule: per-example gradients of a Fourier layer's weights as outer products per mode.

A spectral convolution (neuraloperator's ``SpectralConv``, 0.3 and 2.x: the module calls its
``_contract(x_modes, weight, separable=...)`` on the retained Fourier modes of its input)
computes, per retained mode m, y_{o,m} = Σ_i x_{i,m} W_{i,o,m} (complex). The gradient of
sample b's ⟨y, δ⟩ w.r.t. the weight used is, per mode, the outer product conj(x_{b,i,m}) d_{b,o,m}
of the input's and the contraction-output gradient's Fourier coefficients (separable:
conj(x_{b,i,m}) d_{b,i,m}); the module's parameters get theirs through the (linear) backward of
the weight's construction from them (a slice, a complex view, a tltorch factorisation's
reconstruction), batched over samples. Parameters the output reaches other than through the
contraction (the bias) get theirs by one backward batched over per-sample cotangents, which
reaches only them. A :class:`Recording` of the module's forward (its contractions run as one
einsum on the weight's values) holds what both need: the capture records the batch's own
forward, so no extra forward or FFT is run; :func:`spectral_grads` (the rule, and its check
against the per-sample loop on two samples) records a rerun.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module

MASKED_ELEMENTS = 1 << 24  # per chunk of per-sample cotangents [chunk, B, ...] for the direct parameters


def supported(module: nn.Module) -> bool:
    """Whether ``module`` contracts its Fourier modes through its own ``_contract`` function."""
    return callable(vars(module).get("_contract"))


def _contract(calls: list, x: torch.Tensor, weight, separable: bool = False, **_) -> torch.Tensor:
    w = weight if torch.is_tensor(weight) else weight.to_tensor()  # a tltorch factorised tensor
    out = torch.einsum("bi...,i...->bi..." if separable else "bi...,io...->bo...", x, w.detach())
    if not out.requires_grad:
        out.requires_grad_()  # (an input that does not require grad: a leaf to differentiate to)
    calls.append((x.detach(), w, out, separable))
    return out


class Recording:
    """The module's forward while open: its parameters swapped for leaves that require grad
    (``leaves``, from ``params``), each contraction recorded in ``calls`` as (input modes, weight
    with its graph to the leaves, output, separable)."""

    def __init__(self, module: nn.Module, params: dict[str, torch.Tensor]):
        self.module = module
        self.leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]] = []
        self._stack = contextlib.ExitStack()

    def open(self) -> None:
        self._stack.enter_context(_reparametrize_module(self.module, self.leaves))
        original = self.module._contract
        self.module._contract = partial(_contract, self.calls)
        self._stack.callback(setattr, self.module, "_contract", original)
        self._stack.enter_context(torch.enable_grad())

    def close(self) -> None:
        self._stack.close()

    def weight_grads(self, call, d: torch.Tensor) -> dict[str, torch.Tensor]:
        """{name: [B, *shape]} from one contraction's output gradient ``d``."""
        x, w, _, separable = call
        if not w.requires_grad:
            return {}
        g = x.conj() * d if separable else torch.einsum("bi...,bo...->bio...", x.conj(), d)
        with torch.enable_grad():
            grads = torch.autograd.grad(w, list(self.leaves.values()), g.to(w.dtype), is_grads_batched=True,
                                        allow_unused=True, retain_graph=True)
        return {n: pg for n, pg in zip(self.leaves, grads) if pg is not None}

    def direct_grads(self, y: torch.Tensor, delta: torch.Tensor) -> dict[str, torch.Tensor]:
        """{name: [B, *shape]} through the paths from the output ``y`` to the leaves other than the
        contractions (their outputs use the weight's values), batched over per-sample cotangents."""
        batch, names = delta.shape[0], list(self.leaves)
        chunk = max(1, MASKED_ELEMENTS // delta.numel())
        parts = []
        for start in range(0, batch, chunk):
            eye = torch.eye(batch, dtype=y.dtype, device=delta.device)[start:start + chunk]
            masked = eye.reshape(*eye.shape, *[1] * (delta.dim() - 1)) * delta.to(y.dtype)  # sample b's alone
            with torch.enable_grad():
                parts.append(torch.autograd.grad(y, list(self.leaves.values()), masked, is_grads_batched=True,
                                                 allow_unused=True, retain_graph=True))
        return {n: torch.cat([part[i] for part in parts]) for i, n in enumerate(names) if parts[0][i] is not None}


def _recorded(module: nn.Module, params: dict[str, torch.Tensor], args: tuple, kwargs: dict,
              pick: Callable) -> tuple[Recording, torch.Tensor]:
    record = Recording(module, params)
    record.open()
    try:
        return record, pick(module(*args, **kwargs))
    finally:
        record.close()


def direct_names(module: nn.Module, params: dict[str, torch.Tensor], args: tuple, kwargs: dict,
                 pick: Callable) -> list[str]:
    """The parameters the output reaches other than through the contractions."""
    record, y = _recorded(module, params, args, kwargs, pick)
    with torch.enable_grad():
        grads = torch.autograd.grad(y.abs().sum(), list(record.leaves.values()), allow_unused=True)
    return [n for n, g in zip(record.leaves, grads) if g is not None]


def spectral_grads(module: nn.Module, params: dict[str, torch.Tensor], args: tuple, kwargs: dict,
                   delta: torch.Tensor, pick: Callable, inner: Callable, direct: bool = True
                   ) -> dict[str, torch.Tensor]:
    """{name: [B, *shape]} per-sample gradients of ⟨pick(module(*args, **kwargs)), δ⟩ with ``params``
    (absent: unused), from a recorded rerun of the module (``direct=False``: through the
    contractions only)."""
    record, y = _recorded(module, params, args, kwargs, pick)
    outs = [call[2] for call in record.calls]
    with torch.enable_grad():
        found = torch.autograd.grad(inner(y, delta), outs, allow_unused=True, retain_graph=True)
    total = record.direct_grads(y, delta) if direct else {}
    for call, d in zip(record.calls, found):
        if d is not None:
            for name, g in record.weight_grads(call, d).items():
                total[name] = total[name] + g if name in total else g
    return total
