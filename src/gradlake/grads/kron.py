"""Linear and Conv layers' per-example blocks, factorised (the ``kron`` path of the capture).

The projected input ã = P_in a (for a conv, P_in is a kernel (k_in, C_in, *kernel) applied
with the layer's stride, padding, padding mode and dilation, which equals unfold(a)·P_inᵀ
without unfolding; separable: a 1x1 channel conv, then the same k_space filters on each
channel map) and, from the output gradient δ, the weight's block Σ_positions (P_out δ) ⊗ ã
(one batched matmul) and the bias's Σ_positions P_out δ. ``factor(role, dim, rows=None)``
gives the layer's factors (None: the identity), ``eye(n)`` identities, both in the
capture's precision.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from gradlake.grads.capture_plan import Layer
from gradlake.grads.projector import Projector

Factor = Callable[..., "torch.Tensor | None"]


def project_input(layer: Layer, a: torch.Tensor, batch: int, split: tuple[int, int] | None, factor: Factor,
                  eye: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """Linear: [B, positions, k_in]; conv: [B, k_in, positions]."""
    weight = layer.module.weight
    if not layer.conv_dims:
        p_in = factor("in", layer.d_in)
        a = a.reshape(batch, -1, layer.d_in)
        return a if p_in is None else a @ p_in.T
    module, conv = layer.module, _conv(layer.conv_dims)
    if module.padding_mode != "zeros":  # pad here (per channel: commutes with channel mixing)
        a, padding = F.pad(a, module._reversed_padding_repeated_twice, mode=module.padding_mode), 0
    else:
        padding = module.padding
    if split is None:  # one dense (k_in, C_in, *kernel) kernel
        p_in = factor("in", layer.d_in)
        if p_in is None and _pointwise(module, padding):  # identity on a 1x1 conv: the input itself
            return a.reshape(batch, layer.d_in, -1)
        kernel = eye(layer.d_in) if p_in is None else p_in
        out = conv(a, kernel.reshape(kernel.shape[0], *weight.shape[1:]), None, module.stride, padding,
                   module.dilation)
        return out.reshape(batch, out.shape[1], -1)
    # Separable: channels by a 1x1 conv, then the same k_space filters on each of the
    # k_channel maps (the maps stacked on the batch axis: one single-channel conv).
    c_in, taps = weight.shape[1], layer.d_in // weight.shape[1]
    channel = factor("in-channel", c_in, split[0])
    if channel is not None:
        a = conv(a, channel.reshape(*channel.shape, *[1] * layer.conv_dims))
    space = factor("in-space", taps, split[1])
    if taps == 1:  # a 1x1 conv: the channel projection is all of P_in
        if _pointwise(module, padding):
            return a.reshape(batch, split[0], -1)
        out = conv(a, eye(split[0]).reshape(split[0], split[0], *weight.shape[2:]), None,
                   module.stride, padding, module.dilation)
        return out.reshape(batch, split[0], -1)
    space = eye(taps) if space is None else space
    maps = a.reshape(batch * split[0], 1, *a.shape[2:])
    out = conv(maps, space.reshape(split[1], 1, *weight.shape[2:]), None, module.stride, padding, module.dilation)
    return out.reshape(batch, split[0] * split[1], -1)


def blocks(layer: Layer, delta: torch.Tensor, projected: torch.Tensor, batch: int, p_out: torch.Tensor | None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight's [B, k_out, k_in] and the bias's [B, k_out] from the output gradient and ã."""
    if layer.conv_dims:
        delta = delta.reshape(batch, layer.d_out, -1)  # [B, d_out, positions]
        if p_out is not None:
            delta = p_out @ delta
        return delta @ projected.transpose(1, 2), delta.sum(dim=2)
    delta = delta.reshape(batch, -1, layer.d_out)  # [B, positions, d_out]
    if p_out is not None:
        delta = delta @ p_out.T
    return delta.transpose(1, 2) @ projected, delta.sum(dim=1)


def project_per_sample(layer: Layer, path: str, g: torch.Tensor, projector: Projector, device: torch.device
                       ) -> torch.Tensor:
    """A layer's full [B, numel] weight (``path`` "kron") or bias ("kron-bias") gradient projected
    by its factors (a layer not called on batched inputs, covered by an ancestor's rule)."""
    batch, shape = g.shape[0], tuple(layer.module.weight.shape)

    def full(role: str, dim: int, rows: int | None = None) -> torch.Tensor:
        f = projector.factor(layer.name, shape, role, dim, device, torch.float32, rows)
        return torch.eye(dim, device=device) if f is None else f

    p_out = projector.factor(layer.name, shape, "out", layer.d_out, device, torch.float32)
    g = g if p_out is None else (g.reshape(batch, layer.d_out, -1).transpose(1, 2) @ p_out.T
                                 ).transpose(1, 2).reshape(batch, -1)
    if path != "kron":
        return g
    split = layer.input_split(projector)
    if split:
        c_in = shape[1]
        p_in = torch.kron(full("in-channel", c_in, split[0]), full("in-space", layer.d_in // c_in, split[1]))
    else:
        p_in = full("in", layer.d_in)
    return g.reshape(batch, -1, layer.d_in) @ p_in.T


def _pointwise(module: nn.Module, padding) -> bool:
    """A 1x1 conv with stride 1 and no padding: its unfolded input is the input itself."""
    padding = padding if isinstance(padding, tuple) else (padding,)
    return (all(k == 1 for k in module.kernel_size) and all(s == 1 for s in module.stride)
            and not any(padding))


def _conv(dims: int):
    return (F.conv1d, F.conv2d, F.conv3d)[dims - 1]


