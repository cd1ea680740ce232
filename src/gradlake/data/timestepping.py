"""Marching a batch of trajectories to fixed output times, each with its own stable step.

Every trajectory takes its own CFL step and lands exactly on each output time, so a
trajectory's result does not depend on the batch it was simulated in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from gradlake.errors import InputError


def output_times(times: Sequence[float], solver: str) -> list[float]:
    """The output times as floats; they must start at 0 and increase."""
    times = [float(t) for t in times]
    if not times or times[0] != 0.0 or any(b <= a for a, b in zip(times, times[1:])):
        raise InputError(f"{solver}: output times must start at 0 and increase, got {times}")
    return times


def march(state: Any, times: Sequence[float], clock: torch.Tensor,
          stable_dt: Callable[[Any], torch.Tensor],
          advance: Callable[[Any, torch.Tensor, torch.Tensor], Any],
          snapshot: Callable[[Any], torch.Tensor],
          check: Callable[[Any, torch.Tensor, float], None],
          on_step: Callable[[], None] | None = None) -> torch.Tensor:
    """Snapshots [B, T, ...] of ``state`` at ``times`` (times[0] = 0 is the state given).

    ``stable_dt(state)`` gives each trajectory's step [B]; ``advance(state, dt, active)``
    steps the active trajectories by dt and leaves the others; ``check(state, clock,
    target)`` raises on a bad state; ``clock`` [B] starts at 0 (its dtype and device are
    the time's).
    """
    snapshots = [snapshot(state)]
    for target in times[1:]:
        while True:
            remaining = target - clock
            active = remaining > 0
            if not bool(active.any()):
                break
            step = stable_dt(state)
            lands = step >= remaining
            dt = torch.where(active, torch.minimum(step, remaining), torch.zeros_like(step))
            state = advance(state, dt, active)
            clock = torch.where(active & lands, torch.full_like(clock, target),
                                torch.where(active, clock + dt, clock))
            check(state, clock, target)
            if on_step is not None:
                on_step()
        snapshots.append(snapshot(state))
    return torch.stack(snapshots, dim=1)
