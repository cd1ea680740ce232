"""Loss and residual observables against independent references (numpy, torch.autograd)."""

import numpy as np
import pytest
import torch

from gradlake import physics
from gradlake.errors import InputError

EULER = physics.EULER_CHANNELS
NS = physics.NS_CHANNELS


def _batch(channels, seed=0, b=3, n=8):
    g = torch.Generator().manual_seed(seed)
    shape = (b, len(channels), n, n)
    inputs = 1.0 + torch.rand(shape, generator=g, dtype=torch.float64)  # positive totals
    targets = inputs + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
    pred = inputs + 0.2 * torch.randn(shape, generator=g, dtype=torch.float64)
    return pred, inputs, targets


def test_scaled_mse_matches_a_direct_numpy_formula():
    pred, _, target = _batch(EULER)
    p, y = pred.numpy(), target.numpy()
    expected = np.zeros(p.shape[0])
    for b in range(p.shape[0]):
        for c in range(p.shape[1]):
            rms = np.sqrt(np.mean(y[b, c] ** 2))
            expected[b] += np.mean((p[b, c] - y[b, c]) ** 2 / (rms + 1e-6)) / p.shape[1]
    np.testing.assert_allclose(physics.scaled_mse(pred, target).numpy(), expected, rtol=1e-12)


def test_mass_and_energy_scalars_match_numpy():
    pred, inputs, targets = _batch(EULER)
    p, x = pred.numpy(), inputs.numpy()
    for name, c in (("M", 0), ("E", 3)):
        drift = (p[:, c].sum((1, 2)) - x[:, c].sum((1, 2))) / x[:, c].sum((1, 2))
        np.testing.assert_allclose(physics.observable(name, pred, inputs, targets, EULER).numpy(), 0.5 * drift**2)
    pred, inputs, targets = _batch(NS)
    kin = lambda v: 0.5 * (v**2).sum((1, 2, 3))  # noqa: E731
    drift = (kin(pred.numpy()) - kin(inputs.numpy())) / kin(inputs.numpy())
    np.testing.assert_allclose(physics.observable("E", pred, inputs, targets, NS).numpy(), 0.5 * drift**2)


def _closed_form(name, p, x, y, channels):
    """The residuals' closed forms (the module docstring), in numpy: an independent reference."""
    n_channels, cells = p.shape[1], int(np.prod(p.shape[2:]))
    grid = tuple(range(1, p.ndim - 1))
    r = np.zeros_like(p)
    if name == "C":
        scale = np.sqrt((y ** 2).mean(axis=tuple(range(2, p.ndim)), keepdims=True)) + 1e-6
        return 2 * (p - y) / (scale * n_channels * cells)
    if name == "M" or "E" in channels:
        c = channels.index("rho" if name == "M" else "E")
        total = x[:, c].sum(axis=grid)
        delta = (p[:, c].sum(axis=grid) - total) / total
        r[:, c] = (delta / total).reshape(-1, *[1] * len(grid))
        return r
    v = [channels.index("vx"), channels.index("vy")]
    k_in = 0.5 * (x[:, v] ** 2).sum(axis=tuple(range(1, p.ndim)))
    k_out = 0.5 * (p[:, v] ** 2).sum(axis=tuple(range(1, p.ndim)))
    r[:, v] = ((k_out - k_in) / k_in / k_in).reshape(-1, 1, *[1] * len(grid)) * p[:, v]
    return r


@pytest.mark.parametrize("channels,names", [(EULER, "CME"), (NS, "CE")])
def test_each_residual_matches_its_closed_form(channels, names):
    pred, inputs, targets = _batch(channels, seed=4)
    res = physics.residuals(pred, inputs, targets, tuple(names), channels)
    for name in names:
        assert res[name].shape == pred.shape and not res[name].requires_grad
        expected = _closed_form(name, pred.numpy(), inputs.numpy(), targets.numpy(), channels)
        np.testing.assert_allclose(res[name].numpy(), expected, rtol=1e-9, atol=1e-15)
        assert np.abs(expected).max() > 0
    if "M" in names:  # placed on the density channel only
        assert torch.count_nonzero(res["M"][:, 1:]) == 0 and torch.count_nonzero(res["E"][:, :3]) == 0


@pytest.mark.parametrize("grid", [(12,), (6, 5), (4, 3, 5)])
def test_loss_and_residuals_work_on_any_number_of_grid_dimensions(grid):
    g = torch.Generator().manual_seed(1)
    shape = (2, len(EULER), *grid)
    inputs = 1.0 + torch.rand(shape, generator=g, dtype=torch.float64)
    targets, pred = inputs + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64), inputs * 1.1
    for name in "CME":
        res = physics.residuals(pred, inputs, targets, (name,), EULER)[name]
        np.testing.assert_allclose(res.numpy(), _closed_form(name, pred.numpy(), inputs.numpy(), targets.numpy(), EULER),
                                   rtol=1e-9, atol=1e-15)


def test_mass_is_unavailable_for_navier_stokes():
    assert physics.available_observables(NS) == ("C", "E", "V")
    assert physics.available_observables(EULER) == ("C", "M", "E", "V")
    pred, inputs, targets = _batch(NS)
    with pytest.raises(InputError, match=r"'M'.*'vx', 'vy'"):
        physics.residuals(pred, inputs, targets, ("C", "M"), NS)


def test_probes_are_signs_and_independent_of_batch_composition():
    pred, inputs, targets = _batch(EULER, b=5)
    rows = np.array([7, 3, 11, 0, 42])
    whole = physics.residuals(pred, inputs, targets, ("V",), EULER, sample_ids=rows, probes=3, seed=9)["V"]
    assert whole.shape == (5, 3, *pred.shape[1:])
    assert set(whole.unique().tolist()) == {-1.0, 1.0}
    # Another batching, another order: each sample gets the same probes.
    order = [4, 1, 3]
    part = physics.residuals(pred[order], inputs[order], targets[order], ("V",), EULER,
                             sample_ids=rows[order], probes=3, seed=9)["V"]
    torch.testing.assert_close(part, whole[order])
    # Different samples, probes and seeds differ; balanced signs.
    assert not torch.equal(whole[0, 0], whole[1, 0]) and not torch.equal(whole[0, 0], whole[0, 1])
    other_seed = physics.residuals(pred, inputs, targets, ("V",), EULER, sample_ids=rows, probes=3, seed=10)["V"]
    assert not torch.equal(other_seed, whole)
    assert abs(whole.mean().item()) < 0.05


def test_bad_shapes_and_observables_are_input_errors():
    pred, inputs, targets = _batch(EULER)
    with pytest.raises(InputError, match="expected pred"):
        physics.residuals(pred, inputs, targets, ("C",), NS)
    with pytest.raises(InputError, match="unknown"):
        physics.residuals(pred, inputs, targets, ("X",), EULER)
    with pytest.raises(InputError, match="sample_ids"):
        physics.residuals(pred, inputs, targets, ("V",), EULER, sample_ids=[1])
