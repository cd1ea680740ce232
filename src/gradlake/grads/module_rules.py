"""Full per-example gradients of one module's own parameters, from its input and output gradient.

Used for every parameter outside Linear/Conv layers. Seven rules, the first that holds:

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
- *transposed* (``nn.ConvTranspose1d/2d/3d``, groups=1): the conv-style weight gradient with
  input and output swapped (:mod:`gradlake.grads.transposed`), used where it matches the loop
  on two samples;
- *spectral* (a module contracting Fourier modes through its own ``_contract``, as
  neuraloperator's SpectralConv, or running einsums of its input and a parameter): outer
  products per mode (:mod:`gradlake.grads.spectral`), used where they match the loop on two samples;
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

Here: :class:`ModuleGrads`, which chooses a module's rule and runs the vmap and loop rules; the
affine and additive rules are in :mod:`gradlake.grads.affine`, the attention rule in
:mod:`gradlake.grads.attention`, the transposed-conv one in :mod:`gradlake.grads.transposed`, the
spectral one in :mod:`gradlake.grads.spectral`.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.overrides import TorchFunctionMode

from gradlake.errors import InputError
from gradlake.grads import attention, spectral, transposed
from gradlake.grads.affine import Affine, simple_rule
from gradlake.grads.tensors import Grads, close, flat, inner, parameter, pick


def _batched(value, batch: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch


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
        """The rules in use: "affine", "additive", "attention", "transposed", "spectral", "vmap" and/or "loop"."""
        names = {"_vmap": "vmap", "_loop": "loop", "_add": "additive", "_attention": "attention",
                 "_spectral": "spectral", "_transposed": "transposed"}
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
            simple = simple_rule(self._run, params, one, one_kwargs, out)
            if simple is not None:
                return simple
        probe = torch.zeros((1, *out[1:]), dtype=output.dtype, device=output.device)
        if index in (None, 0) and attention.supported(self.module, args, kwargs):
            gen = torch.Generator(device="cpu").manual_seed(1)
            delta = torch.randn(probe.shape, generator=gen).to(probe)
            want = self._vmap(params, one, one_kwargs, delta, index)
            got = self._attention(params, one, one_kwargs, delta, index)
            if all(close(got[n], want[n]) for n in want):
                return self._attention
        if index is None and transposed.supported(self.module, args, kwargs) \
                and self._agrees(self._transposed, params, args, kwargs, output):
            return self._transposed
        if self._records(params, one, one_kwargs):
            direct = None
            try:  # the bias: by the additive rule where it holds (its gradients then cost a sum)
                direct = spectral.direct_names(self.module, params, one, one_kwargs, lambda y: pick(y, index))
                additive = simple_rule(self._run, {n: params[n] for n in direct}, one, one_kwargs, out) \
                    if len(direct) == 1 and index is None and not output.is_complex() \
                    and not params[direct[0]].is_complex() else None
            except Exception:  # noqa: BLE001 - not the structure the rule expects (checked below)
                additive = None
            self.direct = _none if direct == [] else None if isinstance(additive, Affine) else additive
            # (einsums alone: only where no parameter needs the batched backward of direct_grads)
            if (spectral.supported(self.module) or self.direct is not None) \
                    and self._agrees(self._spectral, params, args, kwargs, output, index):
                return self._spectral
            self.direct = None
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
            if all(close(got[n], want[n]) for n in want):
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

    def _records(self, params, args, kwargs) -> bool:
        try:
            return spectral.records(self.module, params, args, kwargs)
        except Exception:  # noqa: BLE001 - a forward the recording cannot run: the other rules
            return False

    def _agrees(self, rule: Grads, params, args, kwargs, output: torch.Tensor, index: int | None = None) -> bool:
        """Whether ``rule`` gives the per-sample loop's gradients on the batch's first two samples."""
        batch = output.shape[0]
        two = tuple(a[:2] if _batched(a, batch) else a for a in args)
        two_kwargs = {k: v[:2] if _batched(v, batch) else v for k, v in kwargs.items()}
        gen = torch.Generator(device="cpu").manual_seed(1)
        delta = torch.randn((min(batch, 2), *output.shape[1:]), generator=gen).to(output)
        want = self._loop(params, two, two_kwargs, delta, index)
        try:
            got = rule(params, two, two_kwargs, delta, index)
        except Exception:  # noqa: BLE001 - not the structure the rule expects: the other rules
            return False
        return all(close(got[n], want[n]) for n in want)

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
                self._per_sample[key] = close(got, want) and all(
                    torch.equal(a, c) and torch.equal(a, g) for a, c, g in zip(leaves, copied, again)
                    if isinstance(a, torch.Tensor))
            except Exception:  # noqa: BLE001 - not one tensor per sample: the rule in backward
                self._per_sample[key] = False
        if not self._per_sample[key]:
            return None
        return vmap(run, in_dims=(0, dims))(copies, leaves), copies

    def _attention(self, params, args, kwargs, delta, index) -> dict[str, torch.Tensor]:
        """The attention rule (:mod:`gradlake.grads.attention`)."""
        return attention.per_sample_grads(self.module, params, args, kwargs, delta)

    def _transposed(self, params, args, kwargs, delta, index) -> dict[str, torch.Tensor]:
        """The transposed-conv rule (:mod:`gradlake.grads.transposed`)."""
        return transposed.per_sample_grads(self.module, params, args, kwargs, delta)

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


def _none(params, args, kwargs, delta, index) -> dict[str, torch.Tensor]:
    """The spectral rule's direct part where no parameter has one."""
    return {}


class _PerSampleFresh(TorchFunctionMode):
    """Inside vmap: tensors made by factory functions (torch.zeros, ...) carry the samples' batch
    (a per-sample zero added), so per-sample values can be written into them in place."""

    FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.Tensor.new_zeros, torch.Tensor.new_ones,
                 torch.Tensor.new_empty, torch.Tensor.new_full}

    def __init__(self, like: torch.Tensor):
        super().__init__()
        self.zero = torch.zeros_like(like.reshape(-1)[:1]).sum()  # batched under vmap: one zero per sample

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.FACTORIES and isinstance(out, torch.Tensor) and (out.is_floating_point() or out.is_complex()):
            out = out + self.zero.to(out.dtype)
        return out
