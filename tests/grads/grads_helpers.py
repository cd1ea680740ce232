"""Small models and an independent reference (a per-sample autograd loop) for the grads tests."""

from __future__ import annotations

import torch
from torch import nn

from gradlake.grads import Projector
from gradlake.grads.module_rules import ModuleGrads
from gradlake.grads.tensors import flat, parameter

IDENTITY = Projector(seed=0, k_in=10**6, k_out=10**6, k_dense=10**9)


def loop_grads(model: nn.Module, inputs: torch.Tensor, cotangent: torch.Tensor) -> torch.Tensor:
    """[B, p]: for each sample alone, autograd of <model(x_b), r_b> w.r.t. every parameter
    (a complex parameter's gradient as (real, imaginary) pairs)."""
    params = list(model.parameters())
    rows = []
    for b in range(inputs.shape[0]):
        out = model(inputs[b:b + 1])
        grads = torch.autograd.grad((out * cotangent[b:b + 1]).sum(), params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        rows.append(torch.cat([(torch.view_as_real(g) if g.is_complex() else g).reshape(-1) for g in grads]))
    return torch.stack(rows)


def module_loop(module: nn.Module, names, x: torch.Tensor, kwargs: dict, delta: torch.Tensor
                ) -> dict[str, torch.Tensor]:
    """{name: [B, numel]}: autograd of <module(x_b), δ_b> w.r.t. the named parameters, one sample at a time."""
    rows = {n: [] for n in names}
    for b in range(x.shape[0]):
        grads = torch.autograd.grad((module(x[b:b + 1], **kwargs) * delta[b:b + 1]).sum(),
                                    [parameter(module, n) for n in names], allow_unused=True)
        for n, g in zip(names, grads):
            rows[n].append(torch.zeros_like(parameter(module, n)) if g is None else g)
    return {n: flat(torch.stack(r), x.shape[0]) for n, r in rows.items()}


def rule_against_loop(module: nn.Module, x: torch.Tensor, kwargs: dict, path: str) -> dict[str, torch.Tensor]:
    """Asserts that ModuleGrads takes the rule ``path`` for ``module`` on ``x`` and gives the per-sample
    loop's gradients (within 1e-5 relative, per parameter); returns the loop's."""
    with torch.no_grad():
        delta = torch.randn(module(x, **kwargs).shape)
    names = tuple(n for n, _ in module.named_parameters())
    grads = ModuleGrads(module, names, path)
    got = grads((x,), kwargs, delta)
    assert grads.path() == path
    want = module_loop(module, names, x, kwargs, delta)
    for n in names:  # (a layer's weights the index does not pick: zero for both)
        assert float((got[n] - want[n]).norm()) <= 1e-5 * float(want[n].norm()) + 1e-12, n
    return want


def fixed_cotangents(seed: int = 1, probes: int = 0):
    """A cotangent function: one that depends on the prediction ("C") and random ones ("V")."""

    def cotangents(pred: torch.Tensor) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        out = {"C": torch.tanh(pred) + torch.randn(pred.shape, generator=gen)}
        if probes:
            out["V"] = torch.randn((pred.shape[0], probes, *pred.shape[1:]), generator=gen)
        return out

    return cotangents


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


class TokenBlock(nn.Module):
    """Linear on [B, D] and [B, T, D] tokens, attention projections, RMSNorm, and a
    positional embedding owned by a non-leaf module (through the ruled path)."""

    def __init__(self, d_in: int = 3, tokens: int = 5, dim: int = 8):
        super().__init__()
        self.embed = nn.Linear(d_in, dim)
        self.pos = nn.Parameter(0.1 * torch.randn(1, tokens, dim))
        self.norm = nn.RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim, bias=False)
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, d_in]
        h = self.embed(x) + self.pos
        q, k, v = self.qkv(self.norm(h)).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(1, 2) / 8**0.5, dim=-1)
        h = h + self.out(attn @ v)
        return self.head(self.ln(h))


class ConvNet2d(nn.Module):
    """Conv2d with circular and zero padding, strides 1 and 2, dilation, a separate
    CircularPad2d, GroupNorm, and a grouped conv and a transposed conv (ruled path)."""

    def __init__(self, c: int = 3):
        super().__init__()
        self.c1 = nn.Conv2d(c, 6, 3, padding=1, padding_mode="circular")
        self.gn = nn.GroupNorm(2, 6)
        self.c2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.pad = nn.CircularPad2d(2)
        self.c3 = nn.Conv2d(8, 8, 3, dilation=2, bias=False)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.c4 = nn.Conv2d(8, 4, 3, stride=2, padding=1, padding_mode="circular")
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.c5 = nn.Conv2d(4, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.gn(self.c1(x)))
        h = torch.relu(self.c2(h))
        h = torch.tanh(self.c3(self.pad(h)))
        h = self.grouped(h)
        return self.c5(self.up(torch.tanh(self.c4(h))))


class ConvNet1d(nn.Module):
    """Conv1d stride 1 and 2, zero and circular padding, and a Linear on [B, D]."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 5, padding=2, padding_mode="circular")
        self.c2 = nn.Conv1d(4, 5, 3, stride=2, padding=1)
        self.c3 = nn.Conv3d(1, 2, 3, stride=2, padding=1)
        self.fc = nn.Linear(5 * 6 + 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, 2, 12]
        h = self.c2(torch.tanh(self.c1(x))).flatten(1)
        cube = x[:, :1, :8].reshape(-1, 1, 2, 2, 2).repeat(1, 1, 2, 2, 2)
        g = self.c3(cube).mean(dim=(2, 3, 4)).repeat(1, 4)
        return self.fc(torch.cat([h, g], dim=1))


class DataDependent(nn.Module):
    """A gain used inside a non-linearity, behind a branch on the data (what vmap cannot run: the
    loop rule), after a Linear; on [B, X, C]."""

    def __init__(self, channels: int = 3):
        super().__init__()
        self.lift = nn.Linear(channels, channels)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, channels))

    def forward(self, x):
        h = self.lift(x)
        gain = self.gain if float(h.abs().max()) < 1e3 else self.gain.clamp(max=1.0)
        return torch.tanh(h * gain) * gain
