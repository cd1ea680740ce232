"""The hooks of one batch's capture: projected inputs in forward, per-example blocks in backward.

Parameters are frozen while capturing, so backward propagates activation gradients only
(no weight-gradient GEMMs). Forward hooks on every module that owns parameters:

- a Linear / Conv layer projects its input, ã = P_in a — at once, or in backward where the
  input is the smaller of the two to hold — and hooks its output; in backward, with δ the
  output gradient, the per-example block is Σ_positions (P_out δ) ⊗ ã and the bias block
  Σ_positions P_out δ (:mod:`gradlake.grads.kron`);
- any other module (a ruled one) gets the full per-example gradient of its own parameters by the
  verified rules of :mod:`gradlake.grads.module_rules`, then a dense projection (a spectral
  weight's: P_out ⊗ P_in). A spectral convolution's forward is recorded for the
  ``spectral`` rule (:mod:`gradlake.grads.spectral`: its weights' blocks come from the
  gradients of its contractions' outputs, the rest from its output gradient). An affine
  module (a norm: output = base ⊙ weight + bias) keeps its output (which the next op
  usually saves anyway) and gets them from it without an extra forward; other modules
  keep their input for the rule. A module on the vmap rule whose parameters are all its
  own runs under vmap with per-sample copies of them, whose gradients come out of the
  batch's own backward. A module returning a tuple is followed through each of its tensor
  outputs (the contributions add up: the gradient is linear in δ).

A module output that does not require grad (the first layer's: inputs never require grad)
is replaced by (a copy of) a fresh leaf and backward stops there, so no gradient w.r.t.
the model input is ever computed. The batch's forward and backward passes:
:mod:`gradlake.grads.capture`.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterator
from functools import partial

import torch
from torch import nn

from gradlake.errors import GradlakeError
from gradlake.grads import kron, spectral
from gradlake.grads.affine import Affine
from gradlake.grads.capture_plan import Layer, Plan, RuledModule
from gradlake.grads.module_rules import ModuleGrads
from gradlake.grads.projector import Projector
from gradlake.grads.tensors import flat


class BatchHooks:
    """Hooks for one batch: projected inputs in forward, per-example blocks in backward, written into
    ``phi`` [slots, B, k] at the backward pass ``slot`` by :meth:`flush`."""

    def __init__(self, model_plan: Plan, ruled: tuple[RuledModule, ...], reached: frozenset[str],
                 projector: Projector, batch: int, device: torch.device, dtype: torch.dtype):
        self.plan, self.projector, self.batch, self.device, self.dtype = model_plan, projector, batch, device, dtype
        self.layers = tuple(layer for layer in model_plan.layers if layer.name in reached)
        self.ruled = ruled
        self.layer_of = {n: layer for layer in model_plan.layers for n in (layer.weight, layer.bias) if n}
        layout = model_plan.layout(projector)
        self.layout = layout.blocks
        self.blocks = {block.name: block for block in layout.blocks}
        self.offsets = layout.offsets()
        factors = {block.name: block.factors for block in layout.blocks}
        self.rows_in = {layer.name: factors[layer.weight]["k_in"] for layer in model_plan.layers}
        self.slots = 1
        self.k = sum(k for _, k in self.offsets.values())
        self.roots: list[torch.Tensor] = []
        self.phi: torch.Tensor | None = None
        self.parts: dict[str, torch.Tensor] = {}  # the blocks of the backward pass under way
        self.slot = 0
        self.active = True
        self._identity: dict[int, torch.Tensor] = {}
        self._factors: dict[tuple, torch.Tensor | None] = {}
        self._recording: spectral.Recording | None = None
        self.copies: list[tuple[RuledModule, str, torch.Tensor]] = []  # per-sample parameter copies [B, ...]
        # the module of the last per-sample forward and its output (a parent returning that output as
        # its own is still hooked)
        self._forwarded: tuple[RuledModule, torch.Tensor] | None = None
        self._handles: list = []  # of the module hooks and the tensor hooks, removed when the capture ends

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        handles = self._handles
        with contextlib.ExitStack() as stack:
            for layer in self.layers:
                handles.append(layer.module.register_forward_hook(partial(self._layer_forward, layer)))
            for entry in self.ruled:
                if spectral.supported(entry.module) or "spectral" in module_grads(entry).path().split("+"):
                    handles.append(entry.module.register_forward_pre_hook(partial(self._spectral_forward, entry)))
                handles.append(entry.module.register_forward_hook(partial(self._ruled_forward, entry),
                                                                  with_kwargs=True))
                if module_grads(entry).path() == "vmap" and {local for _, local in entry.params} == {
                        n for n, _ in entry.module.named_parameters()}:
                    stack.enter_context(_forward_replaced(entry.module, partial(
                        self._per_sample_forward, entry, entry.module.forward)))
            stack.callback(self._remove_handles)
            yield

    def _remove_handles(self) -> None:
        """Removes the module hooks and the hooks on the batch's tensors: a tensor hook holds what
        its backward needs, often that tensor itself (a cycle through the tensor's hooks that
        Python's collector does not see, keeping the batch's whole graph alive)."""
        while self._handles:
            self._handles.pop().remove()

    def _on_grad(self, tensor: torch.Tensor, hook: Callable) -> None:
        self._handles.append(tensor.register_hook(hook))

    def _factor(self, name: str, shape, role: str, dim: int, rows: int | None = None) -> torch.Tensor | None:
        key = (name, role, dim, rows)  # (a layer's shape is fixed within a capture)
        if key not in self._factors:
            self._factors[key] = self.projector.factor(name, shape, role, dim, self.device, self.dtype, rows)
        return self._factors[key]

    def _track(self, name: str, output) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):
            raise GradlakeError(f"module {name!r} returned {type(output).__name__}; gradlake.grads "
                                "captures modules that return one tensor")
        if output.requires_grad:
            return output
        leaf = output.detach().requires_grad_()
        self.roots.append(leaf)
        return leaf.clone()  # not a leaf itself, so later in-place ops stay allowed

    def _check_batch(self, name: str, x: torch.Tensor, grouped: bool = False) -> None:
        if x.dim() < 2 or (x.shape[0] % self.batch if grouped else x.shape[0] != self.batch):
            raise GradlakeError(f"module {name!r} got input {list(x.shape)}; gradlake.grads needs the "
                                f"batch of {self.batch} samples on dimension 0 of every layer's input")

    # Linear and Conv layers -------------------------------------------------------------
    def _layer_forward(self, layer: Layer, module: nn.Module, args, output):
        if not self.active:
            return None
        a = args[0]
        self._check_batch(layer.name, a, grouped=not layer.conv_dims)  # Linear rows: reshaped per sample
        out = self._track(layer.name, output)
        rows = self.rows_in[layer.name]
        sample = math.prod(a.shape[1:])
        positions = math.prod(output.shape[2:]) if layer.conv_dims else sample // layer.d_in
        # Keep whichever is smaller until backward: the input (projected there, as on thin
        # convs where k_in > C_in) or its projection. Autograd keeps neither (frozen weights).
        if sample <= rows * positions:
            held = {"input": a, "version": a._version}
        else:
            held = {"projected": self._project_input(layer, a.to(self.dtype))}
        self._on_grad(out, partial(self._layer_backward, layer, held))
        return out

    def _project_input(self, layer: Layer, a: torch.Tensor) -> torch.Tensor:
        return kron.project_input(layer, a, self.batch, layer.input_split(self.projector),
                                  partial(self._factor, layer.name, layer.module.weight.shape), self._eye)

    def _eye(self, n: int) -> torch.Tensor:
        if n not in self._identity:
            self._identity[n] = torch.eye(n, device=self.device, dtype=self.dtype)
        return self._identity[n]

    def _layer_backward(self, layer: Layer, held: dict, delta: torch.Tensor) -> None:
        if "projected" not in held:
            a = held.pop("input")
            if a._version != held["version"]:
                raise GradlakeError(f"the input of layer {layer.name!r} was modified in place after the "
                                    "layer used it; gradlake.grads needs it unchanged until backward")
            held["projected"] = self._project_input(layer, a.to(self.dtype))
        projected = held["projected"]
        if self.slot == self.slots - 1:
            held.clear()  # last backward pass: free it now, not when the graph goes
        p_out = self._factor(layer.name, layer.module.weight.shape, "out", layer.d_out)
        block, bias = kron.blocks(layer, delta.to(self.dtype), projected, self.batch, p_out)
        self._add(layer.weight, block)
        if layer.bias:
            self._add(layer.bias, bias)

    def _add(self, name: str, block: torch.Tensor) -> None:
        """A parameter's block of this backward pass (more than one: their sum), into φ at :meth:`flush`."""
        block = block.reshape(self.batch, self.offsets[name][1]).to(self.phi.dtype)
        self.parts[name] = self.parts[name] + block if name in self.parts else block

    def flush(self) -> None:
        """φ[slot] from the blocks of this backward pass, one copy in the layout's order (zeros where none came)."""
        found = [self.parts.pop(block.name, None) for block in self.layout]
        zeros = self.phi.new_zeros(self.batch, max((b.k for b, f in zip(self.layout, found) if f is None), default=0))
        torch.cat([zeros[:, :b.k] if f is None else f for b, f in zip(self.layout, found)], dim=1,
                  out=self.phi[self.slot])

    # Every other module with parameters ---------------------------------------------------
    def _spectral_forward(self, entry: RuledModule, module: nn.Module, args) -> None:
        """Records the forward of a module with a spectral contraction (:mod:`gradlake.grads.spectral`),
        once the spectral rule holds for it (before: its own forward, the rule then reruns it)."""
        if self.active and "spectral" in module_grads(entry).path().split("+"):
            self._recording = spectral.Recording(module, module_grads(entry).params())
            self._recording.open()

    def _per_sample_forward(self, entry: RuledModule, forward, *args, **kwargs):
        """A module on the vmap rule run with per-sample copies of its parameters (their gradients
        come from the batch's own backward: no rerun), where that gives its own output."""
        if not self.active:
            return forward(*args, **kwargs)
        self.active = False  # its own (and its children's) hooks stay quiet inside
        try:
            found = module_grads(entry).per_sample_forward(args, kwargs, self.batch)
        finally:
            self.active = True
        if found is None:
            return forward(*args, **kwargs)
        output, copies = found
        self._forwarded = (entry, output)
        self.copies.extend((entry, local, copy) for local, copy in copies.items())
        return output

    def _ruled_forward(self, entry: RuledModule, module: nn.Module, args, kwargs, output):
        if not self.active or (self._forwarded is not None and self._forwarded[0] is entry
                                and output is self._forwarded[1]):
            return None
        record, self._recording = self._recording, None
        if record is not None:
            record.close()
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        grads = module_grads(entry)
        held = {"args": args, "kwargs": kwargs, "versions": [t._version for t in tensors]}
        outputs = [output] if isinstance(output, torch.Tensor) else list(output)
        followed = [i for i, o in enumerate(outputs) if isinstance(o, torch.Tensor)
                    and (o.is_floating_point() or o.is_complex())]
        single = isinstance(output, torch.Tensor)
        self.active = False  # the rule's own runs of the module (once per output shape) stay unhooked
        try:
            rules = {i: grads.rule(args, kwargs, outputs[i], None if single else i) for i in followed}
        finally:
            self.active = True
        if single and isinstance(rules[0], Affine) and rules[0].invertible(grads.params()):
            held.update(affine=rules[0], output=output, version=output._version)
        if single and record is not None and getattr(rules[0], "__name__", "") == "_spectral":
            held.update(record=record, output=output)  # the weights' gradients from the recorded contractions
            for call in record.calls:
                if call.out.grad_fn is None:
                    self.roots.append(call.out)  # (an input that does not require grad)
                self._on_grad(call.out, partial(self._spectral_backward, entry, record, call))
        for i in followed:
            outputs[i] = self._track(entry.name, outputs[i])
            self._on_grad(outputs[i], partial(self._ruled_backward, entry, held, None if single else i))
        if single:
            return outputs[0]
        return type(output)(*outputs) if hasattr(output, "_fields") else type(output)(outputs)

    def _spectral_backward(self, entry: RuledModule, record, call, d: torch.Tensor) -> None:
        project = {local: tuple(self.projector.factor(qualified, self.blocks[qualified].shape, role,
                                                      self.blocks[qualified].factors[f"d_{role}"], self.device,
                                                      torch.float32) for role in ("out", "in"))
                   for qualified, local in entry.params if self.blocks[qualified].path == "spectral"}
        grads, projected = record.weight_grads(call, d, project)
        for qualified, local in entry.params:
            if local in projected:
                self._add(qualified, projected[local])
        self.add_per_sample(entry, {n: flat(g, self.batch) for n, g in grads.items()})

    def _ruled_backward(self, entry: RuledModule, held: dict, index: int | None, delta: torch.Tensor) -> None:
        output = held.get("output")
        last = index is None and self.slot == self.slots - 1  # (tuple outputs share what is held)
        if "record" in held:  # the other parameters (the bias) here, the weights' in _spectral_backward
            if held.get("busy"):  # this hook again, inside the backward below
                return
            additive = module_grads(entry).direct
            if additive is not None:
                self.add_per_sample(entry, additive({}, (), {}, _full(delta), None))
                return
            held["busy"] = True
            try:
                grads = held["record"].direct_grads(output, _full(delta))
            finally:
                held["busy"] = False
            self.add_per_sample(entry, {n: flat(g, self.batch) for n, g in grads.items()})
            return
        if output is not None and output._version == held["version"]:  # (else changed in place since)
            params = module_grads(entry).params()
            per_sample = held["affine"].from_output(output.detach(), _full(delta), params)
            if last:
                held.clear()
            self.add_per_sample(entry, per_sample)
            return
        args, kwargs = held["args"], held["kwargs"]
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if [t._version for t in tensors] != held["versions"]:
            raise GradlakeError(f"an input of module {entry.name!r} was modified in place after the module "
                                "used it; gradlake.grads needs it unchanged until backward")
        args = tuple(_full(a.detach()) if isinstance(a, torch.Tensor) else a for a in args)
        kwargs = {k: _full(v.detach()) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        self.active = False  # the module's own (and its children's) hooks stay quiet
        try:
            per_sample = module_grads(entry)(args, kwargs, _full(delta), index)
        finally:
            self.active = True
        if last:
            held.clear()
        self.add_per_sample(entry, per_sample)

    def add_per_sample(self, entry: RuledModule, per_sample: dict[str, torch.Tensor]) -> None:
        """Projection of each parameter's full [B, numel] per-sample gradient into φ, by its block's factors."""
        for qualified, local in entry.params:
            if local not in per_sample:  # (a rule giving some parameters' contributions at a time)
                continue
            g = per_sample[local].float()
            if g.shape[0] != self.batch:  # a module on [batch * m, ...] rows: sum each sample's rows
                g = g.reshape(self.batch, -1, g.shape[1]).sum(dim=1)
            block = self.blocks[qualified]
            if block.path == "exact":
                self.add_dense(qualified, g)
                continue
            if block.path == "spectral":
                d_out, d_in = block.factors["d_out"], block.factors["d_in"]
                g = g.reshape(self.batch, d_out, d_in)
                p_out, p_in = (self.projector.factor(qualified, block.shape, role, dim, self.device, torch.float32)
                               for role, dim in (("out", d_out), ("in", d_in)))
                g = g if p_out is None else p_out @ g
                self._add(qualified, g if p_in is None else g @ p_in.T)
                continue
            # a layer not called on batched inputs: projected here
            self._add(qualified, kron.project_per_sample(self.layer_of[qualified], block.path, g, self.projector,
                                                         self.device))

    def add_dense(self, qualified: str, g: torch.Tensor) -> None:
        """Dense projection of a full [B, numel] per-sample gradient into φ."""
        factor = self.projector.factor(qualified, self.blocks[qualified].shape, "dense", g.shape[1], self.device,
                                       torch.float32)
        self._add(qualified, g if factor is None else g @ factor.T)


@contextlib.contextmanager
def _forward_replaced(module: nn.Module, forward: Callable) -> Iterator[None]:
    saved = vars(module).get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if saved is None:
            del module.forward
        else:
            module.forward = saved


def _full(t: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision tensors (autocast); any other dtype (complex included) as it is."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


_MODULE_GRADS: weakref.WeakKeyDictionary[nn.Module, ModuleGrads] = weakref.WeakKeyDictionary()


def module_grads(entry: RuledModule) -> ModuleGrads:
    """The rules of a ruled module's parameters (one per module, kept while it lives)."""
    names = tuple(local for _, local in entry.params)
    found = _MODULE_GRADS.get(entry.module)
    if found is None or found.names != names:
        found = _MODULE_GRADS[entry.module] = ModuleGrads(entry.module, names, entry.name)
    return found
