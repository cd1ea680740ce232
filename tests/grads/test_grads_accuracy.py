"""Whole tiny UNet and ViT: projected inner products against exact ones.

The numbers for several k (and the iid-JL prediction) come from
``benchmarks/bench_grads.py --study``; this test checks the properties they rest on.
"""

from __future__ import annotations

import pytest
import torch

from gradlake import models
from gradlake.grads import Projector, compute


def _batch(n, resolution):
    """Zero-mean smooth fields and shifted targets (gradients that differ between samples)."""
    gen = torch.Generator().manual_seed(1)
    grid = torch.linspace(0, 2 * torch.pi, resolution + 1)[:-1]
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    k = torch.randint(1, 4, (2, n, 4, 1, 1), generator=gen)
    phase = torch.rand((n, 4, 1, 1), generator=gen)
    x = torch.sin(k[0] * xx + k[1] * yy + 2 * torch.pi * phase)
    return x, torch.roll(x, 1, dims=-1)


@pytest.mark.parametrize("name", ["unet", "vit"])
def test_projected_inner_products_are_unbiased_and_sharpen_with_k(name):
    torch.manual_seed(0)
    model = models.build(name, "tiny", channels=4, resolution=16)
    x, y = _batch(8, 16)
    full = compute(model, x, y, ("C",), None)["C"].double()
    gram = full @ full.T

    def grams(k, seeds):
        out = []
        for seed in seeds:
            phi = Projector(seed=seed, k_in=k, k_out=k).apply(model, full.float()).double()
            out.append(phi @ phi.T)
        return out

    # compute() is the projection of the full gradient (the capture path, checked once here).
    phi = compute(model, x, y, ("C",), Projector(seed=0, k_in=4, k_out=4))["C"].double()
    assert torch.allclose(phi @ phi.T, grams(4, [0])[0], rtol=1e-4, atol=1e-6 * float(gram.abs().max()))

    def rel(a):
        return float((a - gram).norm() / gram.norm())

    seeds = range(12)
    coarse, fine = grams(4, seeds), grams(16, seeds)
    mean_error = {4: sum(map(rel, coarse)) / len(seeds), 16: sum(map(rel, fine)) / len(seeds)}
    # Unbiased: averaging 12 independent projections shrinks the error about sqrt(12)-fold.
    assert rel(sum(coarse) / len(seeds)) < 0.5 * mean_error[4]
    assert rel(sum(fine) / len(seeds)) < 0.5 * mean_error[16]
    # More rows per factor, smaller error (iid JL would give sqrt(4) = 2x from k 4 -> 16).
    assert mean_error[16] < 0.75 * mean_error[4]
    assert mean_error[16] < 0.3
