"""Which path covers each parameter of a model, and where its block sits in φ.

- A ``nn.Linear`` or ``nn.Conv1d/2d/3d`` (groups=1, the stock forward) is a *layer*: its
  weight gradient is captured factorised (``kron``), its bias through P_out (``kron-bias``).
- Every other module that owns parameters directly (norms, positional embeddings, grouped
  or transposed convs, ...) is *ruled* (:class:`RuledModule`): per-example gradients of its own
  parameters come in full from its recorded input and output gradient (the rules of
  :mod:`gradlake.grads.module_rules`), then a dense projection (block path ``exact``).
- A module whose forward reads parameters of its submodules without calling them is ruled
  for its whole subtree: ``nn.MultiheadAttention`` (its out_proj), and any module with
  ``torch.nn.utils.parametrize`` parametrizations (spectral_norm, weight_norm, orthogonal,
  ...), whose blocks are the gradients w.r.t. the original parameters. Any other parameter
  whose module is never called (a factorised weight held in a submodule, as tltorch's in
  neuraloperator) is found by a dry run and covered by its nearest called ancestor
  (:func:`gradlake.grads.routes.routes`).
- A complex parameter counts as its real and imaginary parts (shape [..., 2]).
- A spectral weight (a block of >= 4 dims ending in a (real, imaginary) pair, under a module
  that contracts Fourier modes through its own ``_contract``, as neuraloperator's
  SpectralConv: [C_in, C_out, *modes, 2]) is ruled, but projected like a layer's weight,
  ``spectral``: its per-example gradient as a C_in x (C_out·modes·2) matrix G, P_out G P_inᵀ
  (k_out' * k_in' coordinates; the factors keyed by the parameter's name).

Blocks of φ follow ``model.named_parameters()`` order, so with identity factors φ is the
flattened per-example gradient. Nothing is skipped: every parameter is in exactly one block.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn
from torch.nn.utils import parametrize

from gradlake.errors import InputError

if TYPE_CHECKING:  # a plan takes any projector; projector.py imports this module
    from gradlake.grads.projector import Projector

_CONVS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
# Modules that take [time, batch, ...] unless batch_first=True.
_SEQUENCE_FIRST = (nn.MultiheadAttention, nn.Transformer, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def param_shape(param) -> tuple[int, ...]:
    """The shape of a parameter's block before projection: a complex entry is a (real, imaginary) pair."""
    return (*param.shape, 2) if param.is_complex() else tuple(param.shape)


def refusal(module: nn.Module) -> str | None:
    """Why gradlake.grads cannot capture ``module``, or None."""
    if isinstance(module, nn.RNNBase):
        return ("recurrent layers are not supported (their forward runs over time steps with flattened "
                "weights); unroll the recurrence with nn.Linear / nn.RNNCell-style modules")
    if isinstance(module, _SEQUENCE_FIRST) and not getattr(module, "batch_first", True):
        return ("batch_first=False puts the batch on dimension 1; gradlake.grads needs the batch on "
                "dimension 0 of every module's input: build it with batch_first=True")
    return None


def _whole_subtree(module: nn.Module) -> bool:
    """Modules whose forward reads their submodules' parameters without calling them."""
    return isinstance(module, nn.MultiheadAttention) or parametrize.is_parametrized(module)


@dataclass(frozen=True)
class Layer:
    """A Linear or Conv layer captured as Σ_positions (P_out δ) ⊗ (P_in a)."""

    name: str
    module: nn.Module
    conv_dims: int  # 0 for Linear
    d_in: int  # in_features, or C_in * prod(kernel)
    d_out: int
    weight: str  # qualified parameter names
    bias: str | None

    def input_split(self, projector: Projector | None) -> tuple[int, int] | None:
        """(channel rows, spatial rows) of a separable conv input factor, else None."""
        if not self.conv_dims or projector is None:
            return None
        c_in = self.module.weight.shape[1]
        return projector.conv_split(c_in, self.d_in // c_in, self.name)


@dataclass(frozen=True)
class RuledModule:
    """A module whose own parameters' per-example gradients come in full from a per-module rule
    (:mod:`gradlake.grads.module_rules`), not factorised as a :class:`Layer`'s."""

    name: str
    module: nn.Module
    params: tuple[tuple[str, str], ...]  # (qualified name, local name)


@dataclass(frozen=True)
class Block:
    """One parameter's slice [offset, offset + k) of φ."""

    name: str
    shape: tuple[int, ...]
    path: str  # "kron" | "kron-bias" | "spectral" | "exact" (a ruled module's: dense; stores record the name)
    module: str
    offset: int
    k: int
    factors: dict[str, Any]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "path": self.path, "module": self.module,
                "offset": self.offset, "k": self.k, **self.factors}


@dataclass(frozen=True)
class Layout:
    blocks: tuple[Block, ...]
    k: int

    def offsets(self) -> dict[str, tuple[int, int]]:
        """Parameter name -> (offset, k) of its block."""
        return {b.name: (b.offset, b.k) for b in self.blocks}


def _is_layer(module: nn.Module) -> bool:
    own = {name for name, _ in module.named_parameters(recurse=False)}
    if "weight" not in own or module.weight.is_complex():
        return False
    if type(module) is nn.Linear:
        return own <= {"weight", "bias"}
    if type(module) in _CONVS:
        return module.groups == 1 and own <= {"weight", "bias"}
    return False


@dataclass(frozen=True)
class Plan:
    parameters: tuple[tuple[str, tuple[int, ...]], ...]  # named_parameters order
    layers: tuple[Layer, ...]
    ruled: tuple[RuledModule, ...]
    spectral: tuple[tuple[str, int, int], ...] = ()  # (ruled parameter, d_out, d_in) projected as a matrix
    _layouts: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary, compare=False,
                                                repr=False)  # per projector (its settings never change)

    def layout(self, projector: Projector | None) -> Layout:
        """Blocks of φ for ``projector`` (None: identity everywhere, the full gradient)."""
        if projector is None:
            return self._layout(None)
        if projector not in self._layouts:
            self._layouts[projector] = self._layout(projector)
        return self._layouts[projector]

    def _layout(self, projector: Projector | None) -> Layout:
        owner: dict[str, tuple[str, str, dict[str, Any]]] = {}
        for layer in self.layers:
            k_out = projector.rows("out", layer.d_out, layer.name) if projector else layer.d_out
            dims = {"d_out": layer.d_out, "d_in": layer.d_in, "k_out": k_out, "k_in": layer.d_in}
            split = layer.input_split(projector)
            if split:
                dims.update(k_in=split[0] * split[1], k_channel=split[0], k_space=split[1])
            elif projector:
                dims["k_in"] = projector.rows("in", layer.d_in, layer.name)
            owner[layer.weight] = ("kron", layer.name, dims)
            if layer.bias:
                owner[layer.bias] = ("kron-bias", layer.name, {"d_out": layer.d_out, "k_out": k_out})
        for entry in self.ruled:
            for qualified, _ in entry.params:
                owner[qualified] = ("exact", entry.name, {})
        for qualified, d_out, d_in in self.spectral:
            k_out, k_in = (projector.rows("out", d_out, qualified), projector.rows("in", d_in, qualified)) \
                if projector else (d_out, d_in)
            owner[qualified] = ("spectral", owner[qualified][1], {"d_out": d_out, "d_in": d_in, "k_out": k_out,
                                                                  "k_in": k_in})
        blocks, offset = [], 0
        for name, shape in self.parameters:
            path, module, factors = owner[name]
            if path in ("kron", "spectral"):
                k = factors["k_out"] * factors["k_in"]
            elif path == "kron-bias":
                k = factors["k_out"]
            else:
                numel = 1
                for s in shape:
                    numel *= s
                k = projector.rows("dense", numel, name) if projector else numel
                factors = {"numel": numel, "k_dense": k}
            blocks.append(Block(name, shape, path, module, offset, k, factors))
            offset += k
        return Layout(tuple(blocks), offset)


_PLANS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, Plan]] = weakref.WeakKeyDictionary()


def plan(model: nn.Module) -> Plan:
    """Classify every parameter of ``model``; InputError for structures hooks cannot capture.
    Kept per model while its modules, their types and their parameters (objects, shapes) stay."""
    key = tuple((id(m), type(m), callable(vars(m).get("_contract")),
                 *((n, id(p), None if p is None else p.shape) for n, p in m._parameters.items())) for m in model.modules())
    found = _PLANS.get(model)
    if found is None or found[0] != key:
        found = _PLANS[model] = (key, _plan(model))
    return found[1]


def _plan(model: nn.Module) -> Plan:
    seen: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            raise InputError(f"model parameter {name!r} is the same tensor as {seen[id(param)]!r}; "
                             "tied parameters are not supported by gradlake.grads")
        seen[id(param)] = name
    layers, ruled, covered = [], [], []
    for mod_name, module in model.named_modules():
        reason = refusal(module)
        if reason:
            raise InputError(f"model module {mod_name!r} ({type(module).__name__}): {reason}")
        if any(mod_name.startswith(prefix) for prefix in covered):
            continue
        if _whole_subtree(module):
            covered.append(f"{mod_name}." if mod_name else "")
            own = [(f"{mod_name}.{p}" if mod_name else p, p) for p, _ in module.named_parameters()]
        else:
            own = [(f"{mod_name}.{p}" if mod_name else p, p) for p, _ in module.named_parameters(recurse=False)]
        if not own:
            continue
        if _is_layer(module):
            weight = module.weight
            dims = _CONVS.get(type(module), 0)
            layers.append(Layer(
                name=mod_name, module=module, conv_dims=dims,
                d_in=weight[0].numel(), d_out=weight.shape[0],
                weight=f"{mod_name}.weight" if mod_name else "weight",
                bias=(f"{mod_name}.bias" if mod_name else "bias") if module.bias is not None else None,
            ))
        else:
            ruled.append(RuledModule(mod_name, module, tuple(own)))
    parameters = tuple((n, param_shape(p)) for n, p in model.named_parameters())
    contracting = [f"{n}." if n else "" for n, m in model.named_modules() if callable(vars(m).get("_contract"))]
    spectral = tuple((name, shape[0], math.prod(shape[1:])) for name, shape in parameters
                     if len(shape) >= 4 and shape[-1] == 2 and any(name.startswith(c) for c in contracting)
                     and not any(name in (layer.weight, layer.bias) for layer in layers))
    return Plan(parameters, tuple(layers), tuple(ruled), spectral)
