"""2D incompressible Navier–Stokes on the periodic unit square, batched in torch.

Vorticity form, pseudo-spectral: w_t + u . grad w = nu lap w, u = (d psi/dy, -d psi/dx),
-lap psi = w. The advection term is computed in physical space and dealiased with the
2/3 rule; viscosity is integrated exactly by an integrating factor inside classical RK4
(IF-RK4). Each trajectory takes its own CFL step, clipped to land on the output times
(as in the Euler generator). The mean velocity is zero (it is not carried by w).

Stored channels: velocity (vx, vy); arrays [batch, channel, y, x], x the last axis.

Initial conditions (classes), in the spirit of PDEGym's NS-BB, NS-Gauss, NS-Sines; each is
scaled to a peak speed of 1:
  bb     brownian-bridge-like smooth random field: stream function with Gaussian Fourier
         coefficients decaying like |m|^-3 over integer wavenumbers 1 <= |m| <= 12
  gauss  sum of 3..8 Gaussian vortices (random centre, sign, strength, width 0.04..0.1)
  sines  a sum of 2..6 random sinusoidal stream-function modes with |m_x|, |m_y| <= 4
Modes beyond the grid's dealiased band are dropped, so the same trajectory at a finer
resolution is the same flow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from gradlake.data.euler import trajectory_rng
from gradlake.data.timestepping import march, output_times
from gradlake.errors import GradlakeError, InputError

CHANNELS = ("vx", "vy")
CLASSES = ("bb", "gauss", "sines")
DEFAULT_CFL = 0.5
DEFAULT_OUTPUT_DT = 0.1
DEFAULT_VISCOSITY = 1e-3


class Grid:
    """Wavenumbers (2 pi m) of an H x W periodic grid for rfft2 layouts, and the 2/3 mask."""

    def __init__(self, height: int, width: int, device="cpu", dtype=torch.float64):
        my = torch.fft.fftfreq(height, 1.0 / height, dtype=dtype, device=device)
        mx = torch.fft.rfftfreq(width, 1.0 / width, dtype=dtype, device=device)
        self.ky = (2 * math.pi * my)[:, None]
        self.kx = (2 * math.pi * mx)[None, :]
        self.k2 = self.kx ** 2 + self.ky ** 2
        self.inv_k2 = torch.where(self.k2 > 0, 1.0 / self.k2.clamp_min(1e-30), torch.zeros_like(self.k2))
        self.dealias = ((my.abs()[:, None] < height / 3) & (mx.abs()[None, :] < width / 3)).to(dtype)
        self.shape = (height, width)

    def velocity(self, w_hat: torch.Tensor) -> torch.Tensor:
        """Velocity [B, 2, H, W] of vorticity w_hat [B, H, W//2+1]."""
        psi_hat = w_hat * self.inv_k2
        vx = torch.fft.irfft2(1j * self.ky * psi_hat, s=self.shape)
        vy = torch.fft.irfft2(-1j * self.kx * psi_hat, s=self.shape)
        return torch.stack((vx, vy), 1)

    def vorticity(self, velocity: torch.Tensor) -> torch.Tensor:
        """w_hat = i kx vy_hat - i ky vx_hat of velocity [B, 2, H, W]."""
        hat = torch.fft.rfft2(velocity)
        return 1j * self.kx * hat[:, 1] - 1j * self.ky * hat[:, 0]

    def advection(self, w_hat: torch.Tensor) -> torch.Tensor:
        """-(u . grad w)^ , dealiased."""
        w_hat = w_hat * self.dealias
        vel = self.velocity(w_hat)
        wx = torch.fft.irfft2(1j * self.kx * w_hat, s=self.shape)
        wy = torch.fft.irfft2(1j * self.ky * w_hat, s=self.shape)
        return -torch.fft.rfft2(vel[:, 0] * wx + vel[:, 1] * wy) * self.dealias


def stable_dt(velocity: torch.Tensor, cfl: float) -> torch.Tensor:
    """Per-trajectory CFL step cfl / (max|vx| / dx + max|vy| / dy), shape [B]."""
    height, width = velocity.shape[-2:]
    speed = velocity.abs().amax(dim=(2, 3))  # [B, 2]
    return cfl / (speed[:, 0] * width + speed[:, 1] * height).clamp_min(1e-12)


def _if_rk4(grid: Grid, w_hat: torch.Tensor, dt: torch.Tensor, viscosity: float) -> torch.Tensor:
    dt = dt.view(-1, 1, 1)
    half = torch.exp(-viscosity * grid.k2 * dt / 2)
    full = half * half
    a = grid.advection(w_hat)
    b = grid.advection(half * (w_hat + dt / 2 * a))
    c = grid.advection(half * w_hat + dt / 2 * b)
    d = grid.advection(full * w_hat + dt * half * c)
    return full * w_hat + dt / 6 * (full * a + 2 * half * (b + c) + d)


def solve(velocity: torch.Tensor, times: Sequence[float], viscosity: float = DEFAULT_VISCOSITY,
          cfl: float = DEFAULT_CFL, on_step=None) -> torch.Tensor:
    """Evolve velocity [B, 2, H, W] (its divergence-free, zero-mean part) on the unit square;
    snapshots [B, T, 2, H, W] at ``times`` (times[0] = 0)."""
    times = output_times(times, "ns")
    if velocity.ndim != 4 or velocity.shape[1] != 2:
        raise InputError(f"ns: expected velocity [B, 2, H, W], got {tuple(velocity.shape)}")
    grid = Grid(*velocity.shape[-2:], device=velocity.device, dtype=velocity.dtype)
    w_hat = grid.vorticity(velocity)

    def advance(state, dt, active):  # state: (vorticity spectrum, its velocity)
        w_hat = torch.where(active.view(-1, 1, 1), _if_rk4(grid, state[0], dt, viscosity), state[0])
        return w_hat, grid.velocity(w_hat)

    def check(state, clock, target):
        if not bool(torch.isfinite(state[1]).all()):
            raise GradlakeError(f"ns: the flow blew up before t = {target:.6g}; lower the CFL number")

    clock = torch.zeros(len(velocity), dtype=velocity.dtype, device=velocity.device)
    return march((w_hat, grid.velocity(w_hat)), times, clock, lambda state: stable_dt(state[1], cfl),
                 advance, snapshot=lambda state: state[1], check=check, on_step=on_step)


# -- initial conditions ------------------------------------------------------------------
def sample_params(class_name: str, seed: int, index: int) -> dict:
    """Random initial-condition parameters of trajectory ``index`` of a class."""
    rng = trajectory_rng(seed, class_name, index)
    if class_name == "bb":
        modes = [(mx, my) for mx in range(0, 13) for my in range(-12, 13)
                 if (mx > 0 or my > 0) and 1 <= math.hypot(mx, my) <= 12]
        coeffs = rng.standard_normal((len(modes), 2))
        scale = np.array([math.hypot(*m) ** -3 for m in modes])
        return {"class": class_name, "modes": [[mx, my, float(a * s), float(b * s)] for (mx, my), (a, b), s
                                               in zip(modes, coeffs, scale)]}
    if class_name == "sines":
        count = int(rng.integers(2, 7))
        modes = []
        while len(modes) < count:
            mx, my = (int(v) for v in rng.integers(-4, 5, 2))
            if mx > 0 or (mx == 0 and my > 0):
                phase = rng.uniform(0, 2 * math.pi)
                amp = rng.uniform(0.5, 1.0)
                modes.append([mx, my, float(amp * math.cos(phase)), float(amp * math.sin(phase))])
        return {"class": class_name, "modes": modes}
    if class_name == "gauss":
        count = int(rng.integers(3, 9))
        vortices = [[float(rng.uniform()), float(rng.uniform()), float(rng.choice([-1, 1]) * rng.uniform(0.5, 1.0)),
                     float(rng.uniform(0.04, 0.1))] for _ in range(count)]
        return {"class": class_name, "vortices": vortices}
    raise InputError(f"ns: unknown class {class_name!r}; expected one of {', '.join(CLASSES)}")


def initial_velocity(params: dict, resolution: int) -> np.ndarray:
    """Velocity [2, R, R] (float64, peak speed 1) of one trajectory's parameters."""
    centres = (np.arange(resolution) + 0.5) / resolution
    y, x = np.meshgrid(centres, centres, indexing="ij")
    grid = Grid(resolution, resolution)
    if "modes" in params:
        limit = resolution / 3
        psi = np.zeros_like(x)
        for mx, my, a, b in params["modes"]:
            if abs(mx) < limit and abs(my) < limit:
                arg = 2 * math.pi * (mx * x + my * y)
                psi += a * np.cos(arg) + b * np.sin(arg)
        w_hat = torch.fft.rfft2(torch.from_numpy(psi)[None]) * grid.k2
    else:
        w = np.zeros_like(x)
        for cx, cy, strength, width in params["vortices"]:
            dx = (x - cx + 0.5) % 1.0 - 0.5  # nearest periodic image
            dy = (y - cy + 0.5) % 1.0 - 0.5
            w += strength * np.exp(-(dx ** 2 + dy ** 2) / (2 * width ** 2))
        w_hat = torch.fft.rfft2(torch.from_numpy(w - w.mean())[None])
    velocity = grid.velocity(w_hat * grid.dealias)[0]
    return (velocity / velocity.norm(dim=0).max()).numpy()


def simulate(class_name: str, indices: Sequence[int], resolution: int, times: Sequence[float],
             seed: int = 0, cfl: float = DEFAULT_CFL, viscosity: float = DEFAULT_VISCOSITY,
             device: str = "cpu", dtype: torch.dtype = torch.float64,
             on_step=None) -> tuple[np.ndarray, list[dict]]:
    """Trajectories ``indices`` of a class, all at once: (float32 [n, T, 2, R, R], params)."""
    params = [sample_params(class_name, seed, i) for i in indices]
    initial = torch.from_numpy(np.stack([initial_velocity(p, resolution) for p in params]))
    out = solve(initial.to(device=device, dtype=dtype), times, viscosity, cfl, on_step)
    return out.to(dtype=torch.float32).cpu().numpy(), params
