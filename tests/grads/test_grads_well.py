"""The Well's own 8 benchmark models (the_well 1.2.0 with the neuraloperator 0.3.0 it pins), at 32²
with 4 channels: full per-example gradients against a per-sample autograd loop, projected φ
against P applied to them, and the projected Gram matrix against the full one at k ≈ 1-7k.

They need a separate environment (the_well pins fsspec==2024.10.0 and neuraloperator 0.3, which
conflict with this project's): ``make test-well`` builds it and runs this file; elsewhere it skips.
"""

from __future__ import annotations

import pytest
import torch
import well_models
from grads_helpers import loop_grads, rel_err

from gradlake.grads import Projector, describe
from gradlake.grads.capture import projected_grads
from gradlake.grads.full import full_grads

REASON = well_models.available()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")
BATCH = 8
# k_in = k_out per model: k between 2.8k and 6.7k coordinates. DilatedResNet (only 3x3 convs,
# 16 -> 16 channels: d_in = 144 per layer) needs 24 (k = 6.1k): at 16 (k = 4.1k) its correlation
# is 0.94-0.97 over projector seeds.
K = {"DilatedResNet": 24}

SPECTRAL = {"FNO", "TFNO"}  # neuraloperator 0.3's SpectralConv: the spectral rule


def _setup(name):
    torch.manual_seed(0)
    model = well_models.build(name)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, well_models.CHANNELS, *well_models.RESOLUTION, generator=gen)
    with torch.no_grad():
        cot = torch.randn(model(x).shape, generator=gen)
    return model, x, cot


def _correlation(a, b):
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("name", well_models.NAMES)
def test_well_model_projected_gram_follows_the_exact_one(name):
    model, x, cot = _setup(name)
    ref = loop_grads(model, x, cot)  # independent: plain autograd, one sample at a time
    full, _ = full_grads(model, x, lambda pred: {"C": cot})
    assert rel_err(full["C"], ref) <= 1e-4
    gram = (ref @ ref.T).double()
    for seed in range(3):
        projector = Projector(seed=seed, k_in=K.get(name, 16), k_out=K.get(name, 16))
        phi, _ = projected_grads(model, x, lambda pred: {"C": cot}, projector)
        assert 1000 <= phi["C"].shape[1] <= 7000
        assert rel_err(phi["C"], projector.apply(model, ref)) <= 1e-4
        projected = phi["C"].double()
        assert _correlation(projected @ projected.T, gram) >= 0.95, seed


@pytest.mark.parametrize("name", sorted(SPECTRAL))
def test_well_spectral_convolutions_take_the_spectral_rule(name):
    model, x, _ = _setup(name)
    rows = {row["module"]: row for row in describe(model, x[:2])}
    conv = rows["model.fno_blocks.convs"]
    assert conv["path"] == "spectral"
    assert any(p.endswith(("weight.0.tensor", "weight.0.core")) for p in conv["parameters"]), conv
