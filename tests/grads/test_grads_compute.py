"""compute() on the project's models and observables."""

from __future__ import annotations

import pytest
import torch
from grads_helpers import IDENTITY, rel_err

from gradlake import models, physics
from gradlake.errors import InputError
from gradlake.grads import Projector, compute

EULER = physics.EULER_CHANNELS


def _setup(name, batch=3, resolution=16, seed=0):
    torch.manual_seed(seed)
    model = models.build(name, "tiny", channels=4, resolution=resolution)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(batch, 4, resolution, resolution, generator=gen) + 0.5
    y = x + 0.1 * torch.randn(x.shape, generator=gen)
    return model, x, y


def _loss_grads(model, x, y):
    """Per-sample autograd loop over the sample's own scaled-MSE loss."""
    rows = []
    for b in range(x.shape[0]):
        loss = physics.scaled_mse(model(x[b:b + 1]), y[b:b + 1]).sum()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))]))
    return torch.stack(rows)


@pytest.mark.parametrize("name", ["unet", "vit"])
def test_phi_C_is_the_gradient_of_the_samples_own_loss(name):
    model, x, y = _setup(name)
    ref = _loss_grads(model, x, y)
    phi, loss = compute(model, x, y, ("C",), projector=IDENTITY, return_loss=True)
    assert phi["C"].dtype == torch.float32 and phi["C"].shape == ref.shape
    assert rel_err(phi["C"], ref) < 1e-5
    torch.testing.assert_close(loss, physics.scaled_mse(model(x), y).detach())
    full = compute(model, x, y, ("C",), projector=None)
    assert rel_err(full["C"], ref) < 1e-5


def test_all_observables_share_one_forward_and_match_their_residuals():
    model, x, y = _setup("unet", batch=2)
    obs = ("C", "M", "E", "V")
    phi = compute(model, x, y, obs, projector=IDENTITY, channels=EULER, sample_ids=[7, 3], probes=2)
    full = compute(model, x, y, obs, projector=None, channels=EULER, sample_ids=[7, 3], probes=2)
    assert list(phi) == list(obs) and phi["V"].shape == (2, 2, IDENTITY.k(model))
    for name in obs:
        assert rel_err(phi[name], full[name]) < 1e-5, name
    # "V" is keyed by sample id, not batch position: sample 3 alone gives the same rows.
    alone = compute(model, x[1:], y[1:], ("V",), projector=Projector(k_in=8, k_out=8), channels=EULER,
                    sample_ids=[3], probes=2)
    both = compute(model, x, y, ("V",), projector=Projector(k_in=8, k_out=8), channels=EULER,
                   sample_ids=[7, 3], probes=2)
    assert rel_err(alone["V"][0], both["V"][1]) < 1e-5


def test_model_modes_are_restored():
    model, x, y = _setup("vit", batch=2)
    model.train()
    compute(model, x, y, projector=Projector(k_in=2, k_out=2))
    assert all(m.training for m in model.modules())


def test_bad_settings_are_refused_before_work():
    model, x, y = _setup("vit", batch=2)
    with pytest.raises(InputError, match="'M'"):
        compute(model, x, y, ("M",), channels=("vx", "vy", "a", "b"))
    with pytest.raises(InputError, match="sample_ids"):
        compute(model, x, y, ("V",), sample_ids=[1, 2, 3])
    with pytest.raises(InputError, match="precision"):
        compute(model, x, y, precision="float64")
    with pytest.raises(InputError, match="inputs/targets"):
        compute(model, x, y[:1])
    with pytest.raises(InputError, match="projector"):
        compute(model, x, y, projector={"seed": 0})
