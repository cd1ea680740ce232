"""The transposed-conv rule: per-example gradients of ``nn.ConvTranspose1d/2d/3d`` (groups=1).

A transposed conv is the adjoint of a conv with the same weight, stride, padding and dilation:
y[o, n·s − p + k·d] += x[i, n] W[i, o, k]. So the weight gradient of sample b is that conv's
weight gradient with the roles of input and output swapped, Σ_n x_b[i, n] U_b[(o, k), n], where
U = the output gradient δ unfolded with the conv's geometry (a conv with an identity kernel),
one batched matmul; the bias's is Σ δ over positions. Used where it equals the per-sample loop
on two samples (:mod:`gradlake.grads.module_rules`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

_CONVS = {nn.ConvTranspose1d: F.conv1d, nn.ConvTranspose2d: F.conv2d, nn.ConvTranspose3d: F.conv3d}


def supported(module: nn.Module, args: tuple, kwargs: dict) -> bool:
    """A stock transposed conv (groups=1, zero padding) called on one real input tensor."""
    return (type(module) in _CONVS and module.groups == 1 and module.padding_mode == "zeros"
            and len(args) >= 1 and isinstance(args[0], torch.Tensor) and not args[0].is_complex()
            and args[0].dim() == module.weight.dim())


def per_sample_grads(module: nn.Module, params: dict[str, torch.Tensor], args: tuple, kwargs: dict,
                     delta: torch.Tensor) -> dict[str, torch.Tensor]:
    """{name: [B, numel]} of the weight (as [C_in, C_out·kernel] rows) and the bias."""
    x, batch = args[0], delta.shape[0]
    c_in, c_out, *kernel = module.weight.shape
    taps = c_out * torch.Size(kernel).numel()
    eye = torch.eye(taps, dtype=delta.dtype, device=delta.device).reshape(taps, c_out, *kernel)
    unfolded = _CONVS[type(module)](delta, eye, None, module.stride, module.padding, module.dilation)
    unfolded = unfolded[(..., *(slice(0, n) for n in x.shape[2:]))]  # (an output_padding past the stride)
    out = {}
    if "weight" in params:
        out["weight"] = (x.reshape(batch, c_in, -1).to(delta.dtype)
                         @ unfolded.reshape(batch, taps, -1).transpose(1, 2)).reshape(batch, -1)
    if "bias" in params:
        out["bias"] = delta.reshape(batch, c_out, -1).sum(dim=2)
    return out
