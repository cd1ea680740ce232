"""The spectral rule: per-example gradients of a Fourier layer's weights as outer products per mode.

A spectral convolution (neuraloperator's ``SpectralConv``, 0.3 and 2.x: the module calls its
``_contract(x_modes, weight, separable=...)`` on the retained Fourier modes of its input)
computes, per retained mode m, y_{o,m} = Σ_i x_{i,m} W_{i,o,m} (complex). The gradient of
sample b's ⟨y, δ⟩ w.r.t. the weight used is, per mode, the outer product conj(x_{b,i,m}) d_{b,o,m}
of the input's and the contraction-output gradient's Fourier coefficients (separable:
conj(x_{b,i,m}) d_{b,i,m}). A module without ``_contract`` whose forward runs an einsum of an
input and one of its parameters (AFNO's block-diagonal complex MLP) is recorded the same way, its
einsums as its contractions (:mod:`gradlake.grads.einsums`). Where the weight is a parameter (or a
complex view or all-covering slice of one) or a Tucker tensor of parameters (W = core ×_k U_k, as
tltorch's), each parameter's per-sample gradient is one einsum over the batch of x, d and the other
factors (conjugated), contracted pairwise; a spectral block's projection P_out G P_inᵀ is taken inside
that einsum, so its per-sample gradient is never formed. Other factorisations get theirs through
the (linear) backward of the weight's reconstruction, batched over samples. Parameters the
output reaches other than through the contraction (the bias) get theirs by one backward batched
over per-sample cotangents, which reaches only them. A :class:`Recording` of the module's forward
(its contractions run as one einsum on the weight's values) holds what both need: the capture
records the batch's own forward, so no extra forward or FFT is run; :func:`spectral_grads` (the
rule, and its check against the per-sample loop on two samples) records a rerun.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module

from gradlake.grads.einsums import Einsums, subscripts

MASKED_ELEMENTS = 1 << 24  # per chunk of per-sample cotangents [chunk, B, ...] for the direct parameters


def supported(module: nn.Module) -> bool:
    """Whether ``module`` contracts its Fourier modes through its own ``_contract`` function."""
    return callable(vars(module).get("_contract"))


_LETTERS, _RANKS = "abcdefgh", "ABCDEFGH"  # weight dims, Tucker ranks; "z" the batch, "y" / "x" the projections


def _operands(weight) -> tuple[torch.Tensor, str, list[tuple[torch.Tensor, str]]]:
    """The weight's values, their einsum subscripts, and the factors they are the einsum of: a
    tensor is its own; a Tucker tensor (a core and one [size, rank] factor per dim, as tltorch's)
    the core and its factors; any other factorisation its values (its parameters' gradients then
    come through the backward of its reconstruction)."""
    if torch.is_tensor(weight):
        return weight, _LETTERS[:weight.dim()], [(weight, _LETTERS[:weight.dim()])]
    w = weight.to_tensor()  # a tltorch factorised tensor
    sub = _LETTERS[:w.dim()]
    core, factors = getattr(weight, "core", None), list(getattr(weight, "factors", None) or ())
    if (torch.is_tensor(core) and len(factors) == core.dim() == w.dim()
            and all(torch.is_tensor(f) and f.dim() == 2 for f in factors)):
        ranks = _RANKS[:core.dim()]
        return w, sub, [(core, ranks), *[(f, sub[k] + ranks[k]) for k, f in enumerate(factors)]]
    return w, sub, [(w, sub)]


@dataclass(frozen=True)
class Call:
    """One contraction: input modes, output, the weight's factors with their graph to the leaves
    and their subscripts; the subscripts of the input and the output (batch "z")."""

    x: torch.Tensor
    out: torch.Tensor
    operands: list[tuple[torch.Tensor, str]]
    x_sub: str
    out_sub: str


def _contract(calls: list, x: torch.Tensor, weight, separable: bool = False, **_) -> torch.Tensor:
    w, sub, operands = _operands(weight)
    out = torch.einsum("bi...,i...->bi..." if separable else "bi...,io...->bo...", x, w.detach())
    if not out.requires_grad:
        out.requires_grad_()  # (an input that does not require grad: a leaf to differentiate to)
    modes = sub[1:] if separable else sub[2:]
    calls.append(Call(x.detach(), out, operands, "z" + sub[0] + modes, "z" + (sub if separable else sub[1:])))
    return out


class Recording:
    """The module's forward while open: its parameters swapped for leaves that require grad
    (``leaves``, from ``params``), each contraction recorded in ``calls``."""

    def __init__(self, module: nn.Module, params: dict[str, torch.Tensor]):
        self.module = module
        self.leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
        self.calls: list[Call] = []
        self._stack = contextlib.ExitStack()

    def open(self) -> None:
        self._stack.enter_context(_reparametrize_module(self.module, self.leaves))
        if supported(self.module):
            original = self.module._contract
            self.module._contract = partial(_contract, self.calls)
            self._stack.callback(setattr, self.module, "_contract", original)
        else:
            self._stack.enter_context(Einsums(self._leaf_of, self._einsum))
        self._stack.enter_context(torch.enable_grad())

    def _einsum(self, equation: str, operands: list, index: int) -> torch.Tensor:
        """An einsum of an input and a weight (:mod:`gradlake.grads.einsums`), recorded where it is a
        contraction the rule covers (else run as it is: its weight's gradient then comes as a direct one)."""
        weight, x = operands[index], operands[1 - index]
        subs = subscripts(equation, x, weight, index == 0)
        if subs is None:
            return torch.einsum(equation, *operands)
        out = torch.einsum(equation, *[o.detach() if i == index else o for i, o in enumerate(operands)])
        if not out.requires_grad:
            out.requires_grad_()
        self.calls.append(Call(x.detach(), out, [(weight, subs[1])], subs[0], subs[2]))
        return out

    def close(self) -> None:
        self._stack.close()

    def weight_grads(self, call: Call, d: torch.Tensor, project: dict | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """From one contraction's output gradient ``d``: ({name: [B, *shape]} per-sample gradients,
        {name: [B, k_out, k_in]} their projections P_out G P_inᵀ for the leaves in ``project``
        ({name: (P_out, P_in)}, a spectral block's factors), which are never formed in full).

        The gradient of ⟨out, d⟩ w.r.t. the weight W (complex: torch's convention) is, per sample,
        conj(x) ⊗ d; w.r.t. a factor of W = einsum(factors), the einsum of it with the other
        factors conjugated, all one einsum over the batch."""
        grads, projected, memo = {}, {}, {}
        ingredients = [(call.x.conj().resolve_conj(), call.x_sub), (d.to(call.x.dtype), call.out_sub)]
        conjugates = [(o.detach().conj().resolve_conj(), s) for o, s in call.operands] if len(call.operands) > 1 else []
        for i, (op, sub) in enumerate(call.operands):
            if not op.requires_grad:
                continue
            terms = [*ingredients, *(t for j, t in enumerate(conjugates) if j != i)]
            name = self._leaf_of(op)
            if project is not None and name in project and op.is_complex():
                p_out, p_in = project[name]
                out = "z" + ("y" if p_out is not None else sub[0])
                if p_out is not None:
                    terms.append((p_out.to(op.dtype), "y" + sub[0]))
                if p_in is None:
                    block = torch.view_as_real(_einsum(terms, out + sub[1:], memo)).reshape(d.shape[0], -1)
                else:
                    q = p_in.reshape(p_in.shape[0], *op.shape[1:], 2).contiguous()
                    terms.append((torch.view_as_complex(q).conj().resolve_conj(), "x" + sub[1:]))
                    block = _einsum(terms, out + "x", memo).real
                projected[name] = projected[name] + block if name in projected else block
                continue
            g = _einsum(terms, "z" + sub, memo)
            if name is not None:
                found = {name: g if op.dtype == g.dtype else g.to(op.dtype)}
            else:  # through the backward of the factor's construction from the leaves, batched over samples
                with torch.enable_grad():
                    found = torch.autograd.grad(op, list(self.leaves.values()), g.to(op.dtype), is_grads_batched=True,
                                                allow_unused=True, retain_graph=True)
                found = {n: pg for n, pg in zip(self.leaves, found) if pg is not None}
            for n, pg in found.items():
                grads[n] = grads[n] + pg if n in grads else pg
        return grads, projected

    def _leaf_of(self, op: torch.Tensor) -> str | None:
        """The leaf ``op`` is all of (itself, a complex view of a real [..., 2] one, an all-covering
        slice), or None."""
        for name, leaf in self.leaves.items():
            if op is leaf:
                return name
            if (op._base is leaf and op.data_ptr() == leaf.data_ptr() and op.is_contiguous()
                    and leaf.is_contiguous()
                    and (tuple(op.shape) == tuple(leaf.shape) if op.dtype == leaf.dtype
                         else op.is_complex() and tuple(torch.view_as_real(op).shape) == tuple(leaf.shape))):
                return name
        return None

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


_ORDERS: dict[tuple, list[tuple[tuple[int, ...], str]]] = {}


def _einsum(terms: list[tuple[torch.Tensor, str]], out: str, memo: dict) -> torch.Tensor:
    """The einsum of [(tensor, subscripts)] -> ``out``, contracted pairwise in a greedy order (the
    pair whose result most shrinks the terms first, as opt_einsum's greedy; cached per subscripts
    and shapes: no search per call); ``memo`` keeps the pairs' results for other einsums of the same
    tensors."""
    key = (tuple((s, tuple(t.shape)) for t, s in terms), out)
    if key not in _ORDERS:
        _ORDERS[key] = _greedy([s for _, s in terms], {c: n for t, s in terms for c, n in zip(s, t.shape)}, out)
    tensors = [t for t, _ in terms]
    for picked, equation in _ORDERS[key]:
        inputs = [tensors[k] for k in picked]
        step = (equation, *(id(t) for t in inputs))
        if step not in memo:
            memo[step] = (torch.einsum(equation, *inputs), inputs)  # (the inputs held: their ids stay theirs)
        tensors = [t for k, t in enumerate(tensors) if k not in picked] + [memo[step][0]]
    return tensors[0]


def _greedy(subs: list[str], sizes: dict[str, int], out: str) -> list[tuple[tuple[int, ...], str]]:
    def volume(sub: str) -> int:
        return math.prod(sizes[c] for c in sub)

    order = []
    while len(subs) > 1:
        candidates = []
        for i in range(len(subs)):
            for j in range(i + 1, len(subs)):
                keep = set(out).union(*[s for k, s in enumerate(subs) if k not in (i, j)])
                result = "".join(c for c in dict.fromkeys(subs[i] + subs[j]) if c in keep)
                size = math.prod(sizes[c] for c in result)
                candidates.append((size - volume(subs[i]) - volume(subs[j]), size, i, j, result))
        *_, i, j, result = min(candidates)
        order.append(((i, j), f"{subs[i]},{subs[j]}->{result}"))
        subs = [s for k, s in enumerate(subs) if k not in (i, j)] + [result]
    return order + ([((0,), f"{subs[0]}->{out}")] if subs[0] != out else [])  # (no identity einsum)


def _recorded(module: nn.Module, params: dict[str, torch.Tensor], args: tuple, kwargs: dict,
              pick: Callable) -> tuple[Recording, torch.Tensor]:
    record = Recording(module, params)
    record.open()
    try:
        return record, pick(module(*args, **kwargs))
    finally:
        record.close()


def records(module: nn.Module, params: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> bool:
    """Whether a recorded forward of ``module`` holds a contraction (a ``_contract``, or an einsum of an
    input and a parameter)."""
    return supported(module) or bool(_recorded(module, params, args, kwargs, lambda y: y)[0].calls)


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
    outs = [call.out for call in record.calls]
    with torch.enable_grad():
        found = torch.autograd.grad(inner(y, delta), outs, allow_unused=True, retain_graph=True)
    total = record.direct_grads(y, delta) if direct else {}
    for call, d in zip(record.calls, found):
        if d is not None:
            for name, g in record.weight_grads(call, d)[0].items():
                total[name] = total[name] + g if name in total else g
    return total
