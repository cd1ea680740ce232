"""Per-layer rows by gradient energy: deterministic, recorded in the spec, more accurate at equal k."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from gradlake import models
from gradlake.errors import InputError
from gradlake.grads import Projector, compute
from gradlake.grads.allocation import allocate, block_statistics, calibrate
from gradlake.grads.capture_plan import plan


def _batch(n: int, seed: int, resolution: int = 16):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, resolution, resolution, generator=gen)
    return x, torch.roll(x, 1, dims=-1) + 0.1 * torch.randn(x.shape, generator=gen)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return models.build("unet", "tiny", channels=4, resolution=16)


@pytest.fixture(scope="module")
def calibrated(unet):
    x, y = _batch(4, seed=1)
    return calibrate(unet, x, y, k_total=600, seed=3, rows=[10, 11, 12, 13])


def test_calibration_is_deterministic_and_reproducible_from_its_record(unet, calibrated):
    x, y = _batch(4, seed=1)
    again = calibrate(unet, x, y, k_total=600, seed=3, rows=[10, 11, 12, 13])
    assert json.dumps(again.spec(unet), sort_keys=True) == json.dumps(calibrated.spec(unet), sort_keys=True)
    record = calibrated.calibration
    assert record["rows"] == [10, 11, 12, 13] and record["samples"] == 4
    # The recorded (rounded) statistics alone give the recorded rows.
    assert allocate(plan(unet), record["statistics"], 600) == calibrated.dims
    assert calibrated.k(unet) <= 600
    assert calibrated.k(unet) > 0.9 * 600  # the budget is used, not left over


def test_spec_round_trips_and_a_reopened_projector_projects_identically(unet, calibrated):
    spec = json.loads(json.dumps(calibrated.spec(unet)))
    assert spec["allocation"] == "energy" and spec["k_total"] == 600
    reopened = Projector.from_spec(spec)
    assert reopened.spec(unet) == spec
    x, y = _batch(3, seed=2)
    a = compute(unet, x, y, ("C",), calibrated)["C"]
    b = compute(unet, x, y, ("C",), reopened)["C"]
    assert torch.equal(a, b)
    blocks = {blk["name"]: blk for blk in spec["parameters"]}
    for layer, (k_out, k_in) in spec["dims"]["layers"].items():
        weight = blocks[f"{layer}.weight"]
        assert (weight["k_out"], weight["k_in"]) == (min(k_out, weight["d_out"]), min(k_in, weight["d_in"]))


@pytest.mark.parametrize("conv", ["full", "separable"])
def test_capture_with_allocated_rows_equals_projecting_the_full_gradient(unet, calibrated, conv):
    projector = Projector(seed=3, conv=conv, allocation="energy", k_total=600, dims=calibrated.dims)
    x, y = _batch(3, seed=2)
    full = compute(unet, x, y, ("C",), None)["C"]
    captured = compute(unet, x, y, ("C",), projector)["C"]
    expected = projector.apply(unet, full)
    assert captured.shape == (3, projector.k(unet))
    assert float((captured - expected).norm() / expected.norm()) < 1e-4


def test_energy_allocation_beats_uniform_at_equal_k(unet):
    x, y = _batch(4, seed=1)  # calibration samples
    xe, ye = _batch(12, seed=5)  # evaluation samples (different)
    uniform = Projector(seed=0, k_in=4, k_out=4)
    k = uniform.k(unet)
    energy = calibrate(unet, x, y, k_total=k, seed=0)
    assert energy.k(unet) <= k
    full = compute(unet, xe, ye, ("C",), None)["C"].double()
    gram = full @ full.T

    def error(projector):
        phi = projector.apply(unet, full.float()).double()
        return float((phi @ phi.T - gram).norm() / gram.norm())

    uniform_err = statistics.median(error(Projector(seed=s, k_in=4, k_out=4)) for s in range(5))
    energy_err = statistics.median(error(Projector(seed=s, allocation="energy", k_total=k, dims=energy.dims))
                                   for s in range(5))
    assert energy_err < 0.7 * uniform_err, (energy_err, uniform_err)


def test_a_block_holding_the_energy_gets_the_identity():
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 40), torch.nn.LayerNorm(40))
    model_plan = plan(model)
    stats = {"layers": {"0": {"energy": 1.0, "w4": 1.0, "q": 1.0, "bias_w4": 1.0},
                        "1": {"energy": 1e-3, "w4": 1e-6, "q": 1e-6, "bias_w4": 1e-6}},
             "dense": {"2.weight": {"energy": 1e-3, "w4": 1e-6}, "2.bias": {"energy": 0.0, "w4": 0.0}}}
    dims = allocate(model_plan, stats, 60)
    assert dims["layers"]["0"] == [5, 6]  # 30 + 5 (bias) coordinates: exact
    assert dims["dense"]["2.bias"] == 1  # no energy: one row
    used = sum(a * b + a for a, b in dims["layers"].values()) + sum(dims["dense"].values())
    assert used <= 60
    with pytest.raises(InputError, match="below"):
        allocate(model_plan, stats, 4)
    with pytest.raises(InputError, match="statistics"):
        allocate(model_plan, {"layers": {}, "dense": {}}, 60)


def test_block_statistics_of_a_rank_one_gradient():
    model = torch.nn.Linear(3, 2, bias=False)
    g = torch.tensor([[1.0, 2.0, 0.0, 2.0, 4.0, 0.0]])  # G = [1, 2]ᵀ [1, 2, 0]: rank one, ‖G‖² = 25
    stats = block_statistics(model, g)["layers"][""]
    assert stats == {"energy": 25.0, "w4": 625.0, "q": 625.0}  # ‖GGᵀ‖² = ‖G‖⁴ for rank one


def test_bad_allocation_settings_are_refused(unet, calibrated):
    with pytest.raises(InputError, match="allocation"):
        Projector(allocation="greedy")
    with pytest.raises(InputError, match="k_total"):
        Projector(allocation="energy", dims=calibrated.dims)
    with pytest.raises(InputError, match="dims"):
        Projector(allocation="energy", k_total=10, dims={"layers": {"a": [0, 1]}, "dense": {}})
    with pytest.raises(InputError, match="only with"):
        Projector(k_total=10)
    other = models.build("vit", "tiny", channels=4, resolution=16)
    with pytest.raises(InputError, match="another model"):
        calibrated.k(other)
