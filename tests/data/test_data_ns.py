"""Navier–Stokes generator physics: Taylor–Green decay, the advection term, invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradlake.data import ns


def grid_xy(resolution):
    centres = (np.arange(resolution) + 0.5) / resolution
    return np.meshgrid(centres, centres, indexing="ij")  # y, x


@pytest.mark.parametrize("mx,my", [(1, 1), (2, 1)])
def test_taylor_green_decay(mx, my):
    """psi = sin(a x) sin(b y) is a steady Euler flow; viscosity decays it as
    exp(-nu (a^2 + b^2) t), i.e. exp(-2 nu k^2 t) for the classic a = b = k."""
    y, x = grid_xy(32)
    a, b = 2 * math.pi * mx, 2 * math.pi * my
    vx = b * np.sin(a * x) * np.cos(b * y)  # d psi / dy
    vy = -a * np.cos(a * x) * np.sin(b * y)  # -d psi / dx
    velocity = torch.from_numpy(np.stack([vx, vy]) / max(a, b))[None]
    nu, times = 0.01, [0.0, 0.1, 0.25]
    out = ns.solve(velocity, times, viscosity=nu)[0].numpy()
    for k, t in enumerate(times):
        expected = velocity[0].numpy() * math.exp(-nu * (a * a + b * b) * t)
        np.testing.assert_allclose(out[k], expected, rtol=0, atol=1e-10)


def test_advection_term_against_analytic_two_mode_flow():
    """psi = A sin(2 pi x) + B cos(4 pi y): u . grad w = 96 pi^4 A B cos(2 pi x) sin(4 pi y)."""
    y, x = grid_xy(32)
    big_a, big_b = 0.7, 0.3
    w = 4 * math.pi ** 2 * big_a * np.sin(2 * math.pi * x) + 16 * math.pi ** 2 * big_b * np.cos(4 * math.pi * y)
    grid = ns.Grid(32, 32)
    tendency = torch.fft.irfft2(grid.advection(torch.fft.rfft2(torch.from_numpy(w)[None])), s=(32, 32))[0]
    expected = -96 * math.pi ** 4 * big_a * big_b * np.cos(2 * math.pi * x) * np.sin(4 * math.pi * y)
    np.testing.assert_allclose(tendency.numpy(), expected, rtol=0, atol=1e-9 * np.abs(expected).max())


def test_inviscid_energy_conserved_and_divergence_free():
    params = ns.sample_params("bb", seed=1, index=0)
    velocity = torch.from_numpy(ns.initial_velocity(params, 32))[None]
    out = ns.solve(velocity, [0.0, 0.1, 0.2], viscosity=0.0)[0]
    energy = (out ** 2).sum(dim=(1, 2, 3))
    assert torch.abs(energy / energy[0] - 1).max() < 1e-4
    assert torch.abs(out[-1] - out[0]).max() > 0.05  # the flow moved
    grid = ns.Grid(32, 32)
    hat = torch.fft.rfft2(out)
    divergence = torch.fft.irfft2(1j * grid.kx * hat[:, 0] + 1j * grid.ky * hat[:, 1], s=(32, 32))
    assert divergence.abs().max() < 1e-10


def test_viscous_energy_decays_monotonically():
    out, _ = ns.simulate("gauss", [0, 1], 32, [0.0, 0.05, 0.1, 0.15], viscosity=1e-2)
    energy = (out.astype(np.float64) ** 2).sum(axis=(2, 3, 4))
    assert (np.diff(energy, axis=1) < 0).all()


@pytest.mark.parametrize("class_name", ns.CLASSES)
def test_initial_conditions(class_name):
    params = ns.sample_params(class_name, seed=0, index=3)
    assert params == ns.sample_params(class_name, seed=0, index=3) != ns.sample_params(class_name, 0, 4)
    coarse, fine = ns.initial_velocity(params, 32), ns.initial_velocity(params, 64)
    assert abs(np.linalg.norm(fine, axis=0).max() - 1) < 1e-12
    assert np.abs(coarse.mean(axis=(1, 2))).max() < 1e-12
