"""Surrogates: shapes, paper sizes, circular-shift equivariance, batch independence, capturable layers."""

import pytest
import torch
from torch import nn

from gradlake import models, physics
from gradlake.errors import InputError


@pytest.mark.parametrize("name", models.MODELS)
@pytest.mark.parametrize("channels", [4, 2])  # compressible Euler, Navier–Stokes
def test_output_shape_matches_input(name, channels):
    torch.manual_seed(0)
    model = models.build(name, "tiny", channels=channels, resolution=32)
    x = torch.randn(3, channels, 32, 32)
    assert model(x).shape == x.shape


def test_paper_presets_match_the_paper_sizes():
    rows = {(r["model"], r["preset"]): r for r in models.preset_table(channels=4, resolution=128)}
    assert abs(rows["unet", "paper"]["parameters"] - 13e6) <= 0.15 * 13e6
    assert abs(rows["vit", "paper"]["parameters"] - 5e6) <= 0.15 * 5e6
    for name in models.MODELS:
        assert 0.5e6 <= rows[name, "small"]["parameters"] <= 2e6
        assert rows[name, "tiny"]["parameters"] < 50_000


@pytest.mark.parametrize("name", models.MODELS)
def test_grid_not_divisible_is_an_input_error(name):
    with pytest.raises(InputError, match="not divisible"):
        models.build(name, "tiny", channels=4, resolution=30)
    model = models.build("unet", "tiny", channels=4, resolution=32)
    with pytest.raises(InputError, match="not divisible"):
        model(torch.randn(1, 4, 34, 34))
    with pytest.raises(InputError, match="unknown setting"):
        models.build(name, "tiny", nonsense=3)


def test_unet_accepts_other_grid_sizes_divisible_by_its_stride():
    model = models.build("unet", "tiny", channels=2, resolution=32)
    assert model(torch.randn(2, 2, 16, 24)).shape == (2, 2, 16, 24)


def test_unet_is_equivariant_to_circular_shifts_by_its_total_stride():
    torch.manual_seed(1)
    model = models.build("unet", "tiny", channels=4, resolution=16).double()
    stride = model.stride
    x = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    out = model(x)
    for shift in [(stride, 0), (0, 2 * stride), (3 * stride, stride)]:
        shifted = model(torch.roll(x, shift, dims=(-2, -1)))
        torch.testing.assert_close(shifted, torch.roll(out, shift, dims=(-2, -1)), rtol=1e-10, atol=1e-10)
    # A shift by less than the stride is not a symmetry of a strided network: the check can fail.
    assert not torch.allclose(model(torch.roll(x, 1, dims=-1)), torch.roll(out, 1, dims=-1), atol=1e-4)


@pytest.mark.parametrize("name", models.MODELS)
def test_a_sample_does_not_depend_on_its_batch_mates(name):
    torch.manual_seed(2)
    model = models.build(name, "tiny", channels=4, resolution=32).double()
    x, y = torch.randn(5, 4, 32, 32, dtype=torch.float64), torch.randn(5, 4, 32, 32, dtype=torch.float64)
    batch_out = model(x)
    batch_loss = physics.scaled_mse(batch_out, y)
    for i in range(5):
        alone = model(x[i : i + 1])
        torch.testing.assert_close(alone, batch_out[i : i + 1], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(physics.scaled_mse(alone, y[i : i + 1]), batch_loss[i : i + 1], rtol=1e-12, atol=1e-12)


def test_batch_independence_check_catches_a_batch_norm():
    model = nn.Sequential(models.build("unet", "tiny", channels=4, resolution=32), nn.BatchNorm2d(4)).double()
    x = torch.randn(4, 4, 32, 32, dtype=torch.float64)
    assert not torch.allclose(model(x[:1]), model(x)[:1], atol=1e-6)


@pytest.mark.parametrize("name", models.MODELS)
def test_every_weight_lives_in_a_capturable_layer(name):
    """Weights only in Conv2d (unpadded), Linear, norms and the positional embedding."""
    from gradlake.models.layers import PositionalEmbedding

    model = models.build(name, "paper", channels=4, resolution=32)
    owners = (nn.Conv2d, nn.Linear, nn.LayerNorm, nn.RMSNorm, PositionalEmbedding)
    covered = 0
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if own:
            assert isinstance(module, owners), type(module)
            covered += sum(p.numel() for p in own)
        assert not isinstance(module, (nn.MultiheadAttention, nn.modules.batchnorm._BatchNorm))
        if isinstance(module, nn.Conv2d):
            assert module.padding == (0, 0) and module.padding_mode == "zeros"
    assert covered == models.parameter_count(model)


def test_config_round_trips_through_json():
    import json

    cfg = models.config("unet", "small", channels=2, resolution=64, width=4)
    again = json.loads(json.dumps(cfg))
    torch.manual_seed(3)
    a = models.from_config(again)
    torch.manual_seed(3)
    b = models.build("unet", "small", channels=2, resolution=64, width=4)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert models.parameter_count(a) < models.parameter_count(models.build("unet", "small", 2, 64))
