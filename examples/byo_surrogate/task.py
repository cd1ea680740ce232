"""A custom task: relative L2 loss, and two named observables of the prediction."""

from __future__ import annotations

import torch

from gradlake.physics import Task


def _total(x: torch.Tensor) -> torch.Tensor:
    """Per-sample sum over every axis but the batch."""
    return x.sum(dim=tuple(range(1, x.dim())))


class RelativeL2Task(Task):
    """loss = ‖ŷ − y‖² / (‖y‖² + eps); observables "K" (half the squared relative drift of
    Σ|ρv|², needs "rho_vx", "rho_vy") and "mass_drift" (signed relative drift of Σρ, needs "rho")."""

    def __init__(self, eps: float = 1e-8):
        self.eps = float(eps)

    def loss(self, pred, inputs, targets):
        return _total((pred - targets) ** 2) / (_total(targets ** 2) + self.eps)

    def observables(self, channels):
        out = {}
        if {"rho_vx", "rho_vy"} <= set(channels):
            m = [channels.index("rho_vx"), channels.index("rho_vy")]

            def momentum_drift(pred, inputs, targets):
                before = _total(inputs[:, m] ** 2)
                return 0.5 * ((_total(pred[:, m] ** 2) - before) / before) ** 2

            out["K"] = momentum_drift
        if "rho" in channels:
            c = channels.index("rho")
            out["mass_drift"] = lambda pred, inputs, targets: _total(pred[:, c]) / _total(inputs[:, c]) - 1
        return out
