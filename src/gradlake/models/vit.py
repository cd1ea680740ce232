"""The paper's ViT: conv patch embedding, learned positions, pre-norm RMSNorm blocks, linear un-patchify.

    CircularPad2d + Conv2d(patch_kernel, stride=patch) -> tokens [B, (R/patch)^2, dim]
    + learned positional embedding (one vector per patch: the grid size is fixed at build)
    depth x [x + MHA(RMSNorm(x)); x + MLP(RMSNorm(x))]
    RMSNorm -> Linear(dim, patch^2 * channels) -> back to [B, channels, R, R]
"""

from __future__ import annotations

import torch
from torch import nn

from gradlake.errors import InputError
from gradlake.models.layers import FeedForward, PositionalEmbedding, SelfAttention, circular_conv
from gradlake.models.unet import check_grid


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm_attn = nn.RMSNorm(dim, eps=1e-6)
        self.attn = SelfAttention(dim, heads)
        self.norm_mlp = nn.RMSNorm(dim, eps=1e-6)
        self.mlp = FeedForward(dim, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm_attn(x))
        return x + self.mlp(self.norm_mlp(x))


class ViT(nn.Module):
    """[B, channels, R, R] -> [B, channels, R, R] for the resolution R it was built for."""

    def __init__(self, channels: int, resolution: int, dim: int, depth: int, heads: int,
                 mlp_ratio: int, patch: int, patch_kernel: int):
        super().__init__()
        if resolution % patch:
            raise InputError(f"vit: resolution {resolution} is not divisible by the patch stride {patch}")
        self.channels, self.resolution, self.patch = channels, resolution, patch
        self.embed = circular_conv(channels, dim, patch_kernel, stride=patch)
        self.position = PositionalEmbedding((resolution // patch) ** 2, dim)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        self.unpatch = nn.Linear(dim, patch * patch * channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_grid(x, self.channels, self.patch, "vit")
        if tuple(x.shape[-2:]) != (self.resolution, self.resolution):
            raise InputError(
                f"vit: built for a {self.resolution}x{self.resolution} grid (learned positions), "
                f"got {x.shape[-2]}x{x.shape[-1]}"
            )
        b, s, n = x.shape[0], self.patch, self.resolution // self.patch
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = self.unpatch(self.norm(self.blocks(self.position(tokens))))
        # [B, n*n, s*s*C] -> [B, n, n, s, s, C] -> [B, C, n, s, n, s] -> [B, C, R, R]
        return tokens.reshape(b, n, n, s, s, self.channels).permute(0, 5, 1, 3, 2, 4).reshape(
            b, self.channels, n * s, n * s
        )
