"""``compute``: projected (or full) per-example gradients of the observables of a batch; ``describe``:
which path captures each module's parameters."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from gradlake import physics
from gradlake.errors import InputError
from gradlake.grads.capture import projected_grads
from gradlake.grads.capture_plan import plan
from gradlake.grads.full import full_grads
from gradlake.grads.hooks import module_grads
from gradlake.grads.projector import Projector
from gradlake.grads.routes import routes

# No float16: the loss cotangents (~1e-7 on a 128x128 grid) underflow its range; bfloat16 has
# float32's exponent range.
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` inside the block; every module's training flag restored after."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, training in modes:
            m.training = training


def _tensor(value, name: str, device: torch.device) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise InputError(f"grads {name}: expected a float tensor or array [batch, C, *grid], got {type(value).__name__}")
    return value.to(device=device, dtype=torch.float32)


def compute(model: nn.Module, inputs, targets, observables: Sequence[str] = ("C",),
            projector: Projector | None = None, channels: Sequence[str] | None = None,
            sample_ids: Sequence[int] | np.ndarray | None = None, probes: int = 1, probe_seed: int = 0,
            return_loss: bool = False, precision: str = "float32", task: physics.Task | None = None):
    """φ_A = P J_iᵀ r_{A,i} for each observable A and sample i of one batch.

    Returns {A: float32 [B, k]} ("V": [B, probes, k]) on the model's device, with
    k = ``projector.k(model)``; ``projector=None`` gives the full gradient [B, p] (small
    models only). φ_C is the projected gradient of the sample's own loss. The cotangents
    r_A come from :func:`gradlake.physics.residuals` of ``task`` (default: the paper's scaled
    MSE and M/E drifts, :class:`gradlake.physics.PDETask`); inputs are [B, C, *grid] with any
    number of grid dimensions; ``channels`` names the
    channels (default ``c0, c1, ...``: enough for "C" and "V"); ``sample_ids`` (dataset
    rows) key the "V" probes. ``precision`` "bfloat16" runs the forward, backward
    and projections under autocast (for GPUs); φ is float32 either way. With
    ``return_loss=True`` returns (that dict, the task's loss [B]).
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"grads model: expected a torch.nn.Module, got {type(model).__name__}")
    if projector is not None and not isinstance(projector, Projector):
        raise InputError(f"grads projector: expected a gradlake.grads.Projector or None, got {type(projector).__name__}")
    if precision not in PRECISIONS:
        raise InputError(f"grads precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    observables = tuple(observables)
    if not observables or len(set(observables)) != len(observables):
        raise InputError(f"grads observables: expected distinct observables, got {list(observables)}")
    first = next(model.parameters(), None)
    if first is None:
        raise InputError("grads model: the model has no parameters")
    x = _tensor(inputs, "inputs", first.device)
    y = _tensor(targets, "targets", first.device)
    if not 3 <= x.dim() <= 5 or x.shape != y.shape:
        raise InputError(f"grads inputs/targets: expected two [batch, C, X], [batch, C, X, Y] or "
                         f"[batch, C, X, Y, Z] arrays of one shape, got {list(x.shape)} and {list(y.shape)}")
    channels = tuple(channels) if channels is not None else tuple(f"c{i}" for i in range(x.shape[1]))
    if len(channels) != x.shape[1]:
        raise InputError(f"grads channels: expected {x.shape[1]} names (one per channel), got {list(channels)}")
    if sample_ids is not None and len(sample_ids) != x.shape[0]:
        raise InputError(f"grads sample_ids: expected {x.shape[0]} ids (one per sample), got {len(sample_ids)}")
    # Every setting is checked (by the observables' owner) before any work starts.
    physics.residuals(x[:1], x[:1], y[:1], observables, channels,
                      sample_ids=None if sample_ids is None else sample_ids[:1], probes=probes, seed=probe_seed,
                      task=task)

    def cotangents(pred: torch.Tensor) -> dict[str, torch.Tensor]:
        return physics.residuals(pred, x, y, observables, channels, sample_ids=sample_ids,
                                 probes=probes, seed=probe_seed, task=task)

    with evaluating(model):
        if projector is None:
            phi, pred = full_grads(model, x, cotangents)
        else:
            phi, pred = projected_grads(model, x, cotangents, projector, PRECISIONS[precision])
    if return_loss:
        return phi, physics.observable(physics.LOSS, pred.float(), x, y, channels, task).detach()
    return phi


def describe(model: nn.Module, inputs: torch.Tensor, projector: Projector | None = None) -> list[dict]:
    """How each module's parameters are captured, from one capture of ``inputs[:2]``.

    One row per module that captures parameters: {"module", "type", "path", "parameters"},
    path "kron" (factorised Linear/Conv), "expand" (per-sample copies of a container's
    [1, ...] parameters), "affine", "additive", "attention", "transposed", "spectral", "vmap" (exact per-sample rules of
    :mod:`gradlake.grads.module_rules`) or "loop" (the per-sample autograd fallback, with
    "reason"). A module that covers parameters of submodules it does not call lists them
    all. Unsupported structures raise :class:`gradlake.errors.InputError` naming the module.
    """
    projector = projector or Projector(k_in=4, k_out=4, k_dense=16)
    x = inputs[:2]
    projected_grads(model, x, lambda pred: {"C": torch.zeros_like(pred)}, projector)
    model_plan = plan(model)
    covered = routes(model, model_plan, x)
    rows = [{"module": layer.name, "type": type(layer.module).__name__, "path": "kron",
             "parameters": [n for n in (layer.weight, layer.bias) if n]}
            for layer in model_plan.layers if layer.name in covered.reached]
    for entry in covered.ruled(model_plan, model):
        grads = module_grads(entry)
        row = {"module": entry.name, "type": type(entry.module).__name__, "path": grads.path() or "unused",
               "parameters": [q for q, _ in entry.params]}
        if grads.fallback:
            row["reason"] = grads.fallback
        rows.append(row)
    for name, qualified in covered.expanded:
        rows.append({"module": name, "type": type(model.get_submodule(name)).__name__, "path": "expand",
                     "parameters": list(qualified)})
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(rows, key=lambda row: order[row["module"]])
