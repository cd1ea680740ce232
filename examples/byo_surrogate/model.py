"""A small residual convolutional surrogate for 1-D, 2-D or 3-D grids (not a gradlake preset)."""

from __future__ import annotations

from torch import nn


class ResidualConvNet(nn.Module):
    """ŷ = x + f(x): a pointwise lift, ``depth`` circular conv blocks, a pointwise projection."""

    def __init__(self, channels: int, width: int = 8, depth: int = 2, kernel: int = 3, dims: int = 2):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.lift = conv(channels, width, 1)
        self.blocks = nn.ModuleList(
            nn.Sequential(conv(width, width, kernel, padding=kernel // 2, padding_mode="circular"),
                          nn.GroupNorm(1, width), nn.GELU())
            for _ in range(depth))
        self.project = conv(width, channels, 1)

    def forward(self, x):
        h = self.lift(x)
        for block in self.blocks:
            h = h + block(h)
        return x + self.project(h)
