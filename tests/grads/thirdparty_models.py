"""Tiny models with the module patterns of third-party PDE surrogates, written here.

timm and torchvision cannot be loaded next to this project's CPU torch 2.13 wheel (PyPI's
torchvision is built against CUDA torch; timm imports torchvision), so their ViT, Swin and
torchvision's ViT are reproduced layer for layer at the level gradlake sees: the same
module types, the same bare parameters and the same functional calls. neuraloperator's FNO
and TFNO are used as they are (tests/grads/test_grads_thirdparty.py).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrizations

from gradlake.grads import ChannelsLast


class TimmAttention(nn.Module):
    """timm's Attention: one qkv Linear, fused F.scaled_dot_product_attention, proj Linear."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class LayerScale(nn.Module):
    """timm's LayerScale: x * gamma (a bare parameter named gamma)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(0.5 + torch.rand(dim))

    def forward(self, x):
        return x * self.gamma


class TimmBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.attn, self.ls1 = nn.LayerNorm(dim), TimmAttention(dim, heads), LayerScale(dim)
        self.norm2, self.ls2 = nn.LayerNorm(dim), LayerScale(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class TimmViT(nn.Module):
    """timm's VisionTransformer: conv patch embedding, cls_token and pos_embed owned by the model."""

    def __init__(self, channels=4, size=16, patch=4, dim=16, heads=2, depth=2):
        super().__init__()
        self.patch_embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, (size // patch) ** 2 + 1, dim))
        self.blocks = nn.Sequential(*[TimmBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 8)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


class WindowAttention(nn.Module):
    """Swin's window attention: a relative position bias table gathered by a buffer of indices."""

    def __init__(self, dim: int, window: int, heads: int):
        super().__init__()
        self.heads, self.window = heads, window
        self.relative_position_bias_table = nn.Parameter(0.02 * torch.randn((2 * window - 1) ** 2, heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * window - 1) + rel[..., 1])
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # [B * windows, N, C]
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = torch.softmax(q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5 + bias.permute(2, 0, 1), -1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, window: int, heads: int, shift: int):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1, self.attn = nn.LayerNorm(dim), WindowAttention(dim, window, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):  # [B, H, W, C]
        b, h, w, c = x.shape
        s = self.window
        y = torch.roll(self.norm1(x), (-self.shift, -self.shift), dims=(1, 2))
        windows = y.view(b, h // s, s, w // s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, s * s, c)
        y = self.attn(windows).view(b, h // s, w // s, s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        x = x + torch.roll(y, (self.shift, self.shift), dims=(1, 2))
        return x + self.mlp(self.norm2(x))


class SwinLike(nn.Module):
    """timm's SwinTransformer: patch embedding, (shifted) window blocks, patch merging, channels-last."""

    def __init__(self, channels=4, dim=8, window=2):
        super().__init__()
        self.patch_embed = nn.Conv2d(channels, dim, 2, stride=2)
        self.stage1 = nn.Sequential(SwinBlock(dim, window, 2, 0), SwinBlock(dim, window, 2, 1))
        self.merge_norm, self.reduction = nn.LayerNorm(4 * dim), nn.Linear(4 * dim, 2 * dim, bias=False)
        self.stage2 = SwinBlock(2 * dim, window, 2, 0)
        self.head = nn.Linear(2 * dim, 8)

    def forward(self, x):
        x = self.stage1(self.patch_embed(x).permute(0, 2, 3, 1))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        x = self.stage2(self.reduction(self.merge_norm(x)))
        return self.head(x.mean(dim=(1, 2)))


class TorchvisionEncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, inputs):
        x = self.ln_1(inputs)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = x + inputs
        return x + self.mlp(self.ln_2(x))


class TorchvisionEncoder(nn.Module):
    def __init__(self, seq: int, dim: int, heads: int, depth: int):
        super().__init__()
        self.pos_embedding = nn.Parameter(0.02 * torch.randn(1, seq, dim))
        self.layers = nn.Sequential(*[TorchvisionEncoderBlock(dim, heads) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim)

    def forward(self, x):
        return self.ln(self.layers(x + self.pos_embedding))


class TorchvisionViT(nn.Module):
    """torchvision's VisionTransformer: nn.MultiheadAttention blocks, class_token on the model,
    pos_embedding on the encoder."""

    def __init__(self, channels=4, size=16, patch=4, dim=16, heads=2, depth=2):
        super().__init__()
        self.conv_proj = nn.Conv2d(channels, dim, patch, stride=patch)
        self.class_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.encoder = TorchvisionEncoder((size // patch) ** 2 + 1, dim, heads, depth)
        self.heads = nn.Linear(dim, 8)

    def forward(self, x):
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.heads(self.encoder(x)[:, 0])


class SpectralNormMLP(nn.Module):
    """Linear layers under spectral_norm, weight_norm and orthogonal parametrizations."""

    def __init__(self, d_in=12, width=16, d_out=6):
        super().__init__()
        self.fc1 = parametrizations.spectral_norm(nn.Linear(d_in, width))
        self.fc2 = parametrizations.weight_norm(nn.Linear(width, width))
        self.fc3 = parametrizations.orthogonal(nn.Linear(width, width))
        self.out = parametrizations.spectral_norm(nn.Linear(width, d_out))

    def forward(self, x):  # [B, C, X]: channels mixed at every point
        h = x.transpose(1, 2)
        h = torch.tanh(self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(h))))))
        return self.out(h).transpose(1, 2)


class AFNOBlock(nn.Module):
    """AFNO's Fourier block, channels-last: block-diagonal complex MLP (complex parameters,
    complex einsum) on the kept modes, written in place into a zero spectrum."""

    def __init__(self, dim=8, blocks=2, modes=3):
        super().__init__()
        size = dim // blocks
        self.blocks, self.modes = blocks, modes
        self.w1 = nn.Parameter(0.3 * torch.randn(blocks, size, size, dtype=torch.cfloat))
        self.b1 = nn.Parameter(0.1 * torch.randn(blocks, size, dtype=torch.cfloat))
        self.w2 = nn.Parameter(0.3 * torch.randn(blocks, size, size, dtype=torch.cfloat))
        self.b2 = nn.Parameter(0.1 * torch.randn(blocks, size, dtype=torch.cfloat))

    def forward(self, x):  # [B, H, W, C]
        b, h, w, c = x.shape
        spec = torch.fft.rfft2(x, dim=(1, 2), norm="ortho").reshape(b, h, w // 2 + 1, self.blocks, -1)
        m = self.modes
        z = torch.einsum("bxyki,kio->bxyko", spec[:, :m, :m], self.w1) + self.b1
        z = torch.complex(F.gelu(z.real), F.gelu(z.imag))
        z = torch.einsum("bxyki,kio->bxyko", z, self.w2) + self.b2
        out = torch.zeros(spec.shape, dtype=spec.dtype)  # (unbatched under vmap)
        out[:, :m, :m] = z  # in place: what vmap cannot batch
        return x + torch.fft.irfft2(out.reshape(b, h, w // 2 + 1, c), s=(h, w), dim=(1, 2), norm="ortho")


class AFNOModel(nn.Module):
    """A channels-last AFNO network [B, H, W, C] (Linear on channels)."""

    def __init__(self, channels=4, dim=8):
        super().__init__()
        self.embed = nn.Linear(channels, dim)
        self.norm = nn.LayerNorm(dim)
        self.block = AFNOBlock(dim)
        self.head = nn.Linear(dim, channels)

    def forward(self, x):
        return self.head(self.block(self.norm(self.embed(x))))


def afno(channels=4) -> nn.Module:
    return ChannelsLast(AFNOModel(channels))


class Conv1dNet(nn.Module):
    """1-D: zero/circular-padded, depthwise, grouped and transposed Conv1d, and an in-place residual."""

    def __init__(self, channels=3, width=8):
        super().__init__()
        self.lift = nn.Conv1d(channels, width, 3, padding=1, padding_mode="circular")
        self.depthwise = nn.Conv1d(width, width, 5, padding=2, groups=width)
        self.grouped = nn.Conv1d(width, width, 3, padding=1, groups=2)
        self.down = nn.Conv1d(width, width, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose1d(width, width, 2, stride=2)
        self.out = nn.Conv1d(width, channels, 1)

    def forward(self, x):
        h = torch.tanh(self.lift(x))
        h = self.grouped(h + self.depthwise(h)).relu_()  # in place on a layer's output
        return self.out(self.up(torch.tanh(self.down(h))))


class GatedMLP(nn.Module):
    """Gated linear unit with bare parameters used through F.linear (channels of [B, C, ...])."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Parameter(torch.randn(hidden, dim) / dim**0.5)
        self.w_up = nn.Parameter(torch.randn(hidden, dim) / dim**0.5)
        self.w_down = nn.Parameter(torch.randn(dim, hidden) / hidden**0.5)

    def forward(self, x):
        h = x.movedim(1, -1)
        h = F.linear(F.silu(F.linear(h, self.w_gate)) * F.linear(h, self.w_up), self.w_down)
        return x + h.movedim(-1, 1)


class Conv3dNet(nn.Module):
    """3-D: Conv3d, depthwise Conv3d, GroupNorm, a gated MLP of bare parameters, ConvTranspose3d."""

    def __init__(self, channels=2, width=6):
        super().__init__()
        self.lift = nn.Conv3d(channels, width, 3, padding=1)
        self.norm = nn.GroupNorm(2, width)
        self.depthwise = nn.Conv3d(width, width, 3, padding=1, groups=width)
        self.gated = GatedMLP(width, 8)
        self.down = nn.Conv3d(width, width, 2, stride=2)
        self.up = nn.ConvTranspose3d(width, channels, 2, stride=2)

    def forward(self, x):
        h = torch.tanh(self.norm(self.lift(x)))
        h = self.gated(torch.tanh(self.depthwise(h)))
        return self.up(torch.tanh(self.down(h)))


class TorchTransformer(nn.Module):
    """torch's own nn.TransformerEncoder of two nn.TransformerEncoderLayer (batch_first=True)
    between Linear layers, on [B, C, X]."""

    def __init__(self, channels=3, dim=16):
        super().__init__()
        self.embed = nn.Linear(channels, dim)
        layer = nn.TransformerEncoderLayer(dim, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.layer = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, channels)

    def forward(self, x):
        return self.head(self.layer(self.embed(x.transpose(1, 2)))).transpose(1, 2)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block: depthwise 7x7 conv, GroupNorm, pointwise MLP, layer scale γ [1, C, 1, 1] on the block."""

    def __init__(self, channels: int):
        super().__init__()
        self.dw = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.GroupNorm(1, channels)
        self.pw1, self.pw2 = nn.Conv2d(channels, 4 * channels, 1), nn.Conv2d(4 * channels, channels, 1)
        self.gamma = nn.Parameter(0.5 + torch.rand(1, channels, 1, 1))

    def forward(self, x):
        return x + self.gamma * self.pw2(F.gelu(self.pw1(self.norm(self.dw(x)))))


class ConvNeXtNet(nn.Module):
    def __init__(self, channels=4, width=8):
        super().__init__()
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        self.blocks = nn.Sequential(ConvNeXtBlock(width), ConvNeXtBlock(width))
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x):
        return self.out(self.blocks(self.stem(x)))


class TltorchSpectralConv(nn.Module):
    """neuraloperator 0.3's SpectralConv, reduced: one module for all layers, its complex weights
    tensorly-torch FactorizedTensors (parameters on submodules, stored as real [..., 2] and read
    as complex views) in a ModuleList picked by ``indices``, contracted on the low modes
    through its own ``_contract``, and a bias [layers, C, 1, 1] picked the same way."""

    def __init__(self, channels: int, modes: tuple[int, int], layers: int, factorization: str):
        super().__init__()
        import tltorch

        self.modes = modes
        weights = []
        for _ in range(layers):
            w = tltorch.FactorizedTensor.new((channels, channels, *modes), rank=None if factorization == "ComplexDense"
                                             else 0.5, factorization=factorization)
            w.normal_(0, 0.3)
            weights.append(w)
        self.weight = nn.ModuleList(weights)
        self.bias = nn.Parameter(0.1 * torch.randn(layers, channels, 1, 1))
        self._contract = self._dense

    @staticmethod
    def _dense(x, weight, separable=False):
        return torch.einsum("bixy,ioxy->boxy", x, weight.to_tensor())

    def forward(self, x, indices=0):
        m1, m2 = self.modes
        x_ft = torch.fft.rfft2(x, norm="ortho")
        out = torch.zeros(x_ft.shape, dtype=x_ft.dtype)
        out[:, :, :m1, :m2] = self._contract(x_ft[:, :, :m1, :m2], self.weight[indices])
        return torch.fft.irfft2(out, s=x.shape[-2:], norm="ortho") + self.bias[indices]


class TltorchFNO(nn.Module):
    """Two Fourier layers sharing one TltorchSpectralConv, between 1x1 convs."""

    def __init__(self, channels=2, width=6, factorization="ComplexDense"):
        super().__init__()
        self.lift = nn.Conv2d(channels, width, 1)
        self.conv = TltorchSpectralConv(width, (4, 3), 2, factorization)
        self.out = nn.Conv2d(width, channels, 1)

    def forward(self, x):
        h = self.lift(x)
        for i in range(2):
            h = F.gelu(h + self.conv(h, i))
        return self.out(h)


class MaskedSpectralFilter(nn.Module):
    """The Well's ReFNO filter, reduced: the kept modes by masked_select, a [1, modes, C]
    filter parameter, written back by a masked index into a fresh spectrum."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        freqs = torch.fft.fftfreq(size)[:, None] ** 2 + torch.fft.rfftfreq(size)[None, :] ** 2
        self.register_buffer("mask", freqs <= 0.1)
        self.tokens = int(self.mask.sum())
        self.filter = nn.Parameter(1 + 0.3 * torch.randn(1, self.tokens, dim, dtype=torch.cfloat))
        self.mix = nn.Linear(dim, dim)

    def forward(self, x):  # [B, H, W, C]
        x_ft = torch.fft.rfft2(x, dim=(1, 2), norm="ortho")
        kept = torch.masked_select(x_ft, self.mask[None, :, :, None]).reshape(-1, self.tokens, x.shape[-1])
        out = torch.zeros_like(x_ft)
        out[:, self.mask, :] = kept * self.filter
        return self.mix(torch.fft.irfft2(out, s=x.shape[1:3], dim=(1, 2), norm="ortho"))


class ReFNOLike(nn.Module):
    """A model owning a positional embedding [H, W, C] around a block whose own parameter has a
    leading 1 (per-sample copies of it must not be used inside the model's own rule)."""

    def __init__(self, channels=3, size=8, dim=4):
        super().__init__()
        self.encoder = nn.Linear(channels, dim)
        self.pos_embedding = nn.Parameter(0.1 * torch.randn(size, size, dim))
        self.block = MaskedSpectralFilter(size, dim)
        self.decoder = nn.Linear(dim, channels)

    def forward(self, x):
        h = self.encoder(x) + self.pos_embedding
        return self.decoder(h + self.block(h))


def refno_like(channels=3) -> nn.Module:
    return ChannelsLast(ReFNOLike(channels))
