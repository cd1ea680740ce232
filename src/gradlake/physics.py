"""The task: the per-sample loss and the named scalar observables at the model output.

A task gives, as functions of (ŷ = pred, x = inputs, y = targets), all [B, C, *grid] with any
number of grid dimensions:

- ``loss(pred, inputs, targets) -> [B]``: the per-sample training loss; it is observable "C"
  and what training minimises (its batch mean);
- ``observables(channels) -> {name: fn}`` (optional): named per-sample scalars
  ``fn(pred, inputs, targets) -> [B]``, each depending on its own sample only.

"V" is built in: random ±1 cotangents for the metric's estimate. Every other observable A is a
per-sample scalar O_A(ŷ) whose residual is the detached cotangent r_A = ∂O_A/∂ŷ (shaped like ŷ),
taken by autograd (:func:`residuals`), so the per-example gradient of A is g_A = Jᵀ r_A (one
VJP) in the capture and in the exact mode alike. Job files name a task by import path
(``[task] path = "package.module:Name"``, ``kwargs = {...}``); :func:`load_task` resolves it and
:func:`check_task` checks it on real samples before work starts.

The built-in default, :class:`PDETask`, is the paper's. ``channels`` names the C channels
(Euler: "rho", "rho_vx", "rho_vy", "E"; Navier–Stokes: "vx", "vy"):

C  the training loss, the paper's scaled MSE:
       O_C = mean_{c,grid} (ŷ − y)² / s_c,   s_c = RMS_grid(y_c) + 1e-6
       (r_C = 2 (ŷ − y) / (s_c · C·|grid|))
M  relative total-mass drift of ŷ against the input, on the density channel "rho":
       δM = (Σŷ_ρ − Σx_ρ) / Σx_ρ,   O_M = ½ δM²   (r_M = δM / Σx_ρ on every cell of "rho", 0 elsewhere)
   Unavailable without a "rho" channel (Navier–Stokes).
E  relative total-energy drift, same form:
       Euler (channel "E"): δE = (Σŷ_E − Σx_E) / Σx_E
       Navier–Stokes ("vx", "vy"): kinetic energy K(v) = ½ Σ (vx² + vy²),
       δE = (K(ŷ) − K(x)) / K(x),   O_E = ½ δE²   (r_E = δE · ŷ_v / K(x) on "vx" and "vy")
V  random ±1 cotangents: ``probes`` of them per sample, each a pure function of
   (seed, sample_id, probe), independent of the batch a sample sits in. The bits come from
   numpy's Philox bit generator keyed by ``seed`` with the counter's high words set to
   (probe, sample_id), so streams of different (sample, probe) never overlap.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from gradlake import fsio
from gradlake.errors import InputError
from gradlake.plugins import import_object

EULER_CHANNELS = ("rho", "rho_vx", "rho_vy", "E")
NS_CHANNELS = ("vx", "vy")
LOSS, PROBES = "C", "V"  # the task's loss and the random cotangents: every task has both
OBSERVABLES = ("C", "M", "E", "V")  # the default task's, in canonical order
SCALE_EPS = 1e-6
DEFAULT_TASK = "gradlake.physics:PDETask"

Scalar = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _grid_dims(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(2, x.dim()))


def scaled_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample scaled MSE [B]: mean over channels and grid of (ŷ − y)² / (RMS_grid(y_c) + 1e-6)."""
    grid = _grid_dims(target)
    scale = target.pow(2).mean(dim=grid, keepdim=True).sqrt() + SCALE_EPS
    return ((pred - target).pow(2) / scale).mean(dim=(1, *grid))


def _sum_grid(x: torch.Tensor) -> torch.Tensor:
    """Per-sample total [B] of [B, *grid] or [B, channels, *grid]."""
    return x.sum(dim=tuple(range(1, x.dim())))


def _drift(pred_total: torch.Tensor, input_total: torch.Tensor) -> torch.Tensor:
    return (pred_total - input_total) / input_total


class Task:
    """Base class of a task (subclassing is optional: any object with these methods will do)."""

    def loss(self, pred: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The per-sample training loss [B] (observable "C")."""
        raise NotImplementedError

    def observables(self, channels: tuple[str, ...]) -> Mapping[str, Scalar]:
        """Named per-sample scalar observables defined for these channels (default: none)."""
        return {}


def _channel_drift(c: int) -> Scalar:
    """½ (relative drift of channel c's total)², per sample."""
    def drift(p, x, y):
        return 0.5 * _drift(_sum_grid(p[:, c]), _sum_grid(x[:, c])).pow(2)

    return drift


class PDETask(Task):
    """The paper's task: scaled MSE, relative mass drift "M" and energy drift "E"."""

    def loss(self, pred, inputs, targets):
        return scaled_mse(pred, targets)

    def observables(self, channels):
        channels = tuple(channels)
        out: dict[str, Scalar] = {}
        if "rho" in channels:
            out["M"] = _channel_drift(channels.index("rho"))
        if "E" in channels:
            out["E"] = _channel_drift(channels.index("E"))
        elif set(NS_CHANNELS) <= set(channels):
            v = [channels.index(n) for n in NS_CHANNELS]

            def kinetic_drift(p, x, y):
                return 0.5 * _drift(0.5 * _sum_grid(p[:, v].pow(2)), 0.5 * _sum_grid(x[:, v].pow(2))).pow(2)

            out["E"] = kinetic_drift
        return out


def load_task(path: str = "", kwargs: Mapping[str, Any] | None = None, source: str = "task") -> Task:
    """The task an import path names (``package.module:Name``; empty: :class:`PDETask`).

    ``Name`` is a class or factory (called with ``kwargs``) or a ready task object.
    """
    kwargs = dict(kwargs or {})
    obj = import_object(path or DEFAULT_TASK, f"{source}.path")
    if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "loss")):
        try:
            obj = obj(**kwargs)
        except TypeError as err:
            raise InputError(f"{source}.kwargs: {path or DEFAULT_TASK} does not accept {kwargs}: {err}") from None
    elif kwargs:
        raise InputError(f"{source}.kwargs: {path} is an object, not a class or factory; it takes no kwargs")
    if not callable(getattr(obj, "loss", None)):
        raise InputError(f"{source}.path: {path} is not a task: it has no loss(pred, inputs, targets) method")
    return obj


def task_observables(task: Task, channels: Sequence[str]) -> dict[str, Scalar]:
    """{"C": loss, **named observables}, names checked; InputError naming the bad one."""
    named = dict(getattr(task, "observables", lambda _: {})(tuple(channels)) or {})
    for name, fn in named.items():
        if name in (LOSS, PROBES):
            raise InputError(f"task observable {name!r}: reserved ('C' is the task's loss, 'V' the random probes)")
        if not fsio.is_identifier(name):
            raise InputError(f"task observable {name!r}: names must be a letter then letters, digits or '_' "
                             "(they name store arrays and --where columns norm_<name>)")
        if not callable(fn):
            raise InputError(f"task observable {name!r}: expected a function (pred, inputs, targets) -> [batch]")
    return {LOSS: task.loss, **named}


def available_observables(channels: Sequence[str], task: Task | None = None) -> tuple[str, ...]:
    """The observables defined for these channels: "C", the task's named ones, "V"."""
    return (*task_observables(task or PDETask(), channels), PROBES)


def _require(observable: str, channels: tuple[str, ...], task: Task) -> None:
    available = available_observables(channels, task)
    if observable in available:
        return
    if isinstance(task, PDETask) and observable in ("M", "E"):
        need = "a density channel 'rho'" if observable == "M" else "an energy channel 'E' or velocities 'vx', 'vy'"
        raise InputError(f"observable {observable!r} needs {need}; channels {list(channels)} have none "
                         f"(available: {', '.join(available)})")
    raise InputError(f"observable {observable!r}: unknown; expected some of {', '.join(available)}")


def _per_sample(name: str, value: Any, batch: int) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or tuple(value.shape) != (batch,):
        got = f"{value.dtype} {list(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise InputError(f"observable {name!r}: expected one float scalar per sample [{batch}], got {got}")
    return value


def observable(name: str, pred: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor,
               channels: Sequence[str], task: Task | None = None) -> torch.Tensor:
    """The differentiable per-sample scalar O_A(ŷ) [B] of a scalar observable (not "V")."""
    task = task or PDETask()
    channels = tuple(channels)
    if name == PROBES:
        raise InputError("observable 'V' is a random cotangent, not a scalar of the prediction")
    _require(name, channels, task)
    return _per_sample(name, task_observables(task, channels)[name](pred, inputs, targets), pred.shape[0])


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
              probes: int = 1, seed: int = 0, task: Task | None = None) -> dict[str, torch.Tensor]:
    """Detached cotangents r_A = ∂O_A/∂ŷ by autograd: {A: [B, C, *grid]}, "V": [B, probes, C, *grid].

    ``task`` defaults to :class:`PDETask`. ``sample_ids`` are the samples' dataset rows (they key
    the "V" probes); ``None`` means 0..B-1, which makes "V" depend on the batch position: pass
    the rows. Runs in float32 (or the prediction's wider dtype) without autocast.
    """
    task = task or PDETask()
    channels = tuple(channels)
    if pred.dim() < 3 or pred.shape[1] != len(channels):
        raise InputError(f"residuals: expected pred [batch, {len(channels)} ({', '.join(channels)}), *grid], "
                         f"got {list(pred.shape)}")
    if inputs.shape != pred.shape or targets.shape != pred.shape:
        raise InputError(f"residuals: inputs {list(inputs.shape)} and targets {list(targets.shape)} must match pred {list(pred.shape)}")
    for name in observables:
        if name != PROBES:
            _require(name, channels, task)
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise InputError(f"probes: expected an int >= 1, got {probes!r}")
    if sample_ids is not None and len(sample_ids) != pred.shape[0]:
        raise InputError(f"sample_ids: expected {pred.shape[0]} ids (one per sample), got {len(sample_ids)}")

    dtype = torch.promote_types(pred.dtype, torch.float32)
    pred, inputs, targets = (t.detach().to(dtype) for t in (pred, inputs, targets))
    scalars = task_observables(task, channels)
    out: dict[str, torch.Tensor] = {}
    with torch.enable_grad(), torch.autocast(pred.device.type, enabled=False):
        for name in observables:
            if name == PROBES:
                ids = np.arange(pred.shape[0]) if sample_ids is None else sample_ids
                out[name] = torch.from_numpy(probe_signs(ids, probes, pred.shape[1:], seed)).to(pred.device, dtype)
                continue
            p = pred.clone().requires_grad_(True)
            value = _per_sample(name, scalars[name](p, inputs, targets), pred.shape[0])
            if not value.requires_grad:
                raise InputError(f"observable {name!r}: does not depend differentiably on the prediction")
            out[name] = torch.autograd.grad(value.sum(), p)[0].detach()
    return out


def check_task(task: Task, channels: Sequence[str], observables: Sequence[str], inputs, targets,
               source: str = "task") -> None:
    """InputError unless each scalar observable, on these real samples (at least two), returns
    finite per-sample scalars that depend differentiably on the prediction and on nothing
    but their own sample. ``inputs``/``targets``: [n, C, *grid] arrays."""
    x = torch.as_tensor(np.asarray(inputs[:2]), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(targets[:2]), dtype=torch.float64)
    pred = y + 0.1 * (x - y) + 0.01  # a prediction near the target, never exactly on it
    scalars = task_observables(task, channels)
    for name in observables:
        if name == PROBES:
            continue
        _require(name, tuple(channels), task)
        where = f"{source}: observable {name!r}" + (" (the loss)" if name == LOSS else "")
        try:
            with torch.enable_grad():
                p = pred.clone().requires_grad_(True)
                whole = _per_sample(name, scalars[name](p, x, y), len(x))
                alone = torch.cat([_per_sample(name, scalars[name](pred[i:i + 1], x[i:i + 1], y[i:i + 1]), 1)
                                   for i in range(len(x))])
        except InputError as err:
            raise InputError(f"{where}: {str(err).split(': ', 1)[-1]}") from None
        except Exception as err:  # noqa: BLE001 -- the user's function failed on real data
            raise InputError(f"{where} failed on samples of shape {list(x.shape[1:])}: "
                             f"{type(err).__name__}: {err}") from None
        if not torch.isfinite(whole).all():
            raise InputError(f"{where}: not finite on real samples ({whole.tolist()})")
        if not whole.requires_grad:
            raise InputError(f"{where}: does not depend differentiably on the prediction")
        if not torch.allclose(whole.detach(), alone, rtol=1e-6, atol=1e-12):
            raise InputError(f"{where}: a sample's value depends on the other samples of its batch "
                             f"(batched {whole.tolist()}, one by one {alone.tolist()}); "
                             "reduce over the grid and channels, never over the batch")
