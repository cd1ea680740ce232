"""The Well's 8 benchmark models (the_well.benchmark.models, The Well 1.2.0 with the
neuraloperator 0.3.0 it pins), small, at 32², 4 channels.

timm is imported by three of them (AFNO, AViT, UNetConvNext) for ``DropPath`` (built only
with drop_path > 0, never here) and AFNO's ``trunc_normal_`` initialiser; timm cannot load
next to the CPU torch wheel (it imports torchvision, whose PyPI wheel is built for CUDA
torch), so where timm does not load those two names come from :func:`_timm_stand_in`.
Everything else is The Well's and neuraloperator's own code.
"""

from __future__ import annotations

import importlib
import sys
import types

import torch
from torch import nn

RESOLUTION = (32, 32)
CHANNELS = 4


def available() -> str | None:
    """Why The Well's models cannot be built here, or None."""
    try:
        neuralop = importlib.import_module("neuralop")
        importlib.import_module("the_well")
    except Exception as exc:  # noqa: BLE001 - any import failure: not installed / does not load
        return f"the_well / neuraloperator do not load ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})"
    version = getattr(neuralop, "__version__", "")
    if not version.startswith("0.3"):
        return f"neuraloperator {version} is not the 0.3 that the_well 1.2 pins"
    return None


class _NoDropPath(nn.Module):
    def __init__(self, *args, **kwargs):
        raise RuntimeError("timm's DropPath is not available here: build the models with drop_path=0")


def _timm_stand_in() -> None:
    """``timm.layers`` / ``timm.models.layers`` with DropPath and trunc_normal_, where timm does not load."""
    try:
        importlib.import_module("timm.layers")
        return
    except Exception:  # noqa: BLE001 - torchvision built for another torch: RuntimeError on import
        for name in [n for n in sys.modules if n == "timm" or n.startswith(("timm.", "torchvision"))]:
            del sys.modules[name]
    layers = types.ModuleType("timm.layers")
    layers.DropPath, layers.trunc_normal_ = _NoDropPath, nn.init.trunc_normal_
    timm, models = types.ModuleType("timm"), types.ModuleType("timm.models")
    timm.layers, timm.models, models.layers = layers, models, layers
    sys.modules.update({"timm": timm, "timm.layers": layers, "timm.models": models, "timm.models.layers": layers})


class ChannelsFirst(nn.Module):
    """A channels-last model (The Well feeds AFNO, AViT and ReFNO [B, *space, C]) on [B, C, *space]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x.movedim(1, -1)).movedim(-1, 1)


def build(name: str) -> nn.Module:
    """One of :data:`NAMES`, on [B, 4, 32, 32] -> [B, 4, 32, 32], in eval mode."""
    _timm_stand_in()
    models = importlib.import_module("the_well.benchmark.models")
    c, res = CHANNELS, RESOLUTION
    common = {"dim_in": c, "dim_out": c, "n_spatial_dims": 2, "spatial_resolution": res}
    factories = {
        "FNO": lambda: models.FNO(**common, modes1=8, modes2=8, hidden_channels=16),
        "TFNO": lambda: models.TFNO(**common, modes1=8, modes2=8, hidden_channels=16),
        "UNetClassic": lambda: models.UNetClassic(**common, init_features=8),
        "UNetConvNext": lambda: models.UNetConvNext(**common, stages=2, init_features=8),
        "DilatedResNet": lambda: models.DilatedResNet(**common, hidden_dim=16, blocks=2),
        "ReFNO": lambda: ChannelsFirst(models.ReFNO(**common, hidden_dim=16, blocks=2)),
        "AViT": lambda: ChannelsFirst(models.AViT(**common, hidden_dim=48, num_heads=4, processor_blocks=2)),
        "AFNO": lambda: ChannelsFirst(models.AFNO(**common, hidden_dim=32, n_blocks=2, patch_size=4)),
    }
    return factories[name]().eval()


NAMES = ("FNO", "TFNO", "UNetClassic", "UNetConvNext", "DilatedResNet", "ReFNO", "AViT", "AFNO")
