"""The sign convention of H, against a real gradient step on a model (README: "Sign convention").

H_AB(i, j) = φ_{A,i}ᵀ (η̃ + λI)⁻¹ φ_{B,j}, computed by the code that computes it everywhere
(grads.compute for φ, reduce.metric for η̃ and (η̃ + λI)⁻¹). A descent step on sample j's
observable B, Δθ = −ε (η + λI)⁻¹ g_{B,j}, must change O_A at sample i by −ε H_AB(i, j):
H > 0 (red) means the step lowers the response's observable.
"""

from __future__ import annotations

import numpy as np
import torch

from gradlake import models, physics
from gradlake.grads import compute
from gradlake.reduce.metric import Metric, Moments

CHANNELS = ("rho", "rho_vx", "rho_vy", "E")


def test_positive_h_means_a_step_on_j_lowers_the_response():
    torch.manual_seed(0)
    config = models.config("vit", "tiny", 4, 8, dim=4, depth=1, heads=1, patch=4)
    model = models.from_config(config).double()
    gen = torch.Generator().manual_seed(1)
    x = 1.0 + torch.rand(6, 4, 8, 8, generator=gen, dtype=torch.float64)
    with torch.no_grad():  # targets above the prediction for some samples, below it for others:
        shift = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0], dtype=torch.float64).view(6, 1, 1, 1)
        y = model(x) + shift * (0.5 + torch.rand(6, 4, 8, 8, generator=gen, dtype=torch.float64))
    phis = compute(model.float(), x.float(), y.float(), observables=("C", "M", "V"), projector=None,
                   channels=CHANNELS, sample_ids=np.arange(6), probes=4)
    model.double()
    phis = {name: value.double().numpy() for name, value in phis.items()}
    params = list(model.parameters())
    # φ_{A,i} is the gradient of O_A at sample i, in the order of model.parameters().
    pred = model(x[:1])
    grad = torch.autograd.grad(physics.observable("C", pred, x[:1], y[:1], CHANNELS).sum(), params)
    np.testing.assert_allclose(phis["C"][0], torch.cat([g.flatten() for g in grad]).numpy(),
                               rtol=1e-3, atol=1e-6 * np.abs(phis["C"][0]).max())

    damping = 1e-3
    moments = Moments(phis["V"].shape[-1])
    moments.add(phis["V"])
    inverse = Metric.from_moments(moments).inverse(damping)
    checked = {1: 0, -1: 0}
    for pair in ("CC", "MC", "CM"):
        a, b = pair
        h = phis[a] @ inverse @ phis[b].T  # [i, j]
        for i, j in [(0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 0)]:
            eps = 1e-3 / max(abs(h[i, j]), 1e-12)
            step = torch.from_numpy(-eps * (inverse @ phis[b][j]))
            with torch.no_grad():
                before = physics.observable(a, model(x[i:i + 1]), x[i:i + 1], y[i:i + 1], CHANNELS).item()
                offset = 0
                for p in params:
                    p += step[offset:offset + p.numel()].view_as(p)
                    offset += p.numel()
                after = physics.observable(a, model(x[i:i + 1]), x[i:i + 1], y[i:i + 1], CHANNELS).item()
                offset = 0
                for p in params:
                    p -= step[offset:offset + p.numel()].view_as(p)
                    offset += p.numel()
            change = (after - before) / eps
            assert np.sign(change) == -np.sign(h[i, j]), (pair, i, j, change, h[i, j])
            np.testing.assert_allclose(change, -h[i, j], rtol=0.05)
            checked[int(np.sign(h[i, j]))] += 1
    assert checked[1] and checked[-1]  # both signs occurred
