"""The loss and the residual observables at the model output (the one owner of their definitions).

Shapes: ŷ = pred, x = inputs, y = targets, all [B, C, H, W]; ``channels`` names the C channels
(Euler: "rho", "rho_vx", "rho_vy", "E"; Navier–Stokes: "vx", "vy"). Every observable A is a
per-sample scalar O_A(ŷ) and its residual is the detached cotangent r_A = ∂O_A/∂ŷ (shaped like ŷ),
so that the per-example gradient of A is g_A = J_ᵀ r_A (one VJP):

C  the training loss, the paper's scaled MSE:
       O_C = mean_{c,x,y} (ŷ − y)² / s_c,   s_c = RMS_xy(y_c) + 1e-6
       r_C = 2 (ŷ − y) / (s_c · C·H·W)
M  relative total-mass drift of ŷ against the input, on the density channel "rho":
       δM = (Σŷ_ρ − Σx_ρ) / Σx_ρ,   O_M = ½ δM²,   r_M = δM / Σx_ρ on every cell of "rho", 0 elsewhere
   Unavailable without a "rho" channel (Navier–Stokes).
E  relative total-energy drift, same form:
       Euler (channel "E"): δE = (Σŷ_E − Σx_E) / Σx_E,   r_E = δE / Σx_E on "E", 0 elsewhere
       Navier–Stokes ("vx", "vy"): kinetic energy K(v) = ½ Σ (vx² + vy²),
       δE = (K(ŷ) − K(x)) / K(x),   O_E = ½ δE²,   r_E = δE · ŷ_v / K(x) on "vx" and "vy"
V  random ±1 cotangents (for the metric's estimate): ``probes`` of them per sample, each a pure
   function of (seed, sample_id, probe) — independent of the batch a sample sits in. The bits
   come from numpy's Philox bit generator keyed by ``seed`` with the counter's high words set to
   (probe, sample_id), so streams of different (sample, probe) never overlap.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from gradlake.errors import InputError

EULER_CHANNELS = ("rho", "rho_vx", "rho_vy", "E")
NS_CHANNELS = ("vx", "vy")
OBSERVABLES = ("C", "M", "E", "V")
SCALE_EPS = 1e-6


def scaled_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample scaled MSE [B]: mean over channels and grid of (ŷ − y)² / (RMS_xy(y_c) + 1e-6)."""
    scale = target.pow(2).mean(dim=(-2, -1), keepdim=True).sqrt() + SCALE_EPS
    return ((pred - target).pow(2) / scale).mean(dim=(-3, -2, -1))


def available_observables(channels: Sequence[str]) -> tuple[str, ...]:
    """The observables defined for these channels, in canonical order ("M" needs "rho")."""
    channels = tuple(channels)
    have_energy = "E" in channels or set(NS_CHANNELS) <= set(channels)
    return tuple(o for o in OBSERVABLES if (o != "M" or "rho" in channels) and (o != "E" or have_energy))


def _require(observable: str, channels: tuple[str, ...]) -> None:
    if observable not in OBSERVABLES:
        raise InputError(f"observable {observable!r}: unknown; expected some of {', '.join(OBSERVABLES)}")
    available = available_observables(channels)
    if observable not in available:
        need = "a density channel 'rho'" if observable == "M" else "an energy channel 'E' or velocities 'vx', 'vy'"
        raise InputError(
            f"observable {observable!r} needs {need}; channels {list(channels)} have none "
            f"(available: {', '.join(available)})"
        )


def _drift(pred_total: torch.Tensor, input_total: torch.Tensor) -> torch.Tensor:
    return (pred_total - input_total) / input_total


def _sum_grid(x: torch.Tensor) -> torch.Tensor:
    return x.sum(dim=(-2, -1))


def observable(name: str, pred: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor,
               channels: Sequence[str]) -> torch.Tensor:
    """The differentiable per-sample scalar O_A(ŷ) [B] of observable "C", "M" or "E"."""
    channels = tuple(channels)
    _require(name, channels)
    if name == "C":
        return scaled_mse(pred, targets)
    if name == "V":
        raise InputError("observable 'V' is a random cotangent, not a scalar of the prediction")
    if name == "M" or "E" in channels:
        c = channels.index("rho" if name == "M" else "E")
        delta = _drift(_sum_grid(pred[:, c]), _sum_grid(inputs[:, c]))
    else:
        v = [channels.index(n) for n in NS_CHANNELS]
        delta = _drift(0.5 * _sum_grid(pred[:, v].pow(2)).sum(1), 0.5 * _sum_grid(inputs[:, v].pow(2)).sum(1))
    return 0.5 * delta.pow(2)


def probe_signs(sample_ids: Sequence[int] | np.ndarray, probes: int, shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """±1 float32 [n, probes, *shape], a pure function of (seed, sample_id, probe)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"probe seed: expected an int >= 0, got {seed!r}")
    ids = np.asarray(sample_ids)
    if ids.ndim != 1 or (ids.size and (not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0)):
        raise InputError(f"sample_ids: expected a list of ints >= 0 (dataset rows), got {sample_ids!r}")
    size = int(np.prod(shape))
    words = -(-size // 64)
    out = np.empty((len(ids), probes, size), dtype=np.float32)
    for i, sample in enumerate(ids.tolist()):
        for p in range(probes):
            raw = np.random.Philox(key=int(seed), counter=[0, 0, p, sample]).random_raw(words)
            bits = np.unpackbits(raw.astype("<u8").view(np.uint8), bitorder="little")[:size]
            out[i, p] = 1.0 - 2.0 * bits
    return out.reshape(len(ids), probes, *shape)


def residuals(pred: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, observables: Sequence[str],
              channels: Sequence[str], sample_ids: Sequence[int] | np.ndarray | None = None,
              probes: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Detached cotangents r_A = ∂O_A/∂ŷ: {"C"|"M"|"E": [B, C, H, W], "V": [B, probes, C, H, W]}.

    ``sample_ids`` are the samples' dataset rows (they key the "V" probes); ``None`` means
    0..B-1, which makes "V" depend on the batch position: pass the rows.
    """
    channels = tuple(channels)
    if pred.dim() != 4 or pred.shape[1] != len(channels):
        raise InputError(f"residuals: expected pred [batch, {len(channels)} ({', '.join(channels)}), H, W], got {list(pred.shape)}")
    if inputs.shape != pred.shape or targets.shape != pred.shape:
        raise InputError(f"residuals: inputs {list(inputs.shape)} and targets {list(targets.shape)} must match pred {list(pred.shape)}")
    for name in observables:
        _require(name, channels)
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise InputError(f"probes: expected an int >= 1, got {probes!r}")
    if sample_ids is not None and len(sample_ids) != pred.shape[0]:
        raise InputError(f"sample_ids: expected {pred.shape[0]} ids (one per sample), got {len(sample_ids)}")

    dtype = torch.promote_types(pred.dtype, torch.float32)
    pred, inputs, targets = (t.detach().to(dtype) for t in (pred, inputs, targets))
    batch, n_channels, height, width = pred.shape
    out: dict[str, torch.Tensor] = {}
    for name in observables:
        if name == "C":
            scale = targets.pow(2).mean(dim=(-2, -1), keepdim=True).sqrt() + SCALE_EPS
            r = 2.0 * (pred - targets) / (scale * n_channels * height * width)
        elif name == "V":
            ids = np.arange(batch) if sample_ids is None else sample_ids
            r = torch.from_numpy(probe_signs(ids, probes, pred.shape[1:], seed)).to(pred.device, dtype)
        else:
            r = torch.zeros_like(pred)
            if name == "M" or "E" in channels:
                c = channels.index("rho" if name == "M" else "E")
                total = _sum_grid(inputs[:, c])
                r[:, c] = (_drift(_sum_grid(pred[:, c]), total) / total)[:, None, None]
            else:
                v = [channels.index(n) for n in NS_CHANNELS]
                energy_in = 0.5 * _sum_grid(inputs[:, v].pow(2)).sum(1)
                energy_out = 0.5 * _sum_grid(pred[:, v].pow(2)).sum(1)
                r[:, v] = (_drift(energy_out, energy_in) / energy_in)[:, None, None, None] * pred[:, v]
        out[name] = r
    return out
