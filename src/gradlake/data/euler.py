"""2D compressible Euler (gamma = 1.4) on the periodic unit square, batched in torch.

Finite volumes: MUSCL reconstruction of primitive variables (rho, vx, vy, p) with the
monotonised-central (MC) limiter, HLLC fluxes (Davis wave speeds), SSP-RK3 in time.
The limited half-slopes never leave the range of neighbouring cell values, so
reconstructed density and pressure stay positive; a face where they would not falls back
to first order anyway. Every step is checked for positivity and finiteness.

Time step: each trajectory takes its own CFL step (a [B] tensor of dt's), clipped so it
lands exactly on the output times; trajectories that have reached the next output time
wait (their state is kept bit for bit). So a trajectory's result does not depend on
which other trajectories share its batch, and slow flows are not held to the step of
the fastest one. Fluxes are differenced between periodic neighbours, so mass, momentum
and energy are conserved to round-off.

Channels (conserved): rho, rho_vx, rho_vy, E with E = p / (gamma - 1) + rho |v|^2 / 2.
Arrays are [batch, channel, y, x]; x is the last axis, cell centres at (i + 1/2) / W.

Initial conditions (classes), all with four constant states (rho, vx, vy, p):
  rp    four-quadrant Riemann problems. On the periodic square a "quadrant" is a periodic
        band pattern: interfaces at x0 and x0 + wx (mod 1) and at y0 and y0 + wy, so the
        four states meet across straight interfaces and the wrap-around is consistent.
  crp   curved Riemann problems: the same pattern with sinusoidal interfaces,
        x0 -> x0 + A sin(2 pi m y + phase) (m = 1, 2; A in [0.04, 0.1]), likewise for y.
  rpui  Riemann problems with uncertain interfaces: straight interfaces perturbed by a
        random sum of 8 small sinusoidal modes (amplitude ~ 0.01 / m).
State ranges: rho, p ~ U[0.2, 1], vx, vy ~ U[-0.5, 0.5].
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np
import torch

from gradlake.data.timestepping import march, output_times
from gradlake.errors import GradlakeError, InputError

GAMMA = 1.4
CHANNELS = ("rho", "rho_vx", "rho_vy", "E")
CLASSES = ("rp", "crp", "rpui")
DEFAULT_CFL = 0.4
DEFAULT_OUTPUT_DT = 0.025
RHO_RANGE, P_RANGE, V_RANGE = (0.2, 1.0), (0.2, 1.0), (-0.5, 0.5)


# -- variables ---------------------------------------------------------------------------
def to_conserved(prim: torch.Tensor) -> torch.Tensor:
    """(rho, vx, vy, p) -> (rho, rho vx, rho vy, E) along dim 1."""
    rho, vx, vy, p = prim.unbind(1)
    energy = p / (GAMMA - 1) + 0.5 * rho * (vx * vx + vy * vy)
    return torch.stack((rho, rho * vx, rho * vy, energy), 1)


def to_primitive(cons: torch.Tensor) -> torch.Tensor:
    """(rho, rho vx, rho vy, E) -> (rho, vx, vy, p) along dim 1."""
    rho, mx, my, energy = cons.unbind(1)
    vx, vy = mx / rho, my / rho
    p = (GAMMA - 1) * (energy - 0.5 * rho * (vx * vx + vy * vy))
    return torch.stack((rho, vx, vy, p), 1)


# -- spatial operator --------------------------------------------------------------------
def _mc_slope(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Monotonised-central limited slope of every cell along ``dim`` (periodic)."""
    left = w - w.roll(1, dim)
    right = w.roll(-1, dim) - w
    magnitude = torch.minimum(torch.minimum(2 * left.abs(), 2 * right.abs()), 0.5 * (left + right).abs())
    return torch.where(left * right > 0, torch.sign(left) * magnitude, torch.zeros_like(w))


def _face_states(w: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left and right primitive states at face i + 1/2 along ``dim``; first order where
    second order would give a non-positive density or pressure."""
    half = 0.5 * _mc_slope(w, dim)
    left = w + half
    right = (w - half).roll(-1, dim)
    bad = (left[:, 0] <= 0) | (left[:, 3] <= 0) | (right[:, 0] <= 0) | (right[:, 3] <= 0)
    if bool(bad.any()):
        keep = bad.unsqueeze(1)
        left = torch.where(keep, w, left)
        right = torch.where(keep, w.roll(-1, dim), right)
    return left, right


def hllc_flux(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """HLLC flux of the conserved variables through a face with normal along the first
    velocity component. States are primitive (rho, u_normal, u_tangential, p) on dim 1."""
    rl, ul, vl, pl = left.unbind(1)
    rr, ur, vr, pr = right.unbind(1)
    el = pl / (GAMMA - 1) + 0.5 * rl * (ul * ul + vl * vl)
    er = pr / (GAMMA - 1) + 0.5 * rr * (ur * ur + vr * vr)
    cl = torch.sqrt(GAMMA * pl / rl)
    cr = torch.sqrt(GAMMA * pr / rr)
    sl = torch.minimum(ul - cl, ur - cr)
    sr = torch.maximum(ul + cl, ur + cr)
    ml, mr = rl * (sl - ul), rr * (sr - ur)  # ml < 0 < mr
    s_star = (pr - pl + ul * ml - ur * mr) / (ml - mr)

    def flux(r, u, v, p, e):
        m = r * u
        return torch.stack((m, m * u + p, m * v, u * (e + p)), 1)

    def star_flux(r, u, v, p, e, s, f):
        factor = r * (s - u) / (s - s_star)
        u_star = torch.stack((factor, factor * s_star, factor * v,
                              factor * (e / r + (s_star - u) * (s_star + p / (r * (s - u))))), 1)
        return f + s.unsqueeze(1) * (u_star - torch.stack((r, r * u, r * v, e), 1))

    fl, fr = flux(rl, ul, vl, pl, el), flux(rr, ur, vr, pr, er)
    fsl = star_flux(rl, ul, vl, pl, el, sl, fl)
    fsr = star_flux(rr, ur, vr, pr, er, sr, fr)
    sl, sr, s_star = sl.unsqueeze(1), sr.unsqueeze(1), s_star.unsqueeze(1)
    return torch.where(sl >= 0, fl, torch.where(s_star >= 0, fsl, torch.where(sr > 0, fsr, fr)))


_SWAP_XY = [0, 2, 1, 3]  # (rho, vx, vy, p) <-> (rho, vy, vx, p); the same swap on fluxes


def tendency(cons: torch.Tensor, dx: float, dy: float) -> torch.Tensor:
    """dU/dt = -(dF/dx + dG/dy) for conserved states [B, 4, H, W] on the periodic grid."""
    prim = to_primitive(cons)
    left, right = _face_states(prim, 3)
    fx = hllc_flux(left, right)
    left, right = _face_states(prim, 2)
    gy = hllc_flux(left[:, _SWAP_XY], right[:, _SWAP_XY])[:, _SWAP_XY]
    return -(fx - fx.roll(1, 3)) / dx - (gy - gy.roll(1, 2)) / dy


def stable_dt(cons: torch.Tensor, dx: float, dy: float, cfl: float) -> torch.Tensor:
    """Per-trajectory CFL step: cfl / (max(|vx| + c) / dx + max(|vy| + c) / dy), shape [B]."""
    rho, vx, vy, p = to_primitive(cons).unbind(1)
    c = torch.sqrt(GAMMA * p / rho)
    sx = (vx.abs() + c).amax(dim=(1, 2))
    sy = (vy.abs() + c).amax(dim=(1, 2))
    return cfl / (sx / dx + sy / dy)


def ssp_rk3_step(cons: torch.Tensor, dt: torch.Tensor, dx: float, dy: float) -> torch.Tensor:
    """One SSP-RK3 (Shu–Osher) step of every trajectory with its own dt [B]."""
    dt = dt.view(-1, 1, 1, 1)
    u1 = cons + dt * tendency(cons, dx, dy)
    u2 = 0.75 * cons + 0.25 * (u1 + dt * tendency(u1, dx, dy))
    return cons / 3 + (2 / 3) * (u2 + dt * tendency(u2, dx, dy))


def _check_state(cons: torch.Tensor, time: torch.Tensor) -> None:
    rho, _, _, p = to_primitive(cons).unbind(1)
    ok = torch.isfinite(cons).flatten(1).all(1) & (rho.flatten(1).amin(1) > 0) & (p.flatten(1).amin(1) > 0)
    if not bool(ok.all()):
        b = int(torch.nonzero(~ok)[0, 0])
        raise GradlakeError(f"euler: trajectory {b} of the batch lost positivity or finiteness "
                            f"at t = {float(time[b]):.6g}; lower the CFL number")


def solve(initial: torch.Tensor, times: Sequence[float], cfl: float = DEFAULT_CFL,
          on_step=None) -> torch.Tensor:
    """Evolve conserved states [B, 4, H, W] on the unit square; snapshots [B, T, 4, H, W]
    at ``times`` (times[0] = 0 is the initial state). Cells are 1/W by 1/H."""
    times = output_times(times, "euler")
    if initial.ndim != 4 or initial.shape[1] != 4:
        raise InputError(f"euler: expected conserved states [B, 4, H, W], got {tuple(initial.shape)}")
    dy, dx = 1.0 / initial.shape[2], 1.0 / initial.shape[3]
    clock = torch.zeros(len(initial), dtype=initial.dtype, device=initial.device)
    _check_state(initial, clock)

    def advance(state, dt, active):
        return torch.where(active.view(-1, 1, 1, 1), ssp_rk3_step(state, dt, dx, dy), state)

    return march(initial.clone(), times, clock, lambda state: stable_dt(state, dx, dy, cfl), advance,
                 snapshot=lambda state: state, check=lambda state, time, _: _check_state(state, time),
                 on_step=on_step)


# -- initial conditions ------------------------------------------------------------------
def trajectory_rng(seed: int, class_name: str, index: int) -> np.random.Generator:
    """The random stream of one trajectory: independent of batch size and other classes."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(class_name.encode()), int(index)])


def _interface(rng: np.random.Generator, class_name: str) -> dict:
    """Offset and width of one periodic band, plus its shape along the other axis."""
    spec = {"offset": float(rng.uniform(0.0, 1.0)), "width": float(rng.uniform(0.35, 0.65))}
    if class_name == "crp":
        spec["modes"] = [[int(rng.integers(1, 3)), float(rng.uniform(0.04, 0.1)),
                          float(rng.uniform(0, 2 * math.pi))]]
    elif class_name == "rpui":
        spec["modes"] = [[m, float(0.01 / m * rng.standard_normal()), float(rng.uniform(0, 2 * math.pi))]
                         for m in range(1, 9)]
    else:
        spec["modes"] = []
    return spec


def sample_params(class_name: str, seed: int, index: int) -> dict:
    """Random initial-condition parameters of trajectory ``index`` of a class."""
    if class_name not in CLASSES:
        raise InputError(f"euler: unknown class {class_name!r}; expected one of {', '.join(CLASSES)}")
    rng = trajectory_rng(seed, class_name, index)
    states = np.column_stack([rng.uniform(*RHO_RANGE, 4), rng.uniform(*V_RANGE, 4),
                              rng.uniform(*V_RANGE, 4), rng.uniform(*P_RANGE, 4)])
    return {"class": class_name, "x_interface": _interface(rng, class_name),
            "y_interface": _interface(rng, class_name),
            "states": [[float(v) for v in row] for row in states]}


def _inside_band(along: np.ndarray, across: np.ndarray, spec: dict) -> np.ndarray:
    shift = spec["offset"] + sum(a * np.sin(2 * math.pi * m * across + ph) for m, a, ph in spec["modes"])
    return np.mod(along - shift, 1.0) < spec["width"]


def initial_state(params: dict, resolution: int) -> np.ndarray:
    """Conserved initial state [4, R, R] (float64) of one trajectory's parameters."""
    centres = (np.arange(resolution) + 0.5) / resolution
    y, x = np.meshgrid(centres, centres, indexing="ij")
    quadrant = (2 * _inside_band(y, x, params["y_interface"]).astype(int)
                + _inside_band(x, y, params["x_interface"]).astype(int))
    prim = np.asarray(params["states"], dtype=np.float64)[quadrant]  # [R, R, 4]
    return to_conserved(torch.from_numpy(np.moveaxis(prim, -1, 0)[None]))[0].numpy()


def simulate(class_name: str, indices: Sequence[int], resolution: int, times: Sequence[float],
             seed: int = 0, cfl: float = DEFAULT_CFL, device: str = "cpu",
             dtype: torch.dtype = torch.float64, on_step=None) -> tuple[np.ndarray, list[dict]]:
    """Trajectories ``indices`` of a class, all at once: (float32 [n, T, 4, R, R], params)."""
    params = [sample_params(class_name, seed, i) for i in indices]
    initial = torch.from_numpy(np.stack([initial_state(p, resolution) for p in params]))
    out = solve(initial.to(device=device, dtype=dtype), times, cfl, on_step)
    return out.to(dtype=torch.float32).cpu().numpy(), params
