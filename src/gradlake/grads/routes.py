"""Which modules' hooks cover which parameters of a model, found by a dry run and checked.

Before the first batch of a model (and input shape), a dry run (:func:`routes`) records
which modules are called on batched inputs: a parameter whose module is never called that
way (a factorised weight held in a submodule, a layer applied to a parameter) is covered
by the rule of its nearest ancestor that is, and projected by its block's own factors.


The routes are then checked (:func:`verify`): the capture of two samples against the
projection of their per-sample gradients by plain autograd, before any batch is captured.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.func import functional_call

from gradlake.errors import InputError
from gradlake.grads.capture_plan import Plan, RuledModule
from gradlake.grads.tensors import flat, inner, parameter
from gradlake.grads.projector import Projector

log = logging.getLogger(__name__)

# The capture of two samples (float32, one cotangent): (routes, x, cot) -> φ [2, k]
Check = Callable[["Routes", torch.Tensor, torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def frozen(model: nn.Module, requires_grad: bool = False) -> Iterator[None]:
    """Parameters do not require grad (or all do) inside the block (restored after); no fused
    attention fast paths, which skip the submodules of nn.MultiheadAttention and nn.Transformer*."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        for p, _ in saved:
            p.requires_grad_(requires_grad)
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for p, flag in saved:
            p.requires_grad_(flag)


DRY_BATCH = 7  # samples in the dry run: a size unlikely to be any other dimension of a layer's input


@dataclass(frozen=True)
class Routes:
    """How the hooks cover a model's parameters for one input shape (module names only)."""

    reached: frozenset[str]  # planned modules whose hooks capture their own parameters
    claims: tuple[tuple[str, tuple[str, ...]], ...]  # (ancestor, qualified parameter names it covers)
    expanded: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (container, its parameters given per-sample copies)
    grouped: frozenset[str] = frozenset()  # reached modules called on [batch * m, ...] rows, m per sample

    def ruled(self, model_plan: Plan, model: nn.Module) -> tuple[RuledModule, ...]:
        """The ruled modules of the plan that were reached, with the claimed parameters added."""
        claims = dict(self.claims)
        expanded = dict(self.expanded)
        entries = []
        for entry in model_plan.ruled:
            if entry.name in self.reached and entry.name not in expanded:
                extra = claims.pop(entry.name, ())
                entries.append(RuledModule(entry.name, entry.module, entry.params + _local(entry.name, extra)))
        for name, params in claims.items():
            entries.append(RuledModule(name, model.get_submodule(name), _local(name, params)))
        return tuple(entries)


def _local(ancestor: str, names: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    return tuple((q, q[len(ancestor) + 1:] if ancestor else q) for q in names)


_ROUTES: weakref.WeakKeyDictionary[nn.Module, dict[tuple, Routes]] = weakref.WeakKeyDictionary()


def routes(model: nn.Module, model_plan: Plan, inputs: torch.Tensor, projector: Projector | None = None,
           check: Check | None = None) -> Routes:
    """How the capture covers ``model`` for inputs shaped like ``inputs`` (cached per model and shape).

    Plain autograd on two samples, one at a time, gives reference per-sample gradients (and
    the parameters the output depends on); a forward on copies of sample 0 (no grad) records
    which planned modules are called on batched inputs: parameters of the others are claimed
    by their nearest such ancestor. A module called on [batch * m, ...] rows (windows, tokens
    flattened sample-major) keeps its own path, its row gradients summed per sample. With
    ``projector`` and ``check`` (the capture), the capture of the two samples is then checked against
    the projected reference (:func:`verify`); if that fails with such row modules, they are handed to their
    callers and the check repeated.
    """
    key = (tuple(inputs.shape[1:]), inputs.dtype, str(inputs.device), tuple(n for n, _ in model_plan.parameters))
    cached = _ROUTES.setdefault(model, {})
    if key in cached:
        return cached[key]
    x = _pair(inputs)
    with torch.no_grad(), frozen(model):
        out = model(x)
    if not isinstance(out, torch.Tensor) or out.shape[:1] != x.shape[:1]:
        raise InputError("grads model: the model must return one tensor with the batch on dimension 0")
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype).to(out.device)
    params = dict(model.named_parameters())
    reference = [_sample_grads(model, list(params.values()), x[b:b + 1], cot[b:b + 1]) for b in range(2)]
    used = {n for i, n in enumerate(params) if any(g[i] is not None for g in reference)}
    if not used:
        raise InputError("grads model: the model output does not depend on any of its parameters")
    called: set[str] = set()
    unbatched: set[str] = set()
    grouped: set[str] = set()  # called on [batch * m, ...] (e.g. windows): rows summed per sample
    convs = {layer.name for layer in model_plan.layers if layer.conv_dims}

    def record(name, module, args, kwargs, output):
        called.add(name)
        inputs_lead = [a.shape[0] for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim()]
        outputs = list(output) if isinstance(output, (tuple, list)) else [output]
        outputs_lead = [o.shape[0] if isinstance(o, torch.Tensor) and o.dim() else None
                        for o in outputs if o is not None]
        if DRY_BATCH in inputs_lead and all(n == DRY_BATCH for n in outputs_lead):
            return
        rows = outputs_lead[0] if outputs_lead else None
        if (rows and rows % DRY_BATCH == 0 and rows in inputs_lead and name not in convs
                and all(n == rows for n in outputs_lead)):
            grouped.add(name)
        else:
            unbatched.add(name)

    handles = [m.register_forward_hook(partial(record, n), with_kwargs=True) for n, m in model.named_modules()]
    try:
        with torch.no_grad(), frozen(model):
            model(inputs[:1].expand(DRY_BATCH, *inputs.shape[1:]).clone())
    finally:
        for handle in handles:
            handle.remove()
    rows = None
    if check is not None:
        rows = torch.stack([torch.cat([flat(torch.zeros_like(p) if g is None else g, 1)[0]
                                       for p, g in zip(params.values(), grads)]) for grads in reference])
    reference = dict(zip(params, zip(*reference)))
    result = _assemble(model, model_plan, called - unbatched, used, x, cot, reference, grouped)
    if check is not None:
        try:
            verify(model, model_plan, result, x, cot, rows, projector, check)
        except InputError:
            if not result.grouped:
                raise
            # modules on [batch * m, ...] whose rows are not per-sample: their callers cover them
            result = _assemble(model, model_plan, called - unbatched - grouped, used, x, cot, reference, set())
            verify(model, model_plan, result, x, cot, rows, projector, check)
    for ancestor, qualified in result.claims:
        log.info("grads: module %r covers %s (their own modules are not called on batched inputs)",
                 ancestor or "<model>", ", ".join(qualified))
    cached[key] = result
    return result


def _assemble(model, model_plan: Plan, reached: set[str], used: set[str], x, cot, reference, grouped) -> Routes:
    """Routes from the modules reached on batched inputs: the others' parameters claimed by ancestors."""
    entries = [(layer.name, (layer.weight, layer.bias)) for layer in model_plan.layers]
    entries += [(entry.name, tuple(q for q, _ in entry.params)) for entry in model_plan.ruled]
    claims: dict[str, list[str]] = {}
    for name, qualified in entries:
        missing = [q for q in qualified if q in used]
        if name in reached or not missing:
            continue
        parts = name.split(".") if name else []
        ancestor = next(".".join(parts[:i]) for i in range(len(parts) - 1, -1, -1) if ".".join(parts[:i]) in reached)
        claims.setdefault(ancestor, []).extend(missing)
    for ancestor in claims:
        if any(layer.name == ancestor for layer in model_plan.layers):
            raise InputError(f"model module {ancestor!r}: a Linear/Conv layer whose forward uses parameters "
                             f"of its submodules ({', '.join(claims[ancestor])}) is not supported")
    expandable = _expandable(model, model_plan, reached, claims, x, cot, reference)
    names = {n for n, _ in entries}
    return Routes(frozenset(names & reached), tuple((a, tuple(q)) for a, q in claims.items()), expandable,
                  frozenset(names & reached & grouped))


def _sample_grads(model: nn.Module, params: list[torch.Tensor], x: torch.Tensor, cot: torch.Tensor) -> tuple:
    """Gradients of ⟨model(x), cot⟩ w.r.t. ``params`` by plain autograd (None: not used)."""
    with frozen(model, requires_grad=True), torch.enable_grad():
        out = model(x)
        if not out.requires_grad:
            raise InputError("grads model: the model output does not depend on any of its parameters")
        try:
            grads = torch.autograd.grad(inner(out, cot), params, allow_unused=True)
        except RuntimeError as exc:
            raise InputError(f"grads model: backward through the model fails, as it would in a training "
                             f"step: {str(exc).splitlines()[0][:200]}") from exc
    return tuple(None if g is None else g.detach() for g in grads)


def _batched(value, batch: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch


def _pair(inputs: torch.Tensor) -> torch.Tensor:
    """Two samples for the checks: the batch's first two, or the first and a variation of it."""
    return inputs[:2] if inputs.shape[0] >= 2 else torch.cat([inputs, 1.5 * inputs.roll(1, -1) - 0.1])


def per_sample_copies(model: nn.Module, names, batch: int) -> dict[str, torch.Tensor]:
    """A per-sample copy [batch, ...] of each [1, ...] parameter, a leaf that requires grad."""
    return {q: parameter(model, q).detach().expand(batch, *parameter(model, q).shape[1:]).clone()
            .requires_grad_() for q in names}


def _expandable(model: nn.Module, model_plan: Plan, reached, claims, x: torch.Tensor, cot: torch.Tensor,
                reference: dict[str, tuple]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Containers (class tokens, positional embeddings on a model or encoder) whose own parameters
    all have a leading 1 that broadcasts over the batch: their per-sample gradients come from the
    batched backward through per-sample copies [B, ...] of them, instead of a vmap over the whole
    container. Used where, on the two samples ``x``, the copies give the same output and the same
    per-sample gradients as the ``reference`` (autograd, one sample at a time), and where no ruled
    module encloses the container (its rule reruns it on single samples, where [B, ...] copies
    would not fit, as in ReFNO's spectral filters inside the model that owns the positional embedding)."""
    found = []
    for entry in model_plan.ruled:
        params = [parameter(entry.module, local) for _, local in entry.params]
        if (entry.name in reached and entry.name not in claims and any(True for _ in entry.module.children())
                and all("." not in local for _, local in entry.params)
                and all(p.dim() >= 1 and p.shape[0] == 1 for p in params)):
            found.append((entry.name, tuple(q for q, _ in entry.params)))
    ruled = ({entry.name for entry in model_plan.ruled if entry.name in reached} | set(claims)) - {n for n, _ in found}
    found = [(name, qs) for name, qs in found
             if not any(r != name and (not r or name.startswith(f"{r}.")) for r in ruled)]
    if not found:
        return ()
    names = [q for _, qs in found for q in qs]
    with torch.no_grad(), frozen(model):
        plain = model(x)
    copies = per_sample_copies(model, names, 2)
    try:
        with frozen(model), torch.enable_grad():
            out = functional_call(model, copies, (x,))
            if out.shape != plain.shape or not torch.allclose(out, plain, rtol=1e-5,
                                                               atol=1e-6 * float(plain.abs().max())):
                return ()
            got = torch.autograd.grad(inner(out, cot), list(copies.values()), allow_unused=True)
    except RuntimeError:  # the parameters are not used in a way that broadcasts over the batch
        return ()
    for name, g in zip(names, got):
        p = parameter(model, name)
        for b in range(2):
            want = reference[name][b]
            want = torch.zeros_like(p) if want is None else want
            have = torch.zeros_like(p) if g is None else g[b:b + 1]
            if not torch.allclose(have, want, rtol=1e-4, atol=1e-6 * max(float(want.abs().max()), 1e-30)):
                return ()
    return tuple(found)


VERIFY_TOLERANCE = 1e-3  # relative, per parameter block (float32 summation order differs)


def verify(model: nn.Module, model_plan: Plan, covered: Routes, x: torch.Tensor, cot: torch.Tensor,
           grads: torch.Tensor, projector: Projector, check: Check) -> None:
    """The capture ``check`` of samples ``x`` (float32, cotangent ``cot``) against ``projector.apply`` of
    their per-sample gradients ``grads`` [B, p] by plain autograd; InputError naming every parameter
    whose block differs (a parameter used outside its module's forward, a layer whose input
    mixes samples, ...), so such a model is refused before any batch instead of given wrong numbers."""
    phi = check(covered, x, cot)
    expected = projector.apply(model, grads)
    scale = float(expected.norm())
    wrong = []
    for block in model_plan.layout(projector).blocks:
        got, want = (t[:, block.offset:block.offset + block.k] for t in (phi, expected))
        error = float((got - want).norm())
        if error > VERIFY_TOLERANCE * float(want.norm()) + 1e-6 * scale:
            wrong.append(f"{block.name} (relative error {error / max(float(want.norm()), 1e-30):.2g})")
    if wrong:
        raise InputError("grads model: the captured gradients of these parameters differ from autograd's, "
                         "so gradlake.grads cannot capture this model (is a parameter used outside its "
                         "module's forward, does a layer mix samples, or does the model change between "
                         "calls: dropout or batch statistics in training mode?): " + ", ".join(wrong[:8])
                         + (f" and {len(wrong) - 8} more" if len(wrong) > 8 else ""))

