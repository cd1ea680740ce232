"""Building blocks shared by the surrogates.

Rules every layer here keeps, so the gradient stage can capture every weight:
- weights live only in ``nn.Conv2d``, ``nn.Linear``, norms (``nn.LayerNorm`` subclasses,
  ``nn.RMSNorm``) and :class:`PositionalEmbedding`;
- every ``nn.Conv2d`` has ``padding=0``: circular padding is a separate
  ``nn.CircularPad2d`` before it, so a conv's forward input is exactly what it convolves;
- attention is written with ``nn.Linear`` projections and explicit matmuls (no
  ``nn.MultiheadAttention``, no fused SDPA kernel: both hide weights or lack forward-mode AD);
- nothing mixes the samples of a batch (no BatchNorm).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def circular_conv(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """``CircularPad2d`` + unpadded ``Conv2d``: output size = input size / stride (odd kernel)."""
    if kernel % 2 != 1:
        raise ValueError(f"circular_conv needs an odd kernel, got {kernel}")
    return nn.Sequential(
        nn.CircularPad2d(kernel // 2),
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=0),
    )


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of [B, C, H, W], independently at every grid cell."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


def norm_act(channels: int) -> nn.Sequential:
    """LayerNorm over channels followed by SiLU."""
    return nn.Sequential(ChannelLayerNorm(channels, eps=1e-6), nn.SiLU())


class SelfAttention(nn.Module):
    """Multi-head self-attention on tokens [B, N, D] with Linear q/k/v and output projections."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(b, n, d))


class FeedForward(nn.Sequential):
    """Linear -> SiLU -> Linear on tokens."""

    def __init__(self, dim: int, ratio: int):
        super().__init__(nn.Linear(dim, ratio * dim), nn.SiLU(), nn.Linear(ratio * dim, dim))


class PositionalEmbedding(nn.Module):
    """A learned additive embedding, one vector per token: [1, N, D]."""

    def __init__(self, tokens: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(0.02 * torch.randn(1, tokens, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H*W, C]."""
    return x.flatten(2).transpose(1, 2)


def from_tokens(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, H*W, C] -> [B, C, H, W]."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], height, width)
