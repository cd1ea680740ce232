"""The paper's UNet (BigGAN-style residual blocks, circular padding, attention bottleneck).

    input conv (io_kernel) -> width
    down blocks, one per kernel (9/7/5/3): channels double, grid halves
    bottleneck: conv to twice the channels + attention block (heads, ffn_ratio)
    up blocks: LayerNorm+SiLU, PixelShuffle(2) (channels / 4), residual convs; the
               result is concatenated with the skip of the same grid size
    output: two io_kernel convs on [up, input-conv skip], then a 1x1 conv to the channels

Total stride 2**len(kernels): any grid divisible by it is accepted, and the network is
equivariant to circular shifts by multiples of it.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from gradlake.errors import InputError
from gradlake.models.layers import (
    FeedForward,
    SelfAttention,
    circular_conv,
    from_tokens,
    norm_act,
    to_tokens,
)

_SQRT2 = math.sqrt(2.0)


def check_grid(x: torch.Tensor, channels: int, divisor: int, model: str) -> None:
    """InputError unless x is [B, channels, H, W] with H and W divisible by ``divisor``."""
    if x.dim() != 4 or x.shape[1] != channels:
        raise InputError(f"{model}: expected input [batch, {channels}, H, W], got {list(x.shape)}")
    h, w = x.shape[-2:]
    if h % divisor or w % divisor:
        raise InputError(f"{model}: grid {h}x{w} is not divisible by the model's down-sampling factor {divisor}")


class Down(nn.Module):
    """Residual down block: c -> 2c channels, grid / 2; skip = 1x1 conv + k x k average pool."""

    def __init__(self, c_in: int, kernel: int):
        super().__init__()
        c_out = 2 * c_in
        self.kernel = kernel
        self.norm = norm_act(c_in)
        self.skip = nn.Conv2d(c_in, c_out, 1)
        self.main = nn.Sequential(
            circular_conv(c_in, c_out, kernel), norm_act(c_out), circular_conv(c_out, c_out, kernel, stride=2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        pooled = F.avg_pool2d(F.pad(self.skip(x), [self.kernel // 2] * 4, mode="circular"), self.kernel, stride=2)
        return (self.main(x) + pooled) / _SQRT2


class Up(nn.Module):
    """Residual up block: LayerNorm+SiLU, PixelShuffle(2) (c -> c/4, grid x 2), two convs + 1x1 skip."""

    def __init__(self, c_in: int, kernel: int):
        super().__init__()
        c_out = c_in // 4
        self.shuffle = nn.Sequential(norm_act(c_in), nn.PixelShuffle(2))
        self.skip = nn.Conv2d(c_out, c_out, 1)
        self.main = nn.Sequential(
            circular_conv(c_out, c_out, kernel), norm_act(c_out), circular_conv(c_out, c_out, kernel)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shuffle(x)
        return (self.main(x) + self.skip(x)) / _SQRT2


class AttentionBlock(nn.Module):
    """h = x + MHA(RMSNorm(x)); out = (h + FFN(RMSNorm(h))) / sqrt(2), over the grid's cells."""

    def __init__(self, channels: int, heads: int, ffn_ratio: int):
        super().__init__()
        self.norm_attn = nn.RMSNorm(channels, eps=1e-6)
        self.attn = SelfAttention(channels, heads)
        self.norm_ffn = nn.RMSNorm(channels, eps=1e-6)
        self.ffn = FeedForward(channels, ffn_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        tokens = to_tokens(x)
        h = tokens + self.attn(self.norm_attn(tokens))
        return from_tokens((h + self.ffn(self.norm_ffn(h))) / _SQRT2, height, width)


class UNet(nn.Module):
    """[B, channels, H, W] -> [B, channels, H, W]."""

    def __init__(self, channels: int, width: int, kernels: tuple[int, ...], io_kernel: int,
                 heads: int, ffn_ratio: int):
        super().__init__()
        self.channels = channels
        self.stride = 2 ** len(kernels)
        widths = [width * 2**i for i in range(len(kernels) + 2)]
        self.proj_in = circular_conv(channels, width, io_kernel)
        self.down = nn.ModuleList(Down(widths[i], k) for i, k in enumerate(kernels))
        bottom = len(kernels)
        self.across = nn.Sequential(
            norm_act(widths[bottom]),
            circular_conv(widths[bottom], widths[bottom + 1], kernels[-1]),
            AttentionBlock(widths[bottom + 1], heads, ffn_ratio),
        )
        # Up block for level j (deepest first) takes widths[j + 1] and returns widths[j - 1].
        self.up = nn.ModuleList(Up(widths[j + 1], kernels[j - 1]) for j in range(bottom, 0, -1))
        self.proj_out = nn.Sequential(
            norm_act(widths[1]), circular_conv(widths[1], widths[1], io_kernel),
            norm_act(widths[1]), circular_conv(widths[1], widths[1], io_kernel),
            nn.Conv2d(widths[1], channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_grid(x, self.channels, self.stride, "unet")
        skips = [self.proj_in(x)]
        for block in self.down:
            skips.append(block(skips[-1]))
        h = self.across(skips.pop())
        for block in self.up:
            h = torch.cat([block(h), skips.pop()], dim=1)
        return self.proj_out(h)
