"""Exact per-example gradients of one module's own parameters, from its input and output gradient.

Used for every parameter outside Linear/Conv layers. Three rules, the first that holds:

- *affine* (norms): output = base(x) ⊙ weight + bias, with weight and bias of one shape S
  broadcast along some output axes; base(x) is the module's own output with weight = 1 and
  bias = 0, and per-sample grads are Σ base ⊙ δ and Σ δ over the other axes. From the
  module's output y (:meth:`Affine.from_output`, no extra forward): Σ base ⊙ δ =
  (Σ y ⊙ δ − bias · Σ δ) / weight, used where |bias| <= 16 |weight| (so the result is
  within float rounding of Σ base ⊙ δ); otherwise base comes from one extra forward;
- *additive* (a learned embedding added to its input): output = base(x) + p, per-sample
  grad Σ δ over the axes p is broadcast along (no extra forward);
- otherwise ``torch.func``: vmap over samples of grad of ⟨module(x_b), δ_b⟩ (any module).

A rule is used for a module only after it reproduced the module's output exactly on one
sample with random parameter values (checked once per module and output shape), so
correctness never rests on the module's class or parameter names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

MAX_BIAS_RATIO = 16.0  # |bias| / |weight| up to which an affine module's grads come from its output
Grads = Callable[[dict[str, torch.Tensor], tuple, dict, torch.Tensor], dict[str, torch.Tensor]]


def _placements(shape: tuple[int, ...], out: tuple[int, ...]) -> list[int]:
    """Output axes where a parameter of ``shape`` can start, broadcast over the others."""
    r = len(shape)
    spots = []
    for start in range(len(out) - r + 1):
        if start == 0 and (r == 0 or shape[0] != 1):
            continue  # only a size-1 leading dim may sit on the batch axis
        if all(s in (1, o) for s, o in zip(shape, out[start:start + r])):
            spots.append(start)
    return spots


def _view(p: torch.Tensor, start: int, ndim: int) -> torch.Tensor:
    return p.reshape((1,) * start + tuple(p.shape) + (1,) * (ndim - start - p.dim()))


def _reduce(t: torch.Tensor, shape: tuple[int, ...], start: int) -> torch.Tensor:
    """Per-sample sum of ``t`` [B, ...] onto a parameter of ``shape`` placed at ``start``: [B, numel]."""
    placed = (1,) * start + tuple(shape) + (1,) * (t.dim() - start - len(shape))
    dims = [d for d in range(1, t.dim()) if placed[d] == 1 and t.shape[d] != 1]
    if dims:
        t = t.sum(dim=dims, keepdim=True)
    return t.reshape(t.shape[0], -1)


@dataclass(frozen=True, eq=False)
class Affine:
    """The affine rule: output = base ⊙ weight + bias, parameters of ``shape`` at output axis ``start``."""

    shape: tuple[int, ...]
    start: int
    unit: dict[str, torch.Tensor] = field(repr=False)  # weight = 1 (and bias = 0): the parameters giving base

    def from_base(self, base: torch.Tensor, delta: torch.Tensor) -> dict[str, torch.Tensor]:
        """{name: [B, numel]} from base and the output gradient."""
        out = {"weight": _reduce(base.to(delta.dtype) * delta, self.shape, self.start)}
        if "bias" in self.unit:
            out["bias"] = _reduce(delta, self.shape, self.start)
        return out

    def invertible(self, params: dict[str, torch.Tensor]) -> bool:
        """Whether :meth:`from_output` is within float rounding of :meth:`from_base` for ``params``."""
        weight = params["weight"].abs()
        bias = params["bias"].abs() if "bias" in params else torch.zeros_like(weight)
        return bool((bias <= MAX_BIAS_RATIO * weight).all() and (weight > 0).all())

    def from_output(self, output: torch.Tensor, delta: torch.Tensor,
                    params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{name: [B, numel]} from the module's output (base ⊙ weight + bias) and the output gradient."""
        weighted = _reduce(output.to(delta.dtype) * delta, self.shape, self.start)
        out = {}
        if "bias" in self.unit:
            out["bias"] = _reduce(delta, self.shape, self.start)
            weighted = weighted - params["bias"].reshape(1, -1).to(delta.dtype) * out["bias"]
        out["weight"] = weighted / params["weight"].reshape(1, -1).to(delta.dtype)
        return out


class ModuleGrads:
    """Per-sample gradients of a module's own parameters; the rule is chosen once per output shape."""

    def __init__(self, module: nn.Module, names: tuple[str, ...]):
        self.module, self.names = module, names
        self._rules: dict[tuple[int, ...], Grads | Affine] = {}

    def __call__(self, args: tuple, kwargs: dict, delta: torch.Tensor) -> dict[str, torch.Tensor]:
        """{name: [B, numel]} for the module's parameters."""
        rule = self.rule(args, kwargs, tuple(delta.shape))
        if isinstance(rule, Affine):  # base from one extra forward
            return rule.from_base(self._run(rule.unit, args, kwargs), delta)
        return rule(self.params(), args, kwargs, delta)

    def params(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self.module, n).detach() for n in self.names}

    def rule(self, args: tuple, kwargs: dict, out_shape: tuple[int, ...]) -> Grads | Affine:
        """The rule for outputs of ``out_shape`` [B, ...] (chosen on the first sample of ``args``)."""
        key = tuple(out_shape[1:])
        if key not in self._rules:
            self._rules[key] = self._choose(self.params(), args, kwargs, out_shape)
        return self._rules[key]

    def _run(self, params, args, kwargs) -> torch.Tensor:
        return functional_call(self.module, params, args, kwargs)

    def _choose(self, params, args, kwargs, out: tuple[int, ...]) -> Grads | Affine:
        one = tuple(a[:1] if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == out[0] else a
                    for a in args)
        gen = torch.Generator(device="cpu").manual_seed(0)
        probe = {n: (torch.rand(p.shape, generator=gen) + 0.5).to(p) for n, p in params.items()}
        with torch.no_grad():
            expected = self._run(probe, one, kwargs)
            shapes = {tuple(p.shape) for p in params.values()}
            if set(params) <= {"weight", "bias"} and "weight" in params and len(shapes) == 1:
                shape = shapes.pop()
                unit = {n: torch.ones_like(p) if n == "weight" else torch.zeros_like(p) for n, p in params.items()}
                base = self._run(unit, one, kwargs)
                for start in _placements(shape, out):
                    guess = base * _view(probe["weight"], start, len(out))
                    if "bias" in params:
                        guess = guess + _view(probe["bias"], start, len(out))
                    if _close(guess, expected):
                        return Affine(shape, start, unit)
            if len(params) == 1:
                (name, p), = params.items()
                base = self._run({name: torch.zeros_like(p)}, one, kwargs)
                for start in _placements(tuple(p.shape), out):
                    if _close(base + _view(probe[name], start, len(out)), expected):
                        return self._additive(name, tuple(p.shape), start)
        return self._vmap

    def _additive(self, name, shape, start) -> Grads:
        return lambda params, args, kwargs, delta: {name: _reduce(delta, shape, start)}

    def _vmap(self, params, args, kwargs, delta) -> dict[str, torch.Tensor]:
        batch = delta.shape[0]
        in_dims = tuple(0 if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == batch else None for a in args)

        def response(p, d, *sample):
            one = tuple(s.unsqueeze(0) if dim == 0 else s for s, dim in zip(sample, in_dims))
            return (self._run(p, one, kwargs) * d.unsqueeze(0)).sum()

        grads = vmap(grad(response), in_dims=(None, 0, *in_dims))(params, delta, *args)
        return {n: g.reshape(batch, -1) for n, g in grads.items()}


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(scale, 1e-30)))
