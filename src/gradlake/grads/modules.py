"""Exact per-example gradients of one module's own parameters, from its input and output gradient.

Used for every parameter outside Linear/Conv layers. Six rules, the first that holds:

- *affine* (norms, layer scales): output = base(x) ⊙ weight + bias, with weight and bias
  of one shape S broadcast along some output axes (bias optional; any parameter names);
  base(x) is the module's own output with weight = 1 and bias = 0, and per-sample grads
  are Σ base ⊙ δ and Σ δ over the other axes. From the module's output y
  (:meth:`Affine.from_output`, no extra forward): Σ base ⊙ δ = (Σ y ⊙ δ − bias · Σ δ) / weight,
  used where |bias| <= 16 |weight| (so the result is within float rounding of Σ base ⊙ δ);
  otherwise base comes from one extra forward;
- *additive* (a learned embedding added to its input): output = base(x) + p, per-sample
  grad Σ δ over the axes p is broadcast along (no extra forward);
- *attention* (``nn.MultiheadAttention``, batch first, no masks): the module recomputed once
  for the batch with per-sample copies of its weights (batched matmuls, fused attention);
- *spectral* (a module contracting Fourier modes through its own ``_contract``, as
  neuraloperator's SpectralConv): outer products per mode (:mod:`gradlake.grads.spectral`),
  used where they match the loop on two samples;
- *vmap*: ``torch.func`` vmap over samples of grad of ⟨module(x_b), δ_b⟩ (any module that
  vmap can run; a module that writes per-sample values in place into tensors it makes, as
  AFNO's spectrum, runs with those tensors made per sample, where that equals the loop on
  two samples);
- *loop*: the same gradient by plain autograd, one sample at a time (modules vmap cannot
  run: data-dependent control flow). Slower; :func:`gradlake.grads.describe` lists the
  modules that take it.

A rule is used for a module only after it reproduced the module's output exactly on one
sample with random parameter values (affine, additive) or ran on one sample (vmap, loop),
checked once per module and output shape, so correctness never rests on the module's class
or parameter names. Complex parameters and outputs are real pairs: ⟨y, δ⟩ = Re Σ y conj(δ),
and a complex parameter's gradient is returned as (real, imaginary) pairs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from gradlake.errors import InputError
from gradlake.grads import spectral

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
        bias = params[self.bias].abs() if self.bias else torch.zeros_like(weight)
        return bool((bias <= MAX_BIAS_RATIO * weight).all() and (weight > 0).all())

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


def _batched(value, batch: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch


def parameter(module: nn.Module, name: str) -> nn.Parameter:
    """The parameter registered as ``name`` (a dotted path), as stored: unlike ``get_parameter``,
    also where the owner's attribute access returns a view of it (tltorch's complex factorised
    tensors store real [..., 2] parameters and return complex views)."""
    prefix, _, local = name.rpartition(".")
    return (module.get_submodule(prefix) if prefix else module)._parameters[local]


class ModuleGrads:
    """Per-sample gradients of some parameters of a module (its own, or its descendants' named
    by path); the rule is chosen once per output (index, shape)."""

    def __init__(self, module: nn.Module, names: tuple[str, ...], label: str = ""):
        self.module, self.names, self.label = module, names, label
        self._rules: dict[tuple, Grads | Affine] = {}
        self._per_sample: dict[tuple, bool] = {}  # input shape: whether per_sample_forward holds
        self.fallback: str | None = None  # why vmap could not run the module (the loop rule is used)
        self.direct: Grads | None = None  # spectral rule: the additive rule of its other parameter, if it holds
        self.fresh = False  # vmap rule: tensors the module makes are made per sample (_PerSampleFresh)

    def __call__(self, args: tuple, kwargs: dict, delta: torch.Tensor, index: int | None = None
                 ) -> dict[str, torch.Tensor]:
        """{name: [B, numel]} for the parameters, from the output gradient ``delta`` of output ``index``."""
        rule = self.rule(args, kwargs, delta, index)
        if isinstance(rule, Affine):  # base from one extra forward
            return rule.from_base(self._run(rule.unit, args, kwargs), delta)
        return rule(self.params(), args, kwargs, delta, index)

    def params(self) -> dict[str, torch.Tensor]:
        return {n: parameter(self.module, n).detach() for n in self.names}

    def rule(self, args: tuple, kwargs: dict, output: torch.Tensor, index: int | None = None) -> Grads | Affine:
        """The rule for output ``index`` shaped like ``output`` [B, ...] (chosen on the first sample)."""
        key = (index, tuple(output.shape[1:]), output.dtype)
        if key not in self._rules:
            self._rules[key] = self._choose(self.params(), args, kwargs, output, index)
        return self._rules[key]

    def path(self) -> str:
        """The rules in use: "affine", "additive", "attention", "vmap" and/or "loop"."""
        names = {"_vmap": "vmap", "_loop": "loop", "_add": "additive", "_attention": "attention",
                 "_spectral": "spectral"}
        found = {"affine" if isinstance(r, Affine) else names.get(getattr(r, "__name__", ""), "additive")
                 for r in self._rules.values()}
        return "+".join(sorted(found))

    def _run(self, params, args, kwargs):
        return functional_call(self.module, params, args, kwargs)

    def _choose(self, params, args, kwargs, output: torch.Tensor, index: int | None) -> Grads | Affine:
        batch = output.shape[0]
        one = tuple(a[:1] if _batched(a, batch) else a for a in args)
        one_kwargs = {k: v[:1] if _batched(v, batch) else v for k, v in kwargs.items()}
        out = tuple(output.shape)
        real = all(not p.is_complex() for p in params.values()) and not output.is_complex()
        if index is None and real:
            simple = self._simple(params, one, one_kwargs, out)
            if simple is not None:
                return simple
        probe = torch.zeros((1, *out[1:]), dtype=output.dtype, device=output.device)
        if index in (None, 0) and _attention_supported(self.module, args, kwargs):
            gen = torch.Generator(device="cpu").manual_seed(1)
            delta = torch.randn(probe.shape, generator=gen).to(probe)
            want = self._vmap(params, one, one_kwargs, delta, index)
            got = self._attention(params, one, one_kwargs, delta, index)
            if all(_close(got[n], want[n]) for n in want):
                return self._attention
        if spectral.supported(self.module):
            two = tuple(a[:2] if _batched(a, batch) else a for a in args)
            two_kwargs = {k: v[:2] if _batched(v, batch) else v for k, v in kwargs.items()}
            try:  # the bias: by the additive rule where it holds (its gradients then cost a sum)
                direct = spectral.direct_names(self.module, params, one, one_kwargs, lambda y: pick(y, index))
                additive = self._simple({n: params[n] for n in direct}, one, one_kwargs, out) \
                    if len(direct) == 1 and index is None and not output.is_complex() \
                    and not params[direct[0]].is_complex() else None
            except Exception:  # noqa: BLE001 - not the structure the rule expects (checked below)
                additive = None
            self.direct = None if isinstance(additive, Affine) else additive
            gen = torch.Generator(device="cpu").manual_seed(1)
            delta = torch.randn((min(batch, 2), *out[1:]), generator=gen).to(probe)
            want = self._loop(params, two, two_kwargs, delta, index)
            try:
                got = self._spectral(params, two, two_kwargs, delta, index)
            except Exception:  # noqa: BLE001 - not the structure the rule expects: the other rules
                got = None
            if got is not None and all(_close(got[n], want[n]) for n in want):
                return self._spectral
        try:
            self._vmap(params, one, one_kwargs, probe, index)
            return self._vmap
        except Exception as exc:  # noqa: BLE001 - any reason vmap cannot run the module: try the loop
            self.fallback = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        two = tuple(a[:2] if _batched(a, batch) else a for a in args)
        two_kwargs = {k: v[:2] if _batched(v, batch) else v for k, v in kwargs.items()}
        delta = torch.randn((min(batch, 2), *out[1:]), generator=torch.Generator().manual_seed(2)).to(probe)
        self.fresh = True
        try:  # in-place writes of per-sample values into tensors the module makes: made per sample
            got = self._vmap(params, two, two_kwargs, delta, index)
            want = self._loop(params, two, two_kwargs, delta, index)
            if all(_close(got[n], want[n]) for n in want):
                self.fallback = None
                return self._vmap
        except Exception:  # noqa: BLE001 - not what vmap lacked: the loop
            pass
        self.fresh = False
        try:
            self._loop(params, one, one_kwargs, probe, index)
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"model module {self.label!r} ({type(self.module).__name__}): per-sample gradients "
                             f"failed under vmap ({self.fallback}) and in a per-sample loop "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from exc
        return self._loop

    def _simple(self, params, one, kwargs, out: tuple[int, ...]) -> Affine | Grads | None:
        """The affine or additive rule, where it reproduces the module's output on one sample."""
        gen = torch.Generator(device="cpu").manual_seed(0)
        probe = {n: (torch.rand(p.shape, generator=gen) + 0.5).to(p) for n, p in params.items()}
        with torch.no_grad():
            expected = self._run(probe, one, kwargs)
            if not isinstance(expected, torch.Tensor):
                return None
            shapes = {tuple(p.shape) for p in params.values()}
            names = sorted(params, key=lambda n: n.rsplit(".", 1)[-1] != "weight")  # a "weight" first
            if len(params) <= 2 and len(shapes) == 1:
                shape = shapes.pop()
                for weight in names:
                    bias = next((n for n in names if n != weight), None)
                    unit = {n: torch.ones_like(p) if n == weight else torch.zeros_like(p) for n, p in params.items()}
                    base = self._run(unit, one, kwargs)
                    for start in _placements(shape, out):
                        guess = base * _view(probe[weight], start, len(out))
                        if bias:
                            guess = guess + _view(probe[bias], start, len(out))
                        if _close(guess, expected):
                            return Affine(shape, start, unit, weight, bias)
            if len(params) == 1:
                (name, p), = params.items()
                base = self._run({name: torch.zeros_like(p)}, one, kwargs)
                for start in _placements(tuple(p.shape), out):
                    if _close(base + _view(probe[name], start, len(out)), expected):
                        return self._additive(name, tuple(p.shape), start)
        return None

    def _additive(self, name, shape, start) -> Grads:
        def _add(params, args, kwargs, delta, index):
            return {name: _reduce(delta, shape, start)}
        return _add

    def _vmap(self, params, args, kwargs, delta, index) -> dict[str, torch.Tensor]:
        batch = delta.shape[0]
        keys = list(kwargs)
        leaves = [*args, *kwargs.values()]
        dims = [0 if _batched(a, batch) else None for a in leaves]

        def response(p, d, sample):
            full = [s.unsqueeze(0) if dim == 0 else s for s, dim in zip(sample, dims)]
            with _PerSampleFresh(d) if self.fresh else contextlib.nullcontext():
                out = self._run(p, tuple(full[:len(args)]), dict(zip(keys, full[len(args):])))
            return inner(pick(out, index), d.unsqueeze(0))

        grads = vmap(grad(response), in_dims=(None, 0, dims))(params, delta, leaves)
        return {n: flat(g, batch) for n, g in grads.items()}

    def per_sample_forward(self, args: tuple, kwargs: dict, batch: int
                           ) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """The module's output for the batch, run under vmap with a per-sample copy of each
        parameter ({name: [B, *shape]}, whose gradients in the batch's backward are the per-sample
        gradients), for a module on the vmap rule; None where the output is not one tensor equal to
        the module's own (checked once per input shape)."""
        leaves = [*args, *kwargs.values()]
        dims = [0 if _batched(a, batch) else None for a in leaves]
        if 0 not in dims:
            return None
        like = leaves[dims.index(0)]
        copies = {n: p.detach().requires_grad_().expand(batch, *p.shape) for n, p in self.params().items()}

        def run(p, sample):
            full = [s.unsqueeze(0) if dim == 0 else s for s, dim in zip(sample, dims)]
            with _PerSampleFresh(full[dims.index(0)]) if self.fresh else contextlib.nullcontext():
                out = self._run(p, tuple(full[:len(args)]), dict(zip(list(kwargs), full[len(args):])))
            return out.squeeze(0) if isinstance(out, torch.Tensor) and out.shape[:1] == (1,) else None

        key = (tuple(like.shape[1:]), like.dtype)
        if key not in self._per_sample:  # on copies of the inputs, which must stay unchanged (no in-place use)
            copied = [a.clone() if isinstance(a, torch.Tensor) else a for a in leaves]
            again = [a.clone() if isinstance(a, torch.Tensor) else a for a in leaves]
            try:
                with torch.no_grad():
                    got = vmap(run, in_dims=(0, dims))({n: c.detach() for n, c in copies.items()}, copied)
                    want = self._run(self.params(), tuple(again[:len(args)]), dict(zip(kwargs, again[len(args):])))
                self._per_sample[key] = _close(got, want) and all(
                    torch.equal(a, c) and torch.equal(a, g) for a, c, g in zip(leaves, copied, again)
                    if isinstance(a, torch.Tensor))
            except Exception:  # noqa: BLE001 - not one tensor per sample: the rule in backward
                self._per_sample[key] = False
        if not self._per_sample[key]:
            return None
        return vmap(run, in_dims=(0, dims))(copies, leaves), copies

    def _attention(self, params, args, kwargs, delta, index) -> dict[str, torch.Tensor]:
        """nn.MultiheadAttention recomputed once for the batch with per-sample copies of its weights
        (batched matmuls, fused attention): their gradients are the per-sample gradients."""
        module, batch = self.module, delta.shape[0]
        query, key, value = (list(args) + [kwargs.get(n) for n in ("query", "key", "value")[len(args):]])[:3]
        copies = {n: p.expand(batch, *p.shape).clone().requires_grad_() for n, p in params.items()}
        heads, dim = module.num_heads, module.embed_dim
        with torch.enable_grad():
            weights = copies["in_proj_weight"].chunk(3, dim=1)
            biases = copies["in_proj_bias"].chunk(3, dim=1) if "in_proj_bias" in copies else (None,) * 3
            projected = []
            for x, w, b in zip((query, key, value), weights, biases):
                y = x @ w.transpose(1, 2) + (0 if b is None else b[:, None, :])
                projected.append(y.view(batch, -1, heads, dim // heads).transpose(1, 2))
            attended = F.scaled_dot_product_attention(*projected).transpose(1, 2).reshape(batch, -1, dim)
            out = attended @ copies["out_proj.weight"].transpose(1, 2)
            if "out_proj.bias" in copies:
                out = out + copies["out_proj.bias"][:, None, :]
            grads = torch.autograd.grad(inner(out, delta), list(copies.values()), allow_unused=True)
        return {n: flat(torch.zeros_like(c) if g is None else g, batch) for (n, c), g in zip(copies.items(), grads)}

    def _spectral(self, params, args, kwargs, delta, index) -> dict[str, torch.Tensor]:
        grads = spectral.spectral_grads(self.module, params, args, kwargs, delta, lambda out: pick(out, index), inner,
                                        direct=self.direct is None)
        if self.direct is not None:
            grads.update(self.direct(params, args, kwargs, delta, index))
        return {n: flat(grads[n] if n in grads else torch.zeros((delta.shape[0], *p.shape), dtype=p.dtype,
                                                                 device=delta.device), delta.shape[0])
                for n, p in params.items()}

    def _loop(self, params, args, kwargs, delta, index) -> dict[str, torch.Tensor]:
        batch = delta.shape[0]
        rows: dict[str, list[torch.Tensor]] = {n: [] for n in params}
        with torch.enable_grad():
            for b in range(batch):
                leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
                # clones: the module may change its input in place, and the input is used again
                one = tuple(a[b:b + 1].clone() if _batched(a, batch) else a for a in args)
                one_kwargs = {k: v[b:b + 1].clone() if _batched(v, batch) else v for k, v in kwargs.items()}
                response = inner(pick(self._run(leaves, one, one_kwargs), index), delta[b:b + 1])
                grads = (torch.autograd.grad(response, list(leaves.values()), allow_unused=True)
                         if response.requires_grad else [None] * len(leaves))
                for (n, p), g in zip(leaves.items(), grads):
                    rows[n].append(torch.zeros_like(p) if g is None else g)
        return {n: flat(torch.stack(r), batch) for n, r in rows.items()}


class _PerSampleFresh(TorchFunctionMode):
    """Inside vmap: tensors made by factory functions (torch.zeros, ...) carry the samples' batch
    (a per-sample zero added), so per-sample values can be written into them in place."""

    FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.Tensor.new_zeros, torch.Tensor.new_ones,
                 torch.Tensor.new_empty, torch.Tensor.new_full}

    def __init__(self, like: torch.Tensor):
        super().__init__()
        self.zero = torch.zeros_like(like).sum()  # batched under vmap: one zero per sample

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.FACTORIES and isinstance(out, torch.Tensor) and (out.is_floating_point() or out.is_complex()):
            out = out + self.zero.to(out.dtype)
        return out


def _attention_supported(module: nn.Module, args: tuple, kwargs: dict) -> bool:
    """An nn.MultiheadAttention call that :meth:`ModuleGrads._attention` reproduces: batch first,
    one embedding size, no masks, no extra key/value biases, no dropout in use."""
    if not isinstance(module, nn.MultiheadAttention):
        return False
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    return (module.batch_first and module._qkv_same_embed_dim and module.bias_k is None
            and not module.add_zero_attn and not (module.training and module.dropout > 0)
            and len(args) + sum(n in kwargs for n in ("query", "key", "value")) == 3 and len(tensors) == len(args)
            and all(kwargs.get(n) is None for n in ("key_padding_mask", "attn_mask"))
            and not kwargs.get("is_causal", False) and not any(t.is_complex() for t in tensors))


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach(), b.detach()
    if a.shape != b.shape:
        return False
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(scale, 1e-30)))
