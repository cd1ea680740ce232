"""Adapters that give a model the [batch, C, X, (Y, (Z))] layout gradlake passes it."""

from __future__ import annotations

import torch
from torch import nn


class ChannelsLast(nn.Module):
    """A channels-last model [B, X, ..., C] -> [B, X, ..., C] as a channels-first one.

    ``ChannelsLast(model)(x)`` = ``model(x.movedim(1, -1)).movedim(-1, 1)``; the parameters
    are the model's, named ``model.<name>``. Checkpoints of the inner model load into
    ``adapter.model``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.movedim(1, -1)).movedim(-1, 1)
