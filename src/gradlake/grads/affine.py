"""The affine and additive rules: a module whose output is base(x) ⊙ weight + bias, or base(x) + p,
with its parameters broadcast along some output axes (see :mod:`gradlake.grads.module_rules`).

:func:`simple_rule` admits one only where it reproduces the module's output on one sample with
random parameter values, so it never rests on the module's class or parameter names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gradlake.grads.tensors import Grads, close

MAX_BIAS_RATIO = 16.0  # |bias| / |weight| up to which an affine module's grads come from its output


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
    weight: str = "weight"
    bias: str | None = None

    def from_base(self, base: torch.Tensor, delta: torch.Tensor) -> dict[str, torch.Tensor]:
        """{name: [B, numel]} from base and the output gradient."""
        out = {self.weight: _reduce(base.to(delta.dtype) * delta, self.shape, self.start)}
        if self.bias:
            out[self.bias] = _reduce(delta, self.shape, self.start)
        return out

    def invertible(self, params: dict[str, torch.Tensor]) -> bool:
        """Whether :meth:`from_output` is within float rounding of :meth:`from_base` for ``params``."""
        weight = params[self.weight].abs()
        ok = weight > 0
        if self.bias:
            ok &= params[self.bias].abs() <= MAX_BIAS_RATIO * weight
        return bool(ok.all())

    def from_output(self, output: torch.Tensor, delta: torch.Tensor,
                    params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{name: [B, numel]} from the module's output (base ⊙ weight + bias) and the output gradient."""
        weighted = _reduce(output.to(delta.dtype) * delta, self.shape, self.start)
        out = {}
        if self.bias:
            out[self.bias] = _reduce(delta, self.shape, self.start)
            weighted = weighted - params[self.bias].reshape(1, -1).to(delta.dtype) * out[self.bias]
        out[self.weight] = weighted / params[self.weight].reshape(1, -1).to(delta.dtype)
        return out


def simple_rule(run: Callable, params, one, kwargs, out: tuple[int, ...]) -> Affine | Grads | None:
    """The affine or additive rule, where it reproduces the module's output on one sample
    (``run(params, args, kwargs)``: the module with those parameter values)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    probe = {n: (torch.rand(p.shape, generator=gen) + 0.5).to(p) for n, p in params.items()}
    with torch.no_grad():
        expected = run(probe, one, kwargs)
        if not isinstance(expected, torch.Tensor):
            return None
        shapes = {tuple(p.shape) for p in params.values()}
        names = sorted(params, key=lambda n: n.rsplit(".", 1)[-1] != "weight")  # a "weight" first
        if len(params) <= 2 and len(shapes) == 1:
            shape = shapes.pop()
            for weight in names:
                bias = next((n for n in names if n != weight), None)
                unit = {n: torch.ones_like(p) if n == weight else torch.zeros_like(p) for n, p in params.items()}
                base = run(unit, one, kwargs)
                for start in _placements(shape, out):
                    guess = base * _view(probe[weight], start, len(out))
                    if bias:
                        guess = guess + _view(probe[bias], start, len(out))
                    if close(guess, expected):
                        return Affine(shape, start, unit, weight, bias)
        if len(params) == 1:
            (name, p), = params.items()
            base = run({name: torch.zeros_like(p)}, one, kwargs)
            for start in _placements(tuple(p.shape), out):
                if close(base + _view(probe[name], start, len(out)), expected):
                    return _additive(name, tuple(p.shape), start)
    return None


def _additive(name, shape, start) -> Grads:
    def _add(params, args, kwargs, delta, index):
        return {name: _reduce(delta, shape, start)}
    return _add
