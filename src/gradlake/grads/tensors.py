"""How the per-sample rules read tensors: the followed output, ⟨y, δ⟩ as a real scalar,
per-sample gradients as real [B, numel] rows, a parameter as stored, the closeness test that
admits a rule, and a rule's signature (:data:`Grads`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# A rule: (params, args, kwargs, output gradient δ, output index) -> {name: [B, numel]}.
Grads = Callable[[dict[str, torch.Tensor], tuple, dict, torch.Tensor], dict[str, torch.Tensor]]

def pick(output, index: int | None) -> torch.Tensor:
    """The output tensor a hook follows: the output itself, or element ``index`` of a tuple/list."""
    return output if index is None else output[index]


def inner(y: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """⟨y, δ⟩ as a real scalar (Re Σ y conj(δ) for complex tensors)."""
    if y.is_complex():
        return (torch.view_as_real(y) * torch.view_as_real(delta.to(y.dtype))).sum()
    return (y * delta).sum()


def flat(g: torch.Tensor, batch: int) -> torch.Tensor:
    """[B, ...] per-sample gradients as real [B, numel] (a complex entry becomes (real, imaginary))."""
    return (torch.view_as_real(g) if g.is_complex() else g).reshape(batch, -1)


def parameter(module: nn.Module, name: str) -> nn.Parameter:
    """The parameter registered as ``name`` (a dotted path), as stored: unlike ``get_parameter``,
    also where the owner's attribute access returns a view of it (tltorch's complex factorised
    tensors store real [..., 2] parameters and return complex views)."""
    prefix, _, local = name.rpartition(".")
    return (module.get_submodule(prefix) if prefix else module)._parameters[local]


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` has ``b``'s shape and matches it within 1e-4 |b| + 1e-5 max |b|, entrywise."""
    a, b = a.detach(), b.detach()
    if a.shape != b.shape:
        return False
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(scale, 1e-30)))
