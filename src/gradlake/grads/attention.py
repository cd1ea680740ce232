"""The attention rule: ``nn.MultiheadAttention`` (batch first, no masks) recomputed once for the
batch with per-sample copies of its weights (batched matmuls, fused attention)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from gradlake.grads.tensors import flat, inner


def supported(module: nn.Module, args: tuple, kwargs: dict) -> bool:
    """An nn.MultiheadAttention call that :func:`per_sample_grads` reproduces: batch first,
    one embedding size, no masks, no extra key/value biases, no dropout in use."""
    if not isinstance(module, nn.MultiheadAttention):
        return False
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    return (module.batch_first and module._qkv_same_embed_dim and module.bias_k is None
            and not module.add_zero_attn and not (module.training and module.dropout > 0)
            and len(args) + sum(n in kwargs for n in ("query", "key", "value")) == 3 and len(tensors) == len(args)
            and all(kwargs.get(n) is None for n in ("key_padding_mask", "attn_mask"))
            and not kwargs.get("is_causal", False) and not any(t.is_complex() for t in tensors))


def per_sample_grads(module: nn.Module, params, args, kwargs, delta) -> dict[str, torch.Tensor]:
    """nn.MultiheadAttention recomputed once for the batch with per-sample copies of its weights
    (batched matmuls, fused attention): their gradients are the per-sample gradients."""
    batch = delta.shape[0]
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
