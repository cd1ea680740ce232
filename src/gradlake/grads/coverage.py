"""Which path covers each parameter of a model, and where its block sits in φ.

- A ``nn.Linear`` or ``nn.Conv1d/2d/3d`` (groups=1, the stock forward) is a *layer*: its
  weight gradient is captured factorised (``kron``), its bias through P_out (``kron-bias``).
- Every other module that owns parameters directly (norms, positional embeddings, grouped
  or transposed convs, ...) is *exact*: per-example gradients of its own parameters come
  from its recorded input and output gradient (``torch.func``), then a dense projection.

Blocks of φ follow ``model.named_parameters()`` order, so with identity factors φ is the
flattened per-example gradient. Nothing is skipped: every parameter is in exactly one block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from gradlake.errors import InputError
from gradlake.grads.projector import Projector

_CONVS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
# Modules whose forward reads their submodules' weights directly (never calling them), so
# per-module hooks cannot see those weights.
_OPAQUE = (nn.MultiheadAttention, nn.Transformer, nn.TransformerEncoder, nn.TransformerDecoder,
           nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.RNNBase)


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
class ExactModule:
    """A module whose own parameters get exact per-example gradients."""

    name: str
    module: nn.Module
    params: tuple[tuple[str, str], ...]  # (qualified name, local name)


@dataclass(frozen=True)
class Block:
    """One parameter's slice [offset, offset + k) of φ."""

    name: str
    shape: tuple[int, ...]
    path: str  # "kron" | "kron-bias" | "exact"
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
    if type(module) is nn.Linear:
        return own <= {"weight", "bias"}
    if type(module) in _CONVS:
        return module.groups == 1 and own <= {"weight", "bias"}
    return False


@dataclass(frozen=True)
class Plan:
    parameters: tuple[tuple[str, tuple[int, ...]], ...]  # named_parameters order
    layers: tuple[Layer, ...]
    exact: tuple[ExactModule, ...]

    def layout(self, projector: Projector | None) -> Layout:
        """Blocks of φ for ``projector`` (None: identity everywhere, the exact gradient)."""
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
        for entry in self.exact:
            for qualified, _ in entry.params:
                owner[qualified] = ("exact", entry.name, {})
        blocks, offset = [], 0
        for name, shape in self.parameters:
            path, module, factors = owner[name]
            if path == "kron":
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


def plan(model: nn.Module) -> Plan:
    """Classify every parameter of ``model``; InputError for structures hooks cannot capture."""
    seen: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            raise InputError(f"model parameter {name!r} is the same tensor as {seen[id(param)]!r}; "
                             "tied parameters are not supported by gradlake.grads")
        seen[id(param)] = name
    layers, exact = [], []
    for mod_name, module in model.named_modules():
        if isinstance(module, _OPAQUE):
            raise InputError(f"model module {mod_name!r} is a {type(module).__name__}, whose forward "
                             "bypasses its submodules; write attention with nn.Linear projections")
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
            exact.append(ExactModule(mod_name, module, tuple(own)))
    parameters = tuple((n, tuple(p.shape)) for n, p in model.named_parameters())
    return Plan(parameters, tuple(layers), tuple(exact))
